"""Pseudo-labels: per-sample unimodal predictions averaged over the last epochs of training.

The paper's dual-branch prediction supervises its second branch with pseudo-labels: the average
of a sample's unimodal predictions over the last ``window`` (``e``) of the ``total_epochs``
epochs of unimodal training; where a sample has several modalities, the modality whose
pseudo-label is closest (cosine similarity) to the ground truth is used.

This module is that algorithm (:meth:`PseudoLabelBank.update`, :meth:`PseudoLabelBank.targets`,
the error bound) and the bank's file format; the rows themselves live in a
:mod:`umilayers.row_storage` table, in memory or in a file.

Memory model
------------
The bank keeps one row per (sample, modality) pair that exists: the running **mean** of the
predictions recorded so far (``C`` values in ``dtype``, float16 by default). A row is stored
when the pair is first recorded inside the window, or up front for the pairs announced with
``present=`` at construction. In the paper's modality-incomplete training each sample has one
modality, so a bank with two modalities holds ``N`` rows, not ``2 N``. Per modality and sample
it also keeps two ``int64``: the row (``-1``: none) and a bit mask of the epochs of the window
recorded (bit ``epoch - first_epoch``), which gives the per-sample count (samples missed in some
epochs are averaged over the epochs they had) and catches an epoch recorded twice. So memory is
``P * C * itemsize + 16 * M * N`` bytes for ``P`` stored pairs, whatever the window: at
EPIC-Kitchens size (62,429 samples, 3,806 classes, 2 modalities, one per sample, float16)
477 MB, where a row for every sample and modality would take 952 MB, a float32 sum 1.9 GB and
one float16 slot per epoch 9.5 GB. In memory rows are added in chunks of 16 MiB
(:class:`~umilayers.row_storage.MemoryRows`): growing copies nothing, and at most one chunk a
modality is allocated ahead; pairs announced with ``present=`` are allocated exactly, at once.

Why a running mean and not a running sum: the mean stays in the range of the predictions, so a
float16 bank cannot overflow (a sum of 20 regression outputs of size 5,000 would) and
:meth:`PseudoLabelBank.targets` needs no division.

Float16 error bound
-------------------
Each update computes ``m_k = m_{k-1} + (x_k - m_{k-1}) / k`` in float32 and rounds once to the
storage dtype. A rounding error made at step ``k`` is scaled by ``k / n`` by the time ``n``
updates are recorded, so with unit roundoff ``u`` of the storage dtype (``2^-11`` for float16),
its smallest subnormal spacing ``s`` (``2^-24``) and ``A = max |x|``::

    |stored mean - exact mean| <= (n + 1) / 2 * ((u + 8 * 2^-24) * A + s / 2)

(to first order; the ``8 * 2^-24`` covers the float32 arithmetic). For probabilities
(``A <= 1``) and the paper's ``n = e = 10`` that is ``2.7e-3`` absolute in float16,
``3.0e-6`` in float32. :meth:`PseudoLabelBank.error_bound` returns it; the tests compare
against a float64 numpy reference with exactly this tolerance.

On disk
-------
A bank is a directory: per modality ``mean.<modality>.npy`` ``(P_m, C)`` (the rows, in the
order they were created), ``slot.<modality>.npy`` ``(N,)`` int64 (each sample's row, ``-1``
for none) and ``seen.<modality>.npy`` ``(N,)`` int64 (the epoch bit masks), plus ``bank.json``
(format version 2; banks of version 1, one row for every sample and modality, are not read).
``storage=path`` keeps the bank in such a directory instead of memory. The means are not
mapped: each :meth:`PseudoLabelBank.update` and :meth:`PseudoLabelBank.targets` reads the rows
of its batch with positioned reads (``os.preadv``, sorted by row, adjacent rows coalesced into
one call) into a buffer of the batch's size and writes updated rows back with ``os.pwritev``
(:class:`~umilayers.row_storage.FileRows`; a new row extends the file), so the process holds the
batch and not the table: its resident set grows by a few MB at most, whatever ``N``. The file
data itself lives in the kernel's page cache, as for any file: shared, written back in the
background and reclaimed under memory pressure (a container's memory cgroup does count it, as
reclaimable cache). The small per-sample arrays (16 bytes a sample and modality) are
memory-mapped. :meth:`PseudoLabelBank.save` writes the same layout, every file to a temporary
name in the same folder and then renamed (``os.replace``), ``bank.json`` last;
:meth:`PseudoLabelBank.load` reads it back bit-exactly, in memory or file-backed.

Epochs are counted from 0: the window is ``total_epochs - window <= epoch < total_epochs``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from umilayers._io import atomic_numpy_save, atomic_write
from umilayers._validation import (
    check_bool_mask,
    check_finite,
    check_ids,
    check_positive_int,
    check_tensor,
    format_indices,
)
from umilayers.row_storage import DEFAULT_CHUNK_BYTES, FileRows, MemoryRows, RowStorage, map_npy, save_rows

__all__ = ["PseudoLabelBank"]

PathLike = Union[str, "os.PathLike[str]"]

_FORMAT = "umilayers.PseudoLabelBank"
_VERSION = 2  # 1: one row for every sample and modality (never released, not read)
_MAX_WINDOW = 63  # bits of the int64 mask that stay non-negative
_MODALITY_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_DTYPE_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NAME_BY_DTYPE = {dtype: name for name, dtype in _DTYPE_BY_NAME.items()}
_INDEX = np.dtype("<i8")  # the per-sample arrays: row (slot) and epoch bit mask
_INDEX_BYTES = 2 * _INDEX.itemsize  # per sample and modality
_CHUNK_BYTES = 32 << 20  # rows copied per step when streaming a whole table


def _popcount(bits: Tensor, width: int) -> Tensor:
    count = torch.zeros_like(bits)
    for b in range(width):
        count += (bits >> b) & 1
    return count


def _check_layout(where: str, slot: Tensor, seen: Tensor, rows: int, window: int) -> None:
    """A saved or restored bank's per-sample arrays agree with its ``rows`` rows and window."""
    stored = slot[slot >= 0]
    if stored.numel() != rows or bool((slot < -1).any()) or (
            rows and (int(stored.max()) >= rows or torch.unique(stored).numel() != rows)):
        raise ValueError(
            f"{where}: expected slot to give each of the {rows} rows to exactly one sample and -1 "
            f"to the others, got {stored.numel()} samples with rows in "
            f"[{int(slot.min()) if slot.numel() else 0}, {int(slot.max()) if slot.numel() else 0}]"
        )
    orphan = (seen != 0) & (slot < 0)
    if bool(orphan.any()):
        raise ValueError(f"{where}: {int(orphan.sum())} samples were recorded but have no row, "
                         f"e.g. {format_indices(orphan.nonzero().flatten())}")
    if bool(((seen >> window) != 0).any()):  # also catches negative masks
        raise ValueError(f"{where}: epoch masks hold bits beyond the window of {window} epochs")


class PseudoLabelBank:
    """Running averages of per-sample unimodal predictions over the last ``window`` epochs.

    Call :meth:`update` once per epoch (and modality) with the predictions of the unimodal
    model for the samples it saw: classification softmax probabilities, regression values, or
    L2-normalised video embeddings for retrieval. Updates of epochs before
    ``total_epochs - window`` are checked and ignored; later ones are folded into a running
    mean, one row per (sample, modality) pair recorded, so memory is ``O(P * C)`` for ``P``
    pairs (see the module notes for the memory model and the float16 error bound).
    :meth:`targets` then gives the pseudo-labels of a batch.

    Args:
        num_samples: ``N``, the number of training samples (global ids ``0 .. N-1``).
        num_outputs: ``C``, the width of a prediction (classes, outputs or embedding size).
        modalities: names of the modalities (letters, digits, ``_`` and ``-``).
        window: ``e``, the number of last epochs averaged (1 to 63, at most ``total_epochs``).
        total_epochs: epochs of unimodal training; epochs are numbered ``0 .. total_epochs-1``.
        storage: a directory: keep the arrays in ``.npy`` files there, read and written in
            place batch by batch (created; a directory that already holds a bank is refused
            unless ``overwrite``). ``None`` keeps them in memory.
        dtype: storage dtype of the means: ``torch.float16`` (default), ``torch.bfloat16`` or
            ``torch.float32``.
        overwrite: replace a bank already in ``storage``.
        resident_budget: file-backed mode only: the largest buffer, in bytes, the bank uses
            when it streams whole files (:meth:`save`, :meth:`load`, state dicts; default
            64 MiB). Updates and lookups only hold their batch.
        present: optional: modality -> ``(N,)`` bool, the pairs that will be recorded (in
            modality-incomplete training, the samples of the splits that have the modality).
            Their rows are allocated at once and exactly; without it (or for a pair it leaves
            out) a row is added when the pair is first recorded. Either way the results are the
            same.
        chunk_bytes: in memory, rows are added in chunks of about this many bytes (default
            16 MiB, at most ``ceil(N / 8)`` rows): the most a modality allocates ahead of its
            rows.

    Raises:
        ValueError: bad sizes, window, modality names, dtype or ``present``; see also each
            method.

    Example::

        >>> import torch
        >>> bank = PseudoLabelBank(num_samples=6, num_outputs=3, modalities=["audio", "rgb"],
        ...                        window=2, total_epochs=5)
        >>> probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
        >>> for epoch in range(5):  # epochs 0-2 are ignored, 3 and 4 averaged
        ...     bank.update("rgb", torch.tensor([0, 1]), probs * (epoch == 4) + 0.1 * (epoch < 4), epoch)
        ...     bank.update("audio", torch.tensor([1]), probs[[0]], epoch)
        >>> bank.targets(torch.tensor([0]), {"rgb": torch.tensor([True])})
        tensor([[0.3501, 0.2000, 0.1000]])
        >>> present = {"rgb": torch.tensor([True]), "audio": torch.tensor([True])}
        >>> bank.targets(torch.tensor([1]), present, ground_truth=torch.tensor([0]))  # audio wins
        tensor([[0.6001, 0.3000, 0.1000]])
        >>> bank.counts("rgb").tolist()
        [2, 2, 0, 0, 0, 0]
        >>> bank.stored("audio").tolist()  # rows only for the pairs recorded: 3 of 12
        [False, True, False, False, False, False]
    """

    def __init__(
        self,
        num_samples: int,
        num_outputs: int,
        modalities: Sequence[str],
        window: int,
        total_epochs: int,
        storage: Optional[PathLike] = None,
        dtype: torch.dtype = torch.float16,
        *,
        overwrite: bool = False,
        resident_budget: int = 64 << 20,
        present: Optional[Mapping[str, Tensor]] = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        config = self._check_config(num_samples, num_outputs, modalities, window, total_epochs, dtype)
        check_positive_int("resident_budget", resident_budget)
        check_positive_int("chunk_bytes", chunk_bytes)
        slots = self._initial_slots(config, present)
        self._init(config, storage, resident_budget, chunk_bytes)
        if self.storage is None:
            for m, slot in slots.items():
                self._rows[m].grow(int(slot.max()) + 1 if slot.numel() else 0, exact=True)
                self._slot[m] = slot
                self._seen[m] = torch.zeros(self.num_samples, dtype=torch.int64)
        else:
            self._create_files(slots, overwrite)

    # ----------------------------------------------------------------- construction

    @staticmethod
    def _check_config(num_samples, num_outputs, modalities, window, total_epochs, dtype) -> dict:
        check_positive_int("num_samples", num_samples)
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("window", window)
        check_positive_int("total_epochs", total_epochs)
        if window > total_epochs or window > _MAX_WINDOW:
            raise ValueError(
                f"window: expected 1 <= window <= min(total_epochs={total_epochs}, "
                f"{_MAX_WINDOW}), got {window}"
            )
        if isinstance(modalities, str) or not isinstance(modalities, Sequence):
            raise TypeError(f"modalities: expected a sequence of names, got {modalities!r}")
        names = list(modalities)
        if not names:
            raise ValueError("modalities: expected at least one modality, got none")
        if len(set(names)) != len(names):
            raise ValueError(f"modalities: expected unique names, got {names}")
        for name in names:
            if not isinstance(name, str) or not _MODALITY_NAME.match(name):
                raise ValueError(
                    f"modalities: names may hold letters, digits, '_' and '-', got {name!r}"
                )
        if dtype not in _NAME_BY_DTYPE:
            raise ValueError(
                f"dtype: expected one of torch.float16, torch.bfloat16, torch.float32, got {dtype}"
            )
        return {
            "num_samples": num_samples,
            "num_outputs": num_outputs,
            "modalities": sorted(names),
            "window": window,
            "total_epochs": total_epochs,
            "dtype": _NAME_BY_DTYPE[dtype],
        }

    @staticmethod
    def _initial_slots(config: dict, present: Optional[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Per modality ``(N,)`` rows: ``0, 1, ...`` for the announced pairs in sample order, -1 else."""
        n, modalities = config["num_samples"], config["modalities"]
        if present is not None and not isinstance(present, Mapping):
            raise TypeError(f"present: expected a mapping of modality -> (N,) bool, got {type(present).__name__}")
        present = present or {}
        for m in sorted(present):
            if m not in modalities:
                raise ValueError(f"present: unknown modality {m!r}, expected one of {modalities}")
            check_bool_mask(f"present[{m!r}]", present[m], ("N",), {"N": n})
        slots = {}
        for m in modalities:
            slot = torch.full((n,), -1, dtype=torch.int64)
            if m in present:
                mask = present[m].detach().to("cpu")
                slot[mask] = torch.arange(int(mask.sum()))
            slots[m] = slot
        return slots

    def _init(self, config: dict, storage: Optional[PathLike], resident_budget: int,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        """Attributes of an empty bank; memory mode gets empty tables, file mode none yet."""
        self._config = dict(config)
        self.num_samples: int = config["num_samples"]
        self.num_outputs: int = config["num_outputs"]
        self.modalities: list[str] = list(config["modalities"])
        self.window: int = config["window"]
        self.total_epochs: int = config["total_epochs"]
        self.dtype: torch.dtype = _DTYPE_BY_NAME[config["dtype"]]
        self.resident_budget = resident_budget
        self.chunk_bytes = chunk_bytes
        self.storage: Optional[Path] = None if storage is None else Path(storage).resolve()
        self._maps: list[mmap.mmap] = []
        self._rows: dict[str, RowStorage] = {}
        self._slot: dict[str, Tensor] = {}  # (N,) int64: each sample's row, -1 for none
        self._seen: dict[str, Tensor] = {}  # (N,) int64: epochs of the window recorded, as bits
        if self.storage is None:
            self._rows = {m: self._memory_rows() for m in self.modalities}

    def _memory_rows(self) -> MemoryRows:
        # A modality has at most N rows; chunks of at most N/8 rows keep a small bank that
        # learns its rows from being as large as a row for every sample.
        row_bytes = self.num_outputs * self.dtype.itemsize
        eighth = -(-self.num_samples // 8) * row_bytes
        return MemoryRows(self.num_outputs, self.dtype, min(self.chunk_bytes, eighth))

    def _create_files(self, slots: Mapping[str, Tensor], overwrite: bool) -> None:
        root = self.storage
        if (root / "bank.json").exists() and not overwrite:
            raise FileExistsError(
                f"storage: {root} already holds a PseudoLabelBank; reopen it with "
                f"PseudoLabelBank.load(path, mmap=True) or pass overwrite=True"
            )
        root.mkdir(parents=True, exist_ok=True)
        for m, slot in slots.items():
            rows = int(slot.max()) + 1 if slot.numel() else 0
            FileRows.create(self._path(root, "mean", m), self.num_outputs, self.dtype, rows).close()
            atomic_numpy_save(self._path(root, "slot", m), slot.numpy())
            atomic_numpy_save(self._path(root, "seen", m), np.zeros(self.num_samples, dtype=_INDEX))
        self._write_meta(root)
        self._open_files()

    def _open_files(self) -> None:
        """File-backed mode: open the storage directory's tables and map its per-sample arrays."""
        root, shape = self.storage, (self.num_samples,)
        try:
            for m in self.modalities:
                self._rows[m] = FileRows(self._path(root, "mean", m), self.num_outputs, self.dtype)
                for name, arrays in (("slot", self._slot), ("seen", self._seen)):
                    mm, array = map_npy(self._path(root, name, m), shape, _INDEX, writable=True)
                    self._maps.append(mm)
                    arrays[m] = torch.from_numpy(array)
                _check_layout(str(root / f"*.{m}.npy"), self._slot[m], self._seen[m],
                              len(self._rows[m]), self.window)
        except BaseException:
            self.close()
            raise

    @property
    def _chunk_rows(self) -> int:
        """Rows per step when streaming whole tables."""
        budget = _CHUNK_BYTES if self.storage is None else min(_CHUNK_BYTES, self.resident_budget)
        return max(1, budget // (self.num_outputs * self.dtype.itemsize))

    @staticmethod
    def _path(root: Path, kind: str, modality: str) -> Path:
        return root / f"{kind}.{modality}.npy"

    def _write_meta(self, root: Path) -> None:
        meta = {"format": _FORMAT, "version": _VERSION, **self._config}
        atomic_write(root / "bank.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))

    # ----------------------------------------------------------------- properties

    @property
    def first_epoch(self) -> int:
        """The first epoch recorded: ``total_epochs - window``."""
        return self.total_epochs - self.window

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's arrays (in memory, or in its files in file-backed mode).

        In memory this counts whole chunks: at most one chunk (``chunk_bytes``) a modality
        more than :meth:`estimate_nbytes` of the pairs stored.
        """
        rows = sum(table.nbytes for table in self._rows.values())
        return rows + len(self.modalities) * self.num_samples * _INDEX_BYTES

    @staticmethod
    def estimate_nbytes(
        num_samples: int, num_outputs: int, num_modalities: int, dtype: torch.dtype = torch.float16,
        pairs: Optional[int] = None,
    ) -> int:
        """Bytes a bank of this size holds: ``P * C * itemsize + 16 * M * N``.

        ``pairs`` (``P``) is the number of (sample, modality) pairs stored; by default every
        sample has every modality (``N * M``). Exact for a bank told its pairs with ``present``.
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        pairs = num_samples * num_modalities if pairs is None else pairs
        return pairs * num_outputs * itemsize + num_modalities * num_samples * _INDEX_BYTES

    def stored(self, modality: str) -> Tensor:
        """``(N,)`` bool: which samples have a row for ``modality`` (recorded or announced)."""
        self._check_modality("modality", modality)
        return self._slot[modality] >= 0

    def error_bound(self, max_abs: float = 1.0, updates: Optional[int] = None) -> float:
        """First-order bound on ``|stored mean - exact mean|`` after ``updates`` (default window).

        ``max_abs`` bounds the absolute value of the predictions (1 for probabilities). See the
        module notes for the derivation.
        """
        n = self.window if updates is None else updates
        info = torch.finfo(self.dtype)
        unit_roundoff = info.eps / 2
        half_subnormal = info.tiny * info.eps / 2
        return (n + 1) / 2 * ((unit_roundoff + 8 * 2.0**-24) * max_abs + half_subnormal)

    def config(self) -> dict:
        """The constructor arguments (modalities sorted, dtype by name), JSON-serialisable."""
        return dict(self._config)

    def __repr__(self) -> str:
        where = "memory" if self.storage is None else f"storage={str(self.storage)!r}"
        return (
            f"PseudoLabelBank(num_samples={self.num_samples}, num_outputs={self.num_outputs}, "
            f"modalities={self.modalities}, window={self.window}, "
            f"total_epochs={self.total_epochs}, dtype={self.dtype}, {where})"
        )

    # ----------------------------------------------------------------- checks

    def _check_modality(self, name: str, modality: Any) -> str:
        if modality not in self.modalities:
            raise ValueError(f"{name}: unknown modality {modality!r}, expected one of {self.modalities}")
        return modality

    def _check_indices(self, name: str, indices: Any) -> Tensor:
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices)
        check_tensor(name, indices, ("B",))
        indices = check_ids(name, indices, self.num_samples, "sample ids")
        return indices

    def _check_epoch(self, epoch: Any) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch: expected an int, got {type(epoch).__name__} {epoch!r}")
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(
                f"epoch: expected 0 <= epoch < total_epochs={self.total_epochs}, got {epoch}"
            )
        return int(epoch)

    # ----------------------------------------------------------------- update / lookup

    def update(self, modality: str, indices: Tensor, predictions: Tensor, epoch: int) -> None:
        """Record one epoch's predictions of ``modality`` for the samples ``indices``.

        Every argument is checked first; the bank is unchanged when an error is raised. Epochs
        before :attr:`first_epoch` are checked and ignored. A sample may miss epochs (it is then
        averaged over those it has) but may not be recorded twice for one epoch: gather the
        predictions of all ranks and drop duplicates (a ``DistributedSampler`` pads with
        repeats) before calling this.

        Args:
            modality: one of :attr:`modalities`.
            indices: ``(B,)`` integer sample ids in ``[0, N)``, no duplicates.
            predictions: ``(B, C)`` floating predictions (any device and float dtype), finite
                and within the storage dtype's range.
            epoch: the epoch, ``0 <= epoch < total_epochs``.

        Raises:
            ValueError: unknown modality, ids out of range or repeated, a sample already
                recorded at this epoch, wrong width, lengths that differ, NaN/inf or values
                too large for the storage dtype, epoch out of range.

        Shape:
            - indices: ``(B,)``
            - predictions: ``(B, C)``
        """
        self._check_modality("modality", modality)
        epoch = self._check_epoch(epoch)
        indices = self._check_indices("indices", indices)
        sizes = {"B": int(indices.shape[0]), "C": self.num_outputs}
        check_tensor("predictions", predictions, ("B", "C"), sizes, floating=True)
        x = predictions.detach().to("cpu", torch.float32)
        if x.numel():
            low, high = (float(v) for v in torch.aminmax(x))  # one pass: NaN, inf and range
            if not (np.isfinite(low) and np.isfinite(high)):
                check_finite("predictions", x)
            limit = torch.finfo(self.dtype).max
            if max(-low, high) > limit:
                raise ValueError(
                    f"predictions: values up to {max(-low, high):.4g} overflow the bank's "
                    f"dtype {self.dtype} (max {limit:.4g})"
                )
        if indices.numel() != torch.unique(indices).numel():
            values, counts = torch.unique(indices, return_counts=True)
            raise ValueError(
                f"indices: expected no duplicates, got {int((counts > 1).sum())} ids repeated, "
                f"e.g. {format_indices(values[counts > 1])}"
            )
        if epoch < self.first_epoch or indices.numel() == 0:
            return
        bit = 1 << (epoch - self.first_epoch)
        seen = self._seen[modality].index_select(0, indices)
        again = (seen & bit) != 0
        if bool(again.any()):
            raise ValueError(
                f"indices: {int(again.sum())} of {indices.numel()} samples were already recorded "
                f"for modality {modality!r} at epoch {epoch}, e.g. {format_indices(indices[again])}"
            )
        slots = self._slots_adding_rows(modality, indices)
        weight = 1.0 / (_popcount(seen, self.window).to(torch.float32) + 1.0)
        mean = self._rows[modality].gather(slots).float()  # new rows read as zeros
        mean.lerp_(x, weight[:, None])  # m + (x - m) / (count + 1), exact x on the first update
        self._rows[modality].scatter(slots, mean.to(self.dtype))
        self._seen[modality].index_copy_(0, indices, seen | bit)

    def _slots_adding_rows(self, modality: str, indices: Tensor) -> Tensor:
        """The rows of ``indices``, adding one (zeros) for each sample that has none yet."""
        slots = self._slot[modality].index_select(0, indices)
        new = slots < 0
        if bool(new.any()):
            count = int(new.sum())
            first = self._rows[modality].grow(count)
            slots[new] = torch.arange(first, first + count)
            self._slot[modality].index_copy_(0, indices[new], slots[new])
        return slots

    def counts(self, modality: str, indices: Optional[Tensor] = None) -> Tensor:
        """Epochs of the window recorded per sample, ``(B,)`` int64 (all ``N`` when no ids)."""
        self._check_modality("modality", modality)
        seen = self._seen[modality]
        if indices is not None:
            seen = seen[self._check_indices("indices", indices)]
        return _popcount(seen, self.window)

    def targets(
        self,
        indices: Tensor,
        present: Mapping[str, Tensor],
        ground_truth: Optional[Tensor] = None,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """Pseudo-labels of a batch: each sample's averaged prediction, as float32.

        A sample with one present modality gets that modality's average. A sample with several
        gets the average closest in cosine similarity to ``ground_truth`` (ties: the first
        modality in sorted order). Without ground truth such a sample is an error rather than
        a silent average of modalities: the paper's rule needs the ground truth, and
        pseudo-labels are only used in training, where it is at hand.

        Args:
            indices: ``(B,)`` sample ids.
            present: modality -> ``(B,)`` bool, which samples have it (modalities left out are
                absent); every modality must be one of the bank's.
            ground_truth: ``(B,)`` integer class labels in ``[0, C)`` (compared as one-hot),
                or ``(B, C)`` target vectors (regression values, text embeddings). Needed only
                when a sample has several modalities.
            device: where to put the result (default CPU).

        Raises:
            ValueError: ids out of range, unknown modality, a sample with no modality, a present
                modality never recorded for a sample, several modalities and no ground truth,
                bad ground truth.

        Shape:
            - indices: ``(B,)``
            - present: each ``(B,)``
            - ground_truth: ``(B,)`` or ``(B, C)``
            - output: ``(B, C)`` float32
        """
        indices = self._check_indices("indices", indices)
        batch = int(indices.shape[0])
        if not isinstance(present, Mapping) or not present:
            raise ValueError(f"present: expected a non-empty mapping of modality -> (B,) bool, got {present!r}")
        masks: dict[str, Tensor] = {}
        for m in sorted(present):
            self._check_modality("present", m)
            check_bool_mask(f"present[{m!r}]", present[m], ("B",), {"B": batch})
            masks[m] = present[m].detach().to("cpu")
        num_present = sum(mask.long() for mask in masks.values())
        none = num_present == 0
        if bool(none.any()):
            raise ValueError(
                f"present: {int(none.sum())} of {batch} samples have no modality, rows "
                f"{format_indices(none.nonzero().flatten())}"
            )
        several = bool((num_present > 1).any())
        gt = self._check_ground_truth(ground_truth, batch) if ground_truth is not None else None
        if several and gt is None:
            raise ValueError(
                f"ground_truth: required to choose between modalities, "
                f"{int((num_present > 1).sum())} of {batch} samples have several, rows "
                f"{format_indices((num_present > 1).nonzero().flatten())}"
            )
        for m, mask in masks.items():
            ids = indices[mask]
            never = self._seen[m][ids] == 0
            if bool(never.any()):
                raise ValueError(
                    f"present: modality {m!r} was never recorded (in epochs "
                    f"{self.first_epoch}..{self.total_epochs - 1}) for {int(never.sum())} of "
                    f"{ids.numel()} samples, e.g. ids {format_indices(ids[never])}"
                )
        out = torch.zeros(batch, self.num_outputs, dtype=torch.float32)
        best = torch.full((batch,), -float("inf"))
        for m, mask in masks.items():
            rows = mask.nonzero().flatten()
            values = self._rows[m].gather(self._slot[m][indices[rows]]).float()
            score = self._cosine(values, gt, rows) if several else torch.zeros(rows.numel())
            better = score > best[rows]
            out[rows[better]] = values[better]
            best[rows[better]] = score[better]
        return out if device is None else out.to(device)

    def _check_ground_truth(self, ground_truth: Any, batch: int) -> Tensor:
        check_tensor("ground_truth", ground_truth)
        if ground_truth.dim() == 1:
            check_tensor("ground_truth", ground_truth, ("B",), {"B": batch})
            return check_ids("ground_truth", ground_truth, self.num_outputs, "class labels")
        check_tensor("ground_truth", ground_truth, ("B", "C"),
                     {"B": batch, "C": self.num_outputs}, floating=True)
        check_finite("ground_truth", ground_truth)
        return ground_truth.detach().to("cpu", torch.float32)

    @staticmethod
    def _cosine(values: Tensor, gt: Tensor, rows: Tensor) -> Tensor:
        norm = values.norm(dim=1).clamp_min(1e-12)
        if gt.dim() == 1:  # one-hot ground truth: cos = values[label] / |values|
            return values.gather(1, gt[rows][:, None]).squeeze(1) / norm
        target = gt[rows]
        return (values * target).sum(1) / (norm * target.norm(dim=1).clamp_min(1e-12))

    # ----------------------------------------------------------------- memory and files

    def release(self) -> None:
        """File-backed mode: drop the mapped pages of the per-sample arrays from the process.

        The means are never mapped (see the module notes), so this frees at most ``16 * N``
        bytes a modality; the data stays in the files. A no-op in memory.
        """
        if hasattr(mmap, "MADV_DONTNEED"):
            for mm in self._maps:
                mm.madvise(mmap.MADV_DONTNEED)

    def flush(self) -> None:
        """File-backed mode: write everything to the storage device (``msync``, ``fsync``).

        Every update is in the files (the page cache) as soon as it returns, and other readers
        of the files see it; ``flush`` makes it durable. A no-op in memory.
        """
        for mm in self._maps:
            mm.flush()
        for table in self._rows.values():
            table.flush()

    def close(self) -> None:
        """Flush and close the files (file-backed mode). The bank is unusable afterwards."""
        self.flush()
        maps, self._maps = self._maps, []
        tables, self._rows = self._rows, {}
        self._slot, self._seen = {}, {}
        for table in tables.values():
            table.close()
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the map closes when it is freed
                pass

    def __enter__(self) -> "PseudoLabelBank":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def save(self, path: PathLike) -> None:
        """Write the bank to the directory ``path`` (created), every file atomically.

        Layout (see the module notes): ``mean.<modality>.npy`` ``(P_m, C)`` rows,
        ``slot.<modality>.npy`` ``(N,)`` int64 row of each sample (``-1``: none),
        ``seen.<modality>.npy`` ``(N,)`` int64 epoch bit masks, then ``bank.json`` (written
        last: a directory with ``bank.json`` is complete). Saving a file-backed bank to its own
        storage just flushes it.
        """
        root = Path(path).resolve()
        if self.storage is not None and root == self.storage:
            self.flush()
            self._write_meta(root)
            return
        root.mkdir(parents=True, exist_ok=True)
        for m in self.modalities:
            save_rows(self._path(root, "mean", m), self._rows[m], self._chunk_rows)
            atomic_numpy_save(self._path(root, "slot", m), self._slot[m].numpy())
            atomic_numpy_save(self._path(root, "seen", m), self._seen[m].numpy())
        self._write_meta(root)

    @classmethod
    def load(cls, path: PathLike, mmap: bool = False, resident_budget: int = 64 << 20) -> "PseudoLabelBank":
        """Read a bank written by :meth:`save` (or a ``storage`` directory), bit-exactly.

        Args:
            path: the directory.
            mmap: keep working on the files in place (file-backed mode, as ``storage=path``:
                later updates modify the files) instead of reading them into memory. The name
                is historical: the means are read and written with positioned I/O, not mapped.
            resident_budget: as in the constructor.

        Raises:
            FileNotFoundError: no ``bank.json`` in ``path``.
            ValueError: another format or version (banks saved before version 2 cannot be
                read), or files that disagree with ``bank.json`` or with each other.
        """
        root = Path(path)
        config = cls._read_meta(root)
        bank = cls.__new__(cls)
        bank._init(config, root if mmap else None, resident_budget)
        if mmap:
            bank._open_files()
        else:
            bank._copy_from_files(root)
        return bank

    @staticmethod
    def _read_meta(root: Path) -> dict:
        meta_path = root / "bank.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"path: no PseudoLabelBank in {root} (bank.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(
                f"{meta_path}: expected format {_FORMAT!r} version {_VERSION}, got "
                f"{meta.get('format')!r} version {meta.get('version')!r} (version 1 banks, one row "
                f"for every sample and modality, cannot be read: rerun the unimodal stage)"
            )
        config = {k: meta[k] for k in
                  ("num_samples", "num_outputs", "modalities", "window", "total_epochs", "dtype")}
        if config["dtype"] not in _DTYPE_BY_NAME:
            raise ValueError(f"{meta_path}: unknown dtype {config['dtype']!r}")
        PseudoLabelBank._check_config(
            config["num_samples"], config["num_outputs"], config["modalities"], config["window"],
            config["total_epochs"], _DTYPE_BY_NAME[config["dtype"]])
        return config

    def _replace(self, modality: str, slot: Tensor, seen: Tensor, rows: int,
                 blocks: Iterable[Tensor]) -> None:
        """Make ``modality``'s table the ``rows`` rows of ``blocks``, with these per-sample arrays."""
        if self.storage is None:
            table = self._memory_rows()
            self._slot[modality] = slot.clone()
            self._seen[modality] = seen.clone()
        else:
            table = self._rows[modality]
            table.truncate()
            self._slot[modality].copy_(slot)
            self._seen[modality].copy_(seen)
        table.grow(rows, exact=True)
        start = 0
        for block in blocks:
            table.write(start, block)
            start += block.shape[0]
        self._rows[modality] = table

    def _copy_from_files(self, root: Path) -> None:
        """Read the bank in the directory ``root`` (its config already checked) into this one."""
        shape = (self.num_samples,)
        for m in self.modalities:
            source = FileRows(self._path(root, "mean", m), self.num_outputs, self.dtype, writable=False)
            try:
                arrays = []
                for name in ("slot", "seen"):
                    mm, array = map_npy(self._path(root, name, m), shape, _INDEX, writable=False)
                    arrays.append(torch.from_numpy(array.copy()))
                    del array
                    mm.close()
                _check_layout(str(root / f"*.{m}.npy"), *arrays, len(source), self.window)
                self._replace(m, *arrays, len(source), source.blocks(self._chunk_rows))
            finally:
                source.close()

    def state_dict(self) -> dict:
        """The bank's state for a checkpoint.

        In memory: ``{"config": ..., "slot": {m: (N,)}, "seen": {m: (N,)}, "mean": {m: [blocks]}}``
        with the rows of modality ``m`` as a list of ``(r, C)`` blocks in row order (concatenate
        them for the ``(P_m, C)`` table). The tensors are the bank's own (not copies, as
        ``nn.Module.state_dict``; ``torch.save`` copies them), except a partly filled last chunk
        of rows, copied so that a checkpoint holds no unused rows. In file-backed mode the
        files are flushed and the state only references them: ``{"config": ..., "storage":
        "<path>"}``, so a checkpoint is as small as a path, the files must be kept with it, and
        they go on changing with later updates (save a copy with :meth:`save` for a frozen
        snapshot).
        """
        state: dict = {"config": self.config()}
        if self.storage is not None:
            self.flush()
            self._write_meta(self.storage)
            state["storage"] = str(self.storage)
            return state
        state["slot"] = dict(self._slot)
        state["seen"] = dict(self._seen)
        state["mean"] = {m: self._state_blocks(m) for m in self.modalities}
        return state

    def _state_blocks(self, modality: str) -> list[Tensor]:
        table = self._rows[modality]
        # torch.save writes the whole storage of a view: copy a block that is part of a chunk
        blocks = [b if b.nbytes == b.untyped_storage().nbytes() else b.clone()
                  for b in table.blocks(max(1, len(table)))]
        return blocks or [torch.zeros(0, self.num_outputs, dtype=self.dtype)]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (either kind) into this bank, whose config must match.

        ``state["mean"][m]`` may also be one ``(P_m, C)`` tensor instead of a list of blocks.
        """
        config = state.get("config") if isinstance(state, Mapping) else None
        if config != self.config():
            raise ValueError(f"state: expected config {self.config()}, got {config}")
        if "storage" in state:
            root = Path(state["storage"]).resolve()
            if self.storage is not None and root == self.storage:
                return
            self._copy_from_files(root)
            return
        checked = {m: self._check_state(state, m) for m in self.modalities}  # all before any change
        for m, (slot, seen, blocks) in checked.items():
            self._replace(m, slot, seen, sum(b.shape[0] for b in blocks), blocks)

    def _check_state(self, state: Mapping[str, Any], m: str) -> tuple[Tensor, Tensor, list[Tensor]]:
        slot, seen, mean = state["slot"][m], state["seen"][m], state["mean"][m]
        blocks = [mean] if isinstance(mean, Tensor) else list(mean)
        for name, value in (("slot", slot), ("seen", seen)):
            check_tensor(f"state[{name!r}][{m!r}]", value, (self.num_samples,))
            if value.dtype != torch.int64:
                raise TypeError(f"state[{name!r}][{m!r}]: expected int64, got {value.dtype}")
        for i, block in enumerate(blocks):
            check_tensor(f"state['mean'][{m!r}][{i}]", block, ("r", self.num_outputs))
            if block.dtype != self.dtype:
                raise TypeError(f"state['mean'][{m!r}][{i}]: expected {self.dtype}, got {block.dtype}")
        _check_layout(f"state[...][{m!r}]", slot, seen, sum(b.shape[0] for b in blocks), self.window)
        return slot, seen, blocks
