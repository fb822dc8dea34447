"""Torch datasets over FeatureStore splits, and ``collate`` into modality sub-batches.

An item (one sample) is a dict (``docs/contracts.md``)::

    {"index": int,          # global train id for train splits, else the row
     "split_id": int,       # the split's position in store.json
     "inputs": {m: (k_m, d_m) float32 tensor},   # only the split's modalities
     "lengths": {m: int},   # valid tokens (k_m when the store has no lengths file)
     "target": tensor,      # () int64 | (T,) float32 | (text_tokens, text_dim) float32
     "target_length": int}  # retrieval only: valid caption tokens

A retrieval store with several captions per row gives one of them per item (``caption="first"``
or ``"random"``; ``"caption"``: int, the slot it came from), or all of them (``caption="all"``):
``"target"`` ``(K, text_tokens, text_dim)``, ``"target_length"`` ``(K,)`` int64 (0 for empty
slots) and ``"caption_count"`` int.

:func:`collate` turns a list of items, possibly from splits with different modalities, into a
:class:`Batch` whose ``inputs[m]`` holds only the rows that have modality ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from umilayers._validation import is_int

__all__ = ["CAPTION_MODES", "SplitInfo", "FeatureDataset", "Batch", "collate", "set_epoch"]

CAPTION_MODES = ("first", "random", "all")
"""Which captions a retrieval item carries: caption 0, one drawn per row and epoch, or all."""


@dataclass(frozen=True)
class SplitInfo:
    """One split as declared in ``store.json``.

    Example::

        >>> SplitInfo("train_a", "train", 100, ("rgb",))
        SplitInfo(name='train_a', role='train', size=100, modalities=('rgb',))
    """

    name: str
    role: str
    size: int
    modalities: tuple[str, ...]


class FeatureDataset(Dataset):
    """One split of a :class:`~umilayers.data.store.FeatureStore`, read lazily from memory maps.

    Built by ``FeatureStore.dataset(split)``. Arrays are opened with ``np.load(mmap_mode="r")`` on
    first access in each process, so the dataset pickles cheaply to DataLoader workers (open maps
    are dropped on pickling and reopened in the worker). Rows are converted to float32.

    Example::

        >>> import tempfile, numpy as np
        >>> from umilayers.data.store import FeatureStore
        >>> store = FeatureStore.create(tempfile.mkdtemp() + "/s", "classification", 2,
        ...                             {"rgb": (3, 4)})
        >>> store.write_split("tr", "train", {"rgb": np.ones((2, 3, 4), np.float16)}, np.array([0, 1]))
        >>> item = store.dataset("tr")[1]
        >>> item["index"], item["inputs"]["rgb"].dtype, item["lengths"], int(item["target"])
        (1, torch.float32, {'rgb': 3}, 1)
    """

    def __init__(
        self,
        root: Union[str, Path],
        info: SplitInfo,
        split_id: int,
        index_offset: int,
        modalities: Mapping[str, tuple[int, int]],
        task: str,
        text: Optional[tuple[int, int]] = None,
        *,
        max_captions: int = 1,
        caption: str = "first",
        caption_seed: int = 0,
    ) -> None:
        if caption not in CAPTION_MODES:
            raise ValueError(f"caption: expected one of {list(CAPTION_MODES)}, got {caption!r}")
        self.root = Path(root)
        self.info = info
        self.split_id = int(split_id)
        self.index_offset = int(index_offset)
        self.shapes = {m: tuple(modalities[m]) for m in info.modalities}
        self.task = task
        self.text = text
        self.max_captions = int(max_captions)
        self.caption = caption
        self.caption_seed = int(caption_seed)
        self.epoch = 0
        self._arrays: Optional[dict[str, Any]] = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch of ``caption="random"``: row ``r`` carries caption
        ``default_rng([caption_seed, epoch, split_id, r]).integers(count)``, the same in every
        process and on resume. Call it before each epoch's DataLoader iterator is created (each
        worker holds a copy of the dataset made then)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.info.size

    def _open(self) -> dict[str, Any]:
        folder = self.root / self.info.name
        arrays: dict[str, Any] = {"features": {}, "lengths": {}}
        for m in self.info.modalities:
            arrays["features"][m] = np.load(folder / f"{m}.npy", mmap_mode="r")
            lengths = folder / f"{m}.lengths.npy"
            arrays["lengths"][m] = np.load(lengths) if lengths.is_file() else None
        arrays["targets"] = np.load(folder / "targets.npy", mmap_mode="r")
        text_lengths = folder / "targets.lengths.npy"
        arrays["target_lengths"] = np.load(text_lengths) if text_lengths.is_file() else None
        counts = folder / "targets.counts.npy"
        arrays["target_counts"] = np.load(counts) if counts.is_file() else None
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # memory maps are reopened in each worker
        return state

    def __getitem__(self, row: int) -> dict[str, Any]:
        if not is_int(row):
            raise TypeError(f"row: expected an int, got {type(row).__name__}")
        size = self.info.size
        if row < 0:
            row += size
        if not 0 <= row < size:
            raise IndexError(f"row {row} out of range for split {self.info.name!r} of size {size}")
        if self._arrays is None:
            self._arrays = self._open()
        arrays = self._arrays
        inputs, lengths = {}, {}
        for m in self.info.modalities:
            lens = arrays["lengths"][m]
            length = int(lens[row]) if lens is not None else self.shapes[m][0]
            if length == 0:  # this sample lacks m: absent, never a zero tensor
                continue
            inputs[m] = torch.from_numpy(np.array(arrays["features"][m][row], dtype=np.float32))
            lengths[m] = length
        item = {
            "index": self.index_offset + int(row),
            "split_id": self.split_id,
            "inputs": inputs,
            "lengths": lengths,
        }
        if self.task == "retrieval":
            item.update(self._caption_item(arrays, row))
        elif self.task == "classification":
            item["target"] = torch.tensor(int(arrays["targets"][row]), dtype=torch.int64)
        else:
            item["target"] = torch.from_numpy(np.array(arrays["targets"][row], dtype=np.float32))
        return item

    def _caption_item(self, arrays: Mapping[str, Any], row: int) -> dict[str, Any]:
        """``target`` and ``target_length`` (and, for ``caption="all"``, ``caption_count``)."""
        assert self.text is not None
        tokens = self.text[0]
        lengths = arrays["target_lengths"]
        if self.max_captions == 1:
            return {"target": torch.from_numpy(np.array(arrays["targets"][row], dtype=np.float32)),
                    "target_length": int(lengths[row]) if lengths is not None else tokens}
        counts = arrays["target_counts"]
        count = int(counts[row]) if counts is not None else self.max_captions
        if self.caption == "all":
            caption_lengths = (np.array(lengths[row], dtype=np.int64) if lengths is not None
                               else np.full(self.max_captions, tokens, dtype=np.int64))
            return {"target": torch.from_numpy(np.array(arrays["targets"][row], dtype=np.float32)),
                    "target_length": torch.from_numpy(caption_lengths), "caption_count": count}
        choice = 0
        if self.caption == "random":
            draw = np.random.default_rng([self.caption_seed, self.epoch, self.split_id, row])
            choice = int(draw.integers(count))
        return {"target": torch.from_numpy(np.array(arrays["targets"][row, choice], dtype=np.float32)),
                "target_length": int(lengths[row, choice]) if lengths is not None else tokens,
                "caption": choice}

    def __repr__(self) -> str:
        return (f"FeatureDataset(split={self.info.name!r}, role={self.info.role!r}, "
                f"size={self.info.size}, modalities={list(self.info.modalities)})")


@dataclass
class Batch:
    """A collated batch in the sub-batch layout of ``docs/contracts.md``.

    Attributes:
        indices: global train ids (train splits) or rows (val/test).
        inputs: ``{m: (B_m, k_m, d_m)}`` float32, the rows that have ``m``, in batch order.
        padding_masks: ``{m: (B_m, k_m) bool or None}``, True = padding; ``None`` when no row of
            the batch has padding for ``m``. Every key of ``inputs`` is present.
        present: ``{m: (B,) bool}``; ``present[m].sum() == B_m``.
        targets: ``(B,)`` int64 | ``(B, T)`` float32 | retrieval ``(B, text_tokens, text_dim)``.
        text_padding_mask: retrieval ``(B, text_tokens)`` bool (None when captions are unpadded
            or the task is not retrieval); ``(B, K, text_tokens)`` for ``caption="all"`` items
            (an empty caption slot is all padding).
        split_ids: the split of each row (position in ``store.json``).
        caption_counts: ``(B,)`` int64 captions of each row for ``caption="all"`` items (their
            ``targets`` are ``(B, K, text_tokens, text_dim)``), else None.
        caption_slots: ``(B,)`` int64, the caption slot each row's ``targets`` came from
            (several-captions stores, ``caption="first"`` / ``"random"``), else None.

    Shape:
        - indices, split_ids: ``(B,)`` int64

    Example::

        >>> items = [
        ...     {"index": 0, "split_id": 0, "inputs": {"rgb": torch.ones(3, 2)},
        ...      "lengths": {"rgb": 2}, "target": torch.tensor(1)},
        ...     {"index": 5, "split_id": 1, "inputs": {"audio": torch.ones(4, 2)},
        ...      "lengths": {"audio": 4}, "target": torch.tensor(0)},
        ... ]
        >>> batch = collate(items)
        >>> batch.present["rgb"].tolist(), batch.inputs["rgb"].shape, batch.padding_masks["rgb"].tolist()
        ([True, False], torch.Size([1, 3, 2]), [[False, False, True]])
        >>> batch.padding_masks["audio"] is None, batch.indices.tolist(), batch.size
        (True, [0, 5], 2)
    """

    indices: Tensor
    inputs: dict[str, Tensor]
    padding_masks: dict[str, Optional[Tensor]]
    present: dict[str, Tensor]
    targets: Tensor
    text_padding_mask: Optional[Tensor]
    split_ids: Tensor
    caption_counts: Optional[Tensor] = None
    caption_slots: Optional[Tensor] = None

    @property
    def size(self) -> int:
        """The batch size ``B``."""
        return int(self.indices.shape[0])

    def _map(self, fn) -> "Batch":
        def apply(value):
            if value is None:
                return None
            if isinstance(value, dict):
                return {k: apply(v) for k, v in value.items()}
            return fn(value)

        return Batch(**{f.name: apply(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())


def _padding_mask(lengths: Union[Sequence[int], Tensor], tokens: int) -> Optional[Tensor]:
    """True at padding: ``(*lengths.shape, tokens)``, or None when nothing is padded."""
    lens = torch.as_tensor(lengths, dtype=torch.long)
    if bool((lens >= tokens).all()):
        return None
    return torch.arange(tokens) >= lens[..., None]


def collate(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Collate dataset items into a :class:`Batch` (modalities in sorted order).

    Items may come from splits with different modality sets (e.g. a ``ConcatDataset`` over all
    training splits); each modality's sub-batch holds only the rows that have it.
    """
    if len(items) == 0:
        raise ValueError("collate: expected at least one item, got an empty list")
    names = sorted({m for item in items for m in item["inputs"]})
    inputs, masks, present = {}, {}, {}
    for m in names:
        rows = [item for item in items if m in item["inputs"]]
        shapes = {tuple(item["inputs"][m].shape) for item in rows}
        if len(shapes) != 1:
            raise ValueError(f"collate: modality {m!r} has rows of different shapes {sorted(shapes)}")
        inputs[m] = torch.stack([item["inputs"][m] for item in rows])
        tokens = inputs[m].shape[1]
        masks[m] = _padding_mask([int(item["lengths"].get(m, tokens)) for item in rows], tokens)
        present[m] = torch.tensor([m in item["inputs"] for item in items], dtype=torch.bool)
    targets = torch.stack([torch.as_tensor(item["target"]) for item in items])
    text_mask, counts = None, None
    if "caption_count" in items[0]:  # every caption of each row
        counts = torch.tensor([int(item["caption_count"]) for item in items], dtype=torch.long)
        text_mask = _padding_mask(torch.stack([item["target_length"] for item in items]), targets.shape[2])
    elif "target_length" in items[0]:
        text_mask = _padding_mask([int(item["target_length"]) for item in items], targets.shape[1])
    return Batch(
        indices=torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        inputs=inputs,
        padding_masks=masks,
        present=present,
        targets=targets,
        text_padding_mask=text_mask,
        split_ids=torch.tensor([int(item["split_id"]) for item in items], dtype=torch.long),
        caption_counts=counts,
        caption_slots=(torch.tensor([int(item["caption"]) for item in items], dtype=torch.long)
                       if "caption" in items[0] else None),
    )


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Set the epoch of every :class:`FeatureDataset` in ``dataset`` (itself, or inside
    ``ConcatDataset`` / ``Subset`` wrappers), for ``caption="random"``."""
    if isinstance(dataset, FeatureDataset):
        dataset.set_epoch(epoch)
    for inner in getattr(dataset, "datasets", ()):
        set_epoch(inner, epoch)
    if hasattr(dataset, "dataset"):
        set_epoch(dataset.dataset, epoch)
