"""Data: the FeatureStore on-disk format, datasets and collate, and the synthetic benchmark.

See ``docs/store_format.rst`` for the format and the synthetic generator's model of the data.
"""

from umilayers.data.dataset import Batch, FeatureDataset, SplitInfo, collate
from umilayers.data.modalities import ModalityBatch, collate_modalities
from umilayers.data.pairing import pair_same_label
from umilayers.data.store import FORMAT, FeatureStore, StoreError, check_store
from umilayers.data.synthetic import SyntheticConfig, make_synthetic_store

__all__ = [
    "FORMAT",
    "FeatureStore",
    "SplitInfo",
    "StoreError",
    "check_store",
    "FeatureDataset",
    "Batch",
    "collate",
    "pair_same_label",
    "ModalityBatch",
    "collate_modalities",
    "SyntheticConfig",
    "make_synthetic_store",
]
