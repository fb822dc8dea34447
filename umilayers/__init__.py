"""umilayers: PyTorch layers for *Learning Unseen Modality Interaction* (Zhang, Doughty, Snoek, NeurIPS 2023).

The five pieces of the method are importable from the top level::

    from umilayers import (FeatureProjection, CommonSpaceSum, GroupMaskedTransformer,
                           AlignmentLoss, PseudoLabelBank)

and so are the model, the baselines and the FeatureStore. Training lives in
:mod:`umilayers.train`, which ``import umilayers`` does not load: ``umilayers.fit``,
``umilayers.evaluate`` and the configs of :mod:`umilayers.train` load it on first use.
"""

from typing import Any

from umilayers._version import __version__
from umilayers.attention import GroupMaskedTransformer, group_attention
from umilayers.baselines import LateFusion, UnimodalModel, VanillaTransformer, build_model
from umilayers.data import (
    Batch,
    FeatureStore,
    ModalityBatch,
    StoreError,
    collate,
    collate_modalities,
    make_synthetic_store,
)
from umilayers.fusion import CommonSpaceSum, common_space_sum, fuse_rows, modality_counts
from umilayers.losses import (
    AlignmentLoss,
    TaskLoss,
    alignment_loss,
    classification_loss,
    classification_pseudo_loss,
    regression_loss,
    regression_pseudo_loss,
    similarity_distillation_loss,
    triplet_loss,
)
from umilayers.model import LossOutput, ModelConfig, TaskModel, UMIConfig, UMIOutput, UnseenModalityModel
from umilayers.projection import FeatureProjection, PooledProjection
from umilayers.pseudo_labels import PseudoLabelBank

#: Names of :mod:`umilayers.train`, imported from there on first use (PEP 562).
_TRAINING = ("fit", "evaluate", "FitConfig", "TrainConfig", "RuntimeConfig")

__all__ = [
    "__version__",
    # the five layers of the method
    "FeatureProjection",
    "CommonSpaceSum",
    "GroupMaskedTransformer",
    "AlignmentLoss",
    "PseudoLabelBank",
    # functional forms, ablations and task losses
    "PooledProjection",
    "common_space_sum",
    "fuse_rows",
    "modality_counts",
    "group_attention",
    "alignment_loss",
    "TaskLoss",
    "classification_loss",
    "classification_pseudo_loss",
    "regression_loss",
    "regression_pseudo_loss",
    "triplet_loss",
    "similarity_distillation_loss",
    # the model and the baselines
    "UnseenModalityModel",
    "ModelConfig",
    "UMIConfig",
    "TaskModel",
    "UMIOutput",
    "LossOutput",
    "UnimodalModel",
    "LateFusion",
    "VanillaTransformer",
    "build_model",
    # data
    "FeatureStore",
    "StoreError",
    "Batch",
    "collate",
    "ModalityBatch",
    "collate_modalities",
    "make_synthetic_store",
    # training (loaded on first use)
    "fit",
    "evaluate",
    "FitConfig",
    "TrainConfig",
    "RuntimeConfig",
]


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        import umilayers.train  # noqa: PLC0415 - lazy on purpose: layers do not load the trainer

        return getattr(umilayers.train, name)
    raise AttributeError(f"module 'umilayers' has no attribute {name!r}")
