"""umilayers: PyTorch layers for *Learning Unseen Modality Interaction* (Zhang, Doughty, Snoek, NeurIPS 2023).

The five pieces of the method are importable from the top level::

    from umilayers import (FeatureProjection, CommonSpaceSum, GroupMaskedTransformer,
                           AlignmentLoss, PseudoLabelBank)

and so are the model, the baselines, the FeatureStore and the training recipe.
"""

from umilayers._version import __version__
from umilayers.attention import GroupMaskedTransformer, attention_backend, group_attention
from umilayers.baselines import LateFusion, UnimodalModel, VanillaTransformer, build_model
from umilayers.data import Batch, FeatureStore, StoreError, collate, make_synthetic_store
from umilayers.data import ModalityBatch, collate_modalities
from umilayers.fusion import CommonSpaceSum, common_space_sum, modality_counts
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
from umilayers.model import LossOutput, UMIConfig, UMIOutput, UnseenModalityModel
from umilayers.projection import FeatureProjection, PooledProjection
from umilayers.pseudo_labels import PseudoLabelBank
from umilayers.recipes import FitConfig, evaluate, fit

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
    "modality_counts",
    "group_attention",
    "attention_backend",
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
    "UMIConfig",
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
    # training
    "fit",
    "evaluate",
    "FitConfig",
]
