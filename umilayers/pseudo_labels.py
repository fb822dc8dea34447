"""Pseudo-labels: per-sample unimodal predictions averaged over the last epochs of training.

The paper's dual-branch prediction supervises its second branch with pseudo-labels: the average
of a sample's unimodal predictions over the last ``window`` (``e``) of the ``total_epochs``
epochs of unimodal training; where a sample has several modalities, the modality whose
pseudo-label is closest (cosine similarity) to the ground truth is used
(:func:`closest_to_truth`, the one implementation of that rule).

Memory model
------------
:class:`PseudoLabelBank` keeps, in memory, one row per (sample, modality) pair recorded inside
the window: the running **mean** of its predictions (``C`` values in ``dtype``, float16 by
default; a mean, unlike a sum, cannot overflow). Per modality and sample it also keeps two
``int64``: the sample's row (``-1``: none) and a bit mask of the epochs of the window recorded,
which gives the per-sample count (a sample missed in some epochs is averaged over those it
has) and catches an epoch recorded twice. Rows live in chunks of 16 MiB (at most ``ceil(N / 8)``
rows, and never beyond the ``N``-th row): growing copies nothing. So memory is
``P * C * itemsize + 16 * M * N`` bytes for ``P`` pairs, plus at most one partly used chunk a
modality: at EPIC-Kitchens size (62,429 samples, 3,806 classes, two splits of one modality
each, float16) 505 MB; a row for every sample and modality takes 952 MB and one float16 slot
per epoch 9.5 GB.

Float16 error bound
-------------------
Each update computes ``m_k = m_{k-1} + (x_k - m_{k-1}) / k`` in float32 and rounds once to the
storage dtype. A rounding error made at step ``k`` is scaled by ``k / n`` by the time ``n``
updates are recorded, so with unit roundoff ``u`` of the storage dtype (``2^-11`` for float16),
its smallest subnormal spacing ``s`` (``2^-24``) and ``A = max |x|``::

    |stored mean - exact mean| <= (n + 1) / 2 * ((u + 8 * 2^-24) * A + s / 2)

(to first order; the ``8 * 2^-24`` covers the float32 arithmetic): ``2.7e-3`` in float16 and
``3.0e-6`` in float32 for probabilities and ``n = 10``. :meth:`PseudoLabelBank.error_bound`
returns it; the tests hold the bank to it against a float64 numpy reference.

On disk
-------
:meth:`PseudoLabelBank.save` writes a directory: per modality ``mean.<modality>.npy``
``(P_m, C)`` (the rows in the order they were created; bfloat16 as its raw bits, ``<u2``),
``slot.<modality>.npy`` and ``seen.<modality>.npy`` (``(N,)`` int64: each sample's row or
``-1``, and its epoch mask), then ``bank.json`` (format version 2), each file written to a
temporary name and renamed. :meth:`PseudoLabelBank.load` reads it back bit-exactly.

Epochs are counted from 0: the window is ``total_epochs - window <= epoch < total_epochs``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence, Union, cast

import numpy as np
import torch
from torch import Tensor

from umilayers._io import atomic_numpy_save, atomic_write, atomic_write_json, read_json
from umilayers._validation import (
    check_bool_mask,
    check_finite,
    check_ids,
    check_positive_int,
    check_tensor,
    format_indices,
)

__all__ = ["MAX_WINDOW", "PseudoLabelBank", "closest_to_truth"]

PathLike = Union[str, "os.PathLike[str]"]

_FORMAT = "umilayers.PseudoLabelBank"
_VERSION = 2  # 1: one row for every sample and modality (never released, not read)
#: The most epochs a bank averages (``window``): the bits of the int64 mask that stay non-negative.
MAX_WINDOW = 63
_MODALITY_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_DTYPE_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NAME_BY_DTYPE = {dtype: name for name, dtype in _DTYPE_BY_NAME.items()}
_FILE_DTYPE: dict[torch.dtype, np.dtype] = {
    torch.float16: np.dtype("<f2"), torch.bfloat16: np.dtype("<u2"), torch.float32: np.dtype("<f4")
}
_INDEX_BYTES = 16  # per sample and modality: its row and its epoch mask, int64 each
_CHUNK_BYTES = 16 << 20


def closest_to_truth(candidates: Tensor, available: Tensor, truth: Tensor) -> Tensor:
    """For each sample, the candidate closest (cosine) to its ground truth among those it has.

    The paper's rule for a sample with several modalities: its pseudo-label is the one of the
    modality whose pseudo-label has the highest cosine similarity with the ground truth. Ties
    go to the first candidate. Inputs are trusted: every sample has at least one candidate.

    Args:
        candidates: ``(M, B, C)`` one candidate per modality (rows a sample lacks are ignored).
        available: ``(M, B)`` bool, which candidates each sample has.
        truth: ``(B,)`` integer class labels (compared as one-hot), ``(B, C)`` target vectors,
            or ``(M, B, C)`` one target per candidate (e.g. a caption embedded in each unimodal
            model's own space).

    Shape:
        - candidates: ``(M, B, C)``
        - available: ``(M, B)``
        - truth: ``(B,)``, ``(B, C)`` or ``(M, B, C)``
        - output: ``(B, C)``

    Example::

        >>> import torch
        >>> candidates = torch.tensor([[[0.7, 0.3], [0.6, 0.4]], [[0.2, 0.8], [0.1, 0.9]]])
        >>> available = torch.tensor([[True, False], [True, True]])
        >>> closest_to_truth(candidates, available, torch.tensor([0, 0]))  # row 1 has one candidate
        tensor([[0.7000, 0.3000],
                [0.1000, 0.9000]])
    """
    norm = candidates.norm(dim=-1).clamp_min(1e-12)
    if truth.dim() == 1:  # one-hot ground truth: cos = candidate[label] / |candidate|
        labels = truth.expand(candidates.shape[0], -1)[..., None]
        score = candidates.gather(-1, labels).squeeze(-1) / norm
    else:
        score = (candidates * truth).sum(-1) / (norm * truth.norm(dim=-1).clamp_min(1e-12))
    best = score.masked_fill(~available, -float("inf")).argmax(0)  # the first maximum on ties
    return candidates[best, torch.arange(candidates.shape[1], device=candidates.device)]


def _popcount(bits: Tensor, width: int) -> Tensor:
    count = torch.zeros_like(bits)
    for b in range(width):
        count += (bits >> b) & 1
    return count


def _check_config(num_samples, num_outputs, modalities, window, total_epochs, dtype) -> dict:
    """The constructor's arguments checked, as the JSON-serialisable config of a bank."""
    for name, value in (("num_samples", num_samples), ("num_outputs", num_outputs),
                        ("window", window), ("total_epochs", total_epochs)):
        check_positive_int(name, value)
    if window > total_epochs or window > MAX_WINDOW:
        raise ValueError(f"window: expected 1 <= window <= min(total_epochs={total_epochs}, "
                         f"{MAX_WINDOW}), got {window}")
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise TypeError(f"modalities: expected a sequence of names, got {modalities!r}")
    names = list(modalities)
    if not names:
        raise ValueError("modalities: expected at least one modality, got none")
    if len(set(names)) != len(names):
        raise ValueError(f"modalities: expected unique names, got {names}")
    for name in names:
        if not isinstance(name, str) or not _MODALITY_NAME.match(name):
            raise ValueError(f"modalities: names may hold letters, digits, '_' and '-', got {name!r}")
    if dtype not in _NAME_BY_DTYPE:
        raise ValueError(f"dtype: expected one of torch.float16, torch.bfloat16, torch.float32, got {dtype}")
    return {"num_samples": num_samples, "num_outputs": num_outputs, "modalities": sorted(names),
            "window": window, "total_epochs": total_epochs, "dtype": _NAME_BY_DTYPE[dtype]}


def _check_layout(where: str, slot: Tensor, seen: Tensor, rows: int, window: int) -> None:
    """A saved or restored bank's per-sample arrays agree with its ``rows`` rows and window."""
    stored = slot[slot >= 0]
    if stored.numel() != rows or bool((slot < -1).any()) or (
            rows and (int(stored.max()) >= rows or torch.unique(stored).numel() != rows)):
        raise ValueError(
            f"{where}: expected slot to give each of the {rows} rows to exactly one sample and -1 "
            f"to the others, got {stored.numel()} samples with rows in "
            f"[{int(slot.min()) if slot.numel() else 0}, {int(slot.max()) if slot.numel() else 0}]")
    orphan = (seen != 0) & (slot < 0)
    if bool(orphan.any()):
        raise ValueError(f"{where}: {int(orphan.sum())} samples were recorded but have no row, "
                         f"e.g. {format_indices(orphan.nonzero().flatten())}")
    if bool(((seen >> window) != 0).any()):  # also catches negative masks
        raise ValueError(f"{where}: epoch masks hold bits beyond the window of {window} epochs")


def _raw(rows: Tensor) -> np.ndarray:
    """The bytes of CPU rows as numpy (bfloat16, which numpy lacks, as ``uint16``)."""
    return (rows.view(torch.uint16) if rows.dtype == torch.bfloat16 else rows).numpy()


class PseudoLabelBank:
    """Running averages of per-sample unimodal predictions over the last ``window`` epochs.

    Call :meth:`update` once per epoch (and modality) with the predictions of the unimodal
    model for the samples it saw: classification softmax probabilities, regression values, or
    L2-normalised video embeddings for retrieval. Updates of epochs before
    ``total_epochs - window`` are checked and ignored; later ones are folded into a running
    mean, one row per (sample, modality) pair recorded, so memory is ``O(P * C)`` for ``P``
    pairs (see the module notes for the memory model and the float16 error bound).
    :meth:`targets` then gives the pseudo-labels of a batch. In distributed training every rank
    holds its own bank and updates it with the predictions gathered from all ranks, so the
    banks stay identical.

    Args:
        num_samples: ``N``, the number of training samples (global ids ``0 .. N-1``).
        num_outputs: ``C``, the width of a prediction (classes, outputs or embedding size).
        modalities: names of the modalities (letters, digits, ``_`` and ``-``).
        window: ``e``, the number of last epochs averaged (1 to 63, at most ``total_epochs``).
        total_epochs: epochs of unimodal training; epochs are numbered ``0 .. total_epochs-1``.
        dtype: storage dtype of the means: ``torch.float16`` (default), ``torch.bfloat16`` or
            ``torch.float32``.

    Raises:
        ValueError: bad sizes, window, modality names or dtype.

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

    def __init__(self, num_samples: int, num_outputs: int, modalities: Sequence[str], window: int,
                 total_epochs: int, dtype: torch.dtype = torch.float16) -> None:
        self._init(_check_config(num_samples, num_outputs, modalities, window, total_epochs, dtype))

    def _init(self, config: dict) -> None:
        self._config = dict(config)
        self.num_samples: int = config["num_samples"]
        self.num_outputs: int = config["num_outputs"]
        self.modalities: list[str] = list(config["modalities"])
        self.window: int = config["window"]
        self.total_epochs: int = config["total_epochs"]
        self.dtype: torch.dtype = _DTYPE_BY_NAME[config["dtype"]]
        # A modality has at most N rows: chunks of at most N/8 rows keep a small bank that
        # learns its rows from being as large as a row for every sample.
        row_bytes = self.num_outputs * self.dtype.itemsize
        self._chunk_rows = max(1, min(_CHUNK_BYTES // row_bytes, -(-self.num_samples // 8)))
        self._chunks: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        self._rows = dict.fromkeys(self.modalities, 0)  # rows in use
        self._slot = {m: torch.full((self.num_samples,), -1, dtype=torch.int64) for m in self.modalities}
        self._seen = {m: torch.zeros(self.num_samples, dtype=torch.int64) for m in self.modalities}

    # ----------------------------------------------------------------- rows

    def _add_rows(self, modality: str, count: int) -> int:
        """Append ``count`` zero rows to ``modality``'s table; returns the first new row."""
        first = self._rows[modality]
        self._rows[modality] += count
        chunks, size = self._chunks[modality], self._chunk_rows
        while len(chunks) * size < self._rows[modality]:  # a modality has N rows at most
            rows = min(size, self.num_samples - len(chunks) * size)
            chunks.append(torch.zeros(rows, self.num_outputs, dtype=self.dtype))
        return first

    def _by_chunk(self, modality: str, rows: Tensor):
        """``(chunk, positions in rows, offsets in the chunk)`` for each chunk ``rows`` touch."""
        chunks = self._chunks[modality]
        chunk = rows.div(self._chunk_rows, rounding_mode="floor")
        order = torch.argsort(chunk)  # one sort, then a slice of it per chunk
        counts = torch.bincount(chunk, minlength=len(chunks)).tolist()
        offsets = rows[order] - chunk[order] * self._chunk_rows
        for c, where, offset in zip(chunks, torch.split(order, counts), torch.split(offsets, counts)):
            if where.numel():
                yield c, where, offset

    def _gather(self, modality: str, rows: Tensor) -> Tensor:
        out = torch.empty(rows.numel(), self.num_outputs, dtype=self.dtype)
        for chunk, where, offset in self._by_chunk(modality, rows):
            out.index_copy_(0, where, chunk.index_select(0, offset))
        return out

    def _scatter(self, modality: str, rows: Tensor, values: Tensor) -> None:
        for chunk, where, offset in self._by_chunk(modality, rows):
            chunk.index_copy_(0, offset, values.index_select(0, where))

    def _blocks(self, modality: str) -> list[Tensor]:
        """The rows in use, in order, as views of the chunks (the last one cut to its rows)."""
        used, size = self._rows[modality], self._chunk_rows
        return [c[:min(size, used - k * size)] for k, c in enumerate(self._chunks[modality])]

    # ----------------------------------------------------------------- properties

    @property
    def first_epoch(self) -> int:
        """The first epoch recorded: ``total_epochs - window``."""
        return self.total_epochs - self.window

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank: the chunks of rows and 16 bytes a sample and modality."""
        rows = sum(len(c) for chunks in self._chunks.values() for c in chunks)
        return rows * self.num_outputs * self.dtype.itemsize + len(self.modalities) * self.num_samples * _INDEX_BYTES

    def stored(self, modality: str) -> Tensor:
        """``(N,)`` bool: which samples have a row for ``modality``."""
        self._check_modality("modality", modality)
        return self._slot[modality] >= 0

    def counts(self, modality: str, indices: Optional[Tensor] = None) -> Tensor:
        """Epochs of the window recorded per sample, ``(B,)`` int64 (all ``N`` when no ids)."""
        self._check_modality("modality", modality)
        seen = self._seen[modality]
        if indices is not None:
            seen = seen[self._check_indices("indices", indices)]
        return _popcount(seen, self.window)

    def error_bound(self, max_abs: float = 1.0, updates: Optional[int] = None) -> float:
        """First-order bound on ``|stored mean - exact mean|`` after ``updates`` (default window).

        ``max_abs`` bounds the absolute value of the predictions (1 for probabilities). See the
        module notes for the derivation.
        """
        n = self.window if updates is None else updates
        info = torch.finfo(self.dtype)
        return (n + 1) / 2 * ((info.eps / 2 + 8 * 2.0**-24) * max_abs + info.tiny * info.eps / 2)

    def config(self) -> dict:
        """The constructor arguments (modalities sorted, dtype by name), JSON-serialisable."""
        return dict(self._config)

    def __repr__(self) -> str:
        return (f"PseudoLabelBank(num_samples={self.num_samples}, num_outputs={self.num_outputs}, "
                f"modalities={self.modalities}, window={self.window}, "
                f"total_epochs={self.total_epochs}, dtype={self.dtype})")

    # ----------------------------------------------------------------- checks

    def _check_modality(self, name: str, modality: Any) -> str:
        if modality not in self.modalities:
            raise ValueError(f"{name}: unknown modality {modality!r}, expected one of {self.modalities}")
        return modality

    def _check_indices(self, name: str, indices: Any) -> Tensor:
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices)
        check_tensor(name, indices, ("B",))
        return check_ids(name, indices, self.num_samples, "sample ids")

    def _check_epoch(self, epoch: Any) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch: expected an int, got {type(epoch).__name__} {epoch!r}")
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch: expected 0 <= epoch < total_epochs={self.total_epochs}, got {epoch}")
        return int(epoch)

    def _check_predictions(self, predictions: Any, batch: int) -> Tensor:
        check_tensor("predictions", predictions, ("B", "C"), {"B": batch, "C": self.num_outputs},
                     floating=True)
        x = predictions.detach().to("cpu", torch.float32)
        if x.numel():
            low, high = (float(v) for v in torch.aminmax(x))  # one pass: NaN, inf and range
            if not (np.isfinite(low) and np.isfinite(high)):
                check_finite("predictions", x)
            limit = torch.finfo(self.dtype).max
            if max(-low, high) > limit:
                raise ValueError(f"predictions: values up to {max(-low, high):.4g} overflow the bank's "
                                 f"dtype {self.dtype} (max {limit:.4g})")
        return x

    def _check_ground_truth(self, ground_truth: Any, batch: int) -> Tensor:
        check_tensor("ground_truth", ground_truth)
        if ground_truth.dim() == 1:
            check_tensor("ground_truth", ground_truth, ("B",), {"B": batch})
            return check_ids("ground_truth", ground_truth, self.num_outputs, "class labels")
        check_tensor("ground_truth", ground_truth, ("B", "C"), {"B": batch, "C": self.num_outputs}, floating=True)
        check_finite("ground_truth", ground_truth)
        return ground_truth.detach().to("cpu", torch.float32)

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
        x = self._check_predictions(predictions, int(indices.shape[0]))
        if indices.numel() != torch.unique(indices).numel():
            values, counts = torch.unique(indices, return_counts=True)
            raise ValueError(f"indices: expected no duplicates, got {int((counts > 1).sum())} ids repeated, "
                             f"e.g. {format_indices(values[counts > 1])}")
        if epoch < self.first_epoch or indices.numel() == 0:
            return
        bit = 1 << (epoch - self.first_epoch)
        seen = self._seen[modality].index_select(0, indices)
        again = (seen & bit) != 0
        if bool(again.any()):
            raise ValueError(
                f"indices: {int(again.sum())} of {indices.numel()} samples were already recorded "
                f"for modality {modality!r} at epoch {epoch}, e.g. {format_indices(indices[again])}")
        rows = self._slot[modality].index_select(0, indices)
        new = rows < 0
        if bool(new.any()):  # a row (zeros) for each pair recorded for the first time
            first = self._add_rows(modality, int(new.sum()))
            rows[new] = torch.arange(first, self._rows[modality])
            self._slot[modality].index_copy_(0, indices[new], rows[new])
        weight = 1.0 / (_popcount(seen, self.window).to(torch.float32) + 1.0)
        mean = self._gather(modality, rows).float()
        mean.lerp_(x, weight[:, None])  # m + (x - m) / (count + 1), exact x on the first update
        self._scatter(modality, rows, mean.to(self.dtype))
        self._seen[modality].index_copy_(0, indices, seen | bit)

    def targets(self, indices: Tensor, present: Mapping[str, Tensor], ground_truth: Optional[Tensor] = None,
                device: Optional[torch.device] = None) -> Tensor:
        """Pseudo-labels of a batch: each sample's averaged prediction, as float32.

        A sample with one present modality gets that modality's average. A sample with several
        gets the average closest in cosine similarity to ``ground_truth``
        (:func:`closest_to_truth`; ties: the first modality in sorted order). Without ground
        truth such a sample is an error rather than a silent average of modalities: the
        paper's rule needs the ground truth, and pseudo-labels are only used in training,
        where it is at hand.

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
        names = sorted(present)
        for m in names:
            self._check_modality("present", m)
            check_bool_mask(f"present[{m!r}]", present[m], ("B",), {"B": batch})
        available = torch.stack([present[m].detach().to("cpu") for m in names])  # (M, B)
        num_present = available.sum(0)
        if bool((num_present == 0).any()):
            none = (num_present == 0).nonzero().flatten()
            raise ValueError(f"present: {none.numel()} of {batch} samples have no modality, "
                             f"rows {format_indices(none)}")
        several = num_present > 1
        choose = bool(several.any())
        gt = None if ground_truth is None else self._check_ground_truth(ground_truth, batch)
        if choose and gt is None:
            raise ValueError(f"ground_truth: required to choose between modalities, {int(several.sum())} of "
                             f"{batch} samples have several, rows {format_indices(several.nonzero().flatten())}")
        for m, mask in zip(names, available):
            ids = indices[mask]
            never = self._seen[m][ids] == 0
            if bool(never.any()):
                raise ValueError(
                    f"present: modality {m!r} was never recorded (in epochs {self.first_epoch}.."
                    f"{self.total_epochs - 1}) for {int(never.sum())} of {ids.numel()} samples, "
                    f"e.g. ids {format_indices(ids[never])}")
        # one candidate a modality when a sample must choose, else every sample's one modality
        out = torch.zeros(len(names) if choose else 1, batch, self.num_outputs)
        for i, (m, mask) in enumerate(zip(names, available)):
            rows = mask.nonzero().flatten()
            out[i if choose else 0].index_copy_(0, rows, self._gather(m, self._slot[m][indices[rows]]).float())
        # gt is set whenever a sample must choose (refused above otherwise)
        out = closest_to_truth(out, available, cast(Tensor, gt)) if choose else out[0]
        return out if device is None else out.to(device)

    # ----------------------------------------------------------------- state and files

    def state_dict(self) -> dict:
        """The bank's state for a checkpoint: ``{"config", "slot", "seen", "mean"}``.

        ``slot[m]`` and ``seen[m]`` are ``(N,)`` int64; ``mean[m]`` holds the rows of modality
        ``m`` as a list of ``(r, C)`` blocks in row order (concatenate them for the ``(P_m, C)``
        table). The tensors are the bank's own (not copies, as ``nn.Module.state_dict``;
        ``torch.save`` copies them), except the partly used last chunk, copied so that a
        checkpoint holds no unused rows.
        """
        # torch.save writes the whole storage of a view: copy a block that is part of a chunk
        mean = {m: [b if b.nbytes == b.untyped_storage().nbytes() else b.clone() for b in self._blocks(m)]
                or [torch.zeros(0, self.num_outputs, dtype=self.dtype)] for m in self.modalities}
        return {"config": self.config(), "slot": dict(self._slot), "seen": dict(self._seen), "mean": mean}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this bank, whose config must match.

        ``state["mean"][m]`` may also be one ``(P_m, C)`` tensor instead of a list of blocks.
        Everything is checked before the bank changes.
        """
        config = state.get("config") if isinstance(state, Mapping) else None
        if config != self.config():
            raise ValueError(f"state: expected config {self.config()}, got {config}")
        checked = {m: self._check_state(state, m) for m in self.modalities}
        self._init(self._config)
        for m, (slot, seen, blocks) in checked.items():
            self._slot[m], self._seen[m] = slot.clone(), seen.clone()
            start = self._add_rows(m, sum(b.shape[0] for b in blocks))
            for block in blocks:
                self._scatter(m, torch.arange(start, start + block.shape[0]), block)
                start += block.shape[0]

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

    def save(self, path: PathLike) -> None:
        """Write the bank to the directory ``path`` (created), every file atomically.

        The layout is in the module notes; ``bank.json`` is written last, so a directory with
        ``bank.json`` is complete. Saving over a saved bank replaces it.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for m in self.modalities:
            header = {"descr": np.lib.format.dtype_to_descr(_FILE_DTYPE[self.dtype]), "fortran_order": False,
                      "shape": (self._rows[m], self.num_outputs)}

            def write(f: IO[bytes], m: str = m, header: dict = header) -> None:
                np.lib.format.write_array_header_1_0(f, header)
                for block in self._blocks(m):  # chunk by chunk: no copy of the table
                    f.write(_raw(block).data)

            atomic_write(root / f"mean.{m}.npy", write)
            atomic_numpy_save(root / f"slot.{m}.npy", self._slot[m].numpy())
            atomic_numpy_save(root / f"seen.{m}.npy", self._seen[m].numpy())
        atomic_write_json(root / "bank.json", {"format": _FORMAT, "version": _VERSION, **self._config})

    @classmethod
    def load(cls, path: PathLike) -> "PseudoLabelBank":
        """Read a bank written by :meth:`save`, bit-exactly.

        Raises:
            FileNotFoundError: no ``bank.json`` in ``path``.
            ValueError: another format or version (banks saved before version 2 cannot be
                read), or files that disagree with ``bank.json`` or with each other.
        """
        root = Path(path)
        meta_path = root / "bank.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"path: no PseudoLabelBank in {root} (bank.json missing)")
        meta = read_json(meta_path)
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(
                f"{meta_path}: expected format {_FORMAT!r} version {_VERSION}, got "
                f"{meta.get('format')!r} version {meta.get('version')!r} (version 1 banks, one row "
                f"for every sample and modality, cannot be read: rerun the unimodal stage)")
        keys = ("num_samples", "num_outputs", "modalities", "window", "total_epochs")
        if meta.get("dtype") not in _DTYPE_BY_NAME:
            raise ValueError(f"{meta_path}: unknown dtype {meta.get('dtype')!r}")
        bank = cls(**{k: meta[k] for k in keys}, dtype=_DTYPE_BY_NAME[meta["dtype"]])
        for m in bank.modalities:
            slot, seen = (bank._read_index(root / f"{name}.{m}.npy") for name in ("slot", "seen"))
            bank._slot[m], bank._seen[m] = slot, seen
            rows = bank._read_rows(m, root / f"mean.{m}.npy")
            _check_layout(str(root / f"*.{m}.npy"), slot, seen, rows, bank.window)
        return bank

    def _read_index(self, path: Path) -> Tensor:
        array = np.load(path, allow_pickle=False)
        if array.dtype != np.int64 or array.shape != (self.num_samples,):
            raise ValueError(f"{path}: expected an int64 array of shape ({self.num_samples},), "
                             f"got {array.dtype} shape {array.shape}")
        return torch.from_numpy(array)

    def _read_rows(self, modality: str, path: Path) -> int:
        """Read a ``mean`` file straight into new chunks (no copy of the table); returns its rows."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            if fortran or len(shape) != 2 or shape[1] != self.num_outputs or dtype != _FILE_DTYPE[self.dtype]:
                raise ValueError(f"{path}: expected a {_FILE_DTYPE[self.dtype]} array of shape "
                                 f"(P, {self.num_outputs}), got {dtype} shape {shape}"
                                 f"{' in Fortran order' if fortran else ''}")
            self._add_rows(modality, shape[0])
            for block in self._blocks(modality):
                data = _raw(block).data.cast("B")
                if f.readinto(data) != len(data):
                    raise ValueError(f"{path}: holds fewer bytes than its {shape[0]} rows of {self.num_outputs} values")
            if f.read(1):
                raise ValueError(f"{path}: holds more bytes than its {shape[0]} rows of {self.num_outputs} values")
        return shape[0]
