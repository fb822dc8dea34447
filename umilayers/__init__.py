"""umilayers: PyTorch layers for *Learning Unseen Modality Interaction* (Zhang, Doughty, Snoek, NeurIPS 2023).

The five pieces of the method are importable from the top level::

    from umilayers import (FeatureProjection, CommonSpaceSum, GroupMaskedTransformer,
                           AlignmentLoss, PseudoLabelBank)
"""

from umilayers._version import __version__
from umilayers.attention import GroupMaskedTransformer, group_attention
from umilayers.data import Batch, FeatureStore, StoreError, collate, make_synthetic_store
from umilayers.fusion import CommonSpaceSum, common_space_sum, modality_counts
from umilayers.projection import FeatureProjection, PooledProjection

__all__ = [
    "__version__",
    # the five layers
    "FeatureProjection",
    "CommonSpaceSum",
    "GroupMaskedTransformer",
    # helpers and ablations
    "PooledProjection",
    "common_space_sum",
    "modality_counts",
    "group_attention",
    # data
    "FeatureStore",
    "StoreError",
    "Batch",
    "collate",
    "make_synthetic_store",
]
