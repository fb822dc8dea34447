"""Pseudo-labels: per-sample unimodal predictions averaged over the last epochs of training.

The paper's dual-branch prediction supervises its second branch with pseudo-labels: the average
of a sample's unimodal predictions over the last ``window`` (``e``) of the ``total_epochs``
epochs of unimodal training; where a sample has several modalities, the modality whose
pseudo-label is closest (cosine similarity) to the ground truth is used.

Memory model
------------
:class:`PseudoLabelBank` keeps, per modality, the running **mean** of the predictions recorded
so far (``(N, C)`` in ``dtype``, float16 by default) and one ``int64`` bit mask per sample
saying which epochs of the window were recorded (bit ``epoch - first_epoch``). So memory is
``M * N * (C * itemsize + 8)`` bytes whatever the window: at EPIC-Kitchens size (62,429 samples,
3,806 classes, 2 modalities, float16) 951.4 MB, against 3.8 GB for a float32 sum and
9.5 GB for one float16 slot per epoch. The mask gives the per-sample count (samples missed in
some epochs are averaged over the epochs they had) and catches an epoch recorded twice.

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
``storage=path`` keeps the arrays in ``.npy`` files (``mean.<modality>.npy``,
``seen.<modality>.npy``, plus ``bank.json``) instead of memory. The means are not mapped: each
:meth:`PseudoLabelBank.update` and :meth:`PseudoLabelBank.targets` reads the rows of its batch
with positioned reads (``os.preadv``, sorted by row, adjacent rows coalesced into one call) into
a buffer of the batch's size and writes updated rows back with ``os.pwritev``, so the process
holds the batch and not the table: its resident set grows by a few MB at most, whatever ``N``.
The file data itself lives in the kernel's page cache, as for any file: shared, written back
in the background and reclaimed under memory pressure (a container's memory cgroup does count
it, as reclaimable cache). The small per-sample bit masks (8 bytes a sample) are memory-mapped.
Mapping the means instead made every touched row fault about three pages back in after each
release of the mapping, and at EPIC size cost 1.4 to 2.3 times the CPU time of this I/O.
:meth:`PseudoLabelBank.save` writes the same layout, every file to a temporary name in the
same folder and then renamed (``os.replace``), ``bank.json`` last;
:meth:`PseudoLabelBank.load` reads it back bit-exactly, in memory or file-backed.

Epochs are counted from 0: the window is ``total_epochs - window <= epoch < total_epochs``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from umilayers._io import atomic_write
from umilayers._validation import check_bool_mask, check_finite, check_positive_int, check_tensor

__all__ = ["PseudoLabelBank"]

PathLike = Union[str, "os.PathLike[str]"]

_FORMAT = "umilayers.PseudoLabelBank"
_VERSION = 1
_MAX_WINDOW = 63  # bits of the int64 mask that stay non-negative
_MODALITY_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# storage dtype -> (numpy dtype on disk, name in bank.json); bfloat16 is stored as its raw bits
_DTYPES = {
    torch.float16: (np.dtype("<f2"), "float16"),
    torch.bfloat16: (np.dtype("<u2"), "bfloat16"),
    torch.float32: (np.dtype("<f4"), "float32"),
}
_DTYPE_BY_NAME = {name: dt for dt, (_, name) in _DTYPES.items()}
_CHUNK_BYTES = 32 << 20  # rows copied per step when streaming a file


def _few(values: Tensor, limit: int = 5) -> str:
    items = [int(v) for v in values.flatten()[:limit]]
    more = ", ..." if values.numel() > limit else ""
    return "[" + ", ".join(map(str, items)) + more + "]"


def _popcount(bits: Tensor, width: int) -> Tensor:
    count = torch.zeros_like(bits)
    for b in range(width):
        count += (bits >> b) & 1
    return count


def _npy_header(shape: tuple, np_dtype: np.dtype) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np_dtype), "fortran_order": False, "shape": shape}


def _write_npy(path: Path, shape: tuple, np_dtype: np.dtype, read_rows, rows_per_chunk: int) -> None:
    """Write an ``.npy`` atomically from ``read_rows(start, stop) -> ndarray``, in row chunks."""

    def write(f):
        np.lib.format.write_array_header_1_0(f, _npy_header(shape, np_dtype))
        for start in range(0, shape[0], rows_per_chunk):
            f.write(np.ascontiguousarray(read_rows(start, min(shape[0], start + rows_per_chunk))).data)

    atomic_write(path, write)


def _create_npy(path: Path, shape: tuple, np_dtype: np.dtype) -> None:
    """Create a zero-filled ``.npy`` atomically (a sparse file: no data is written)."""
    nbytes = int(np.prod(shape)) * np_dtype.itemsize

    def write(f):
        np.lib.format.write_array_header_1_0(f, _npy_header(shape, np_dtype))
        f.truncate(f.tell() + nbytes)

    atomic_write(path, write)


def _read_npy_header(f, path: Path, shape: tuple, np_dtype: np.dtype) -> int:
    """Check an open ``.npy``'s dtype and shape; returns the offset of its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        file_shape, fortran, file_dtype = np.lib.format.read_array_header_1_0(f)
    else:
        file_shape, fortran, file_dtype = np.lib.format.read_array_header_2_0(f)
    if tuple(file_shape) != tuple(shape) or file_dtype != np_dtype or fortran:
        raise ValueError(
            f"{path}: expected a C-ordered {np_dtype} array of shape {tuple(shape)}, "
            f"got {file_dtype} shape {tuple(file_shape)} (fortran_order={fortran})"
        )
    return f.tell()


def _map_npy(path: Path, shape: tuple, np_dtype: np.dtype, writable: bool):
    """Map a ``.npy`` file; returns ``(mmap, ndarray)``. Checks its dtype and shape."""
    with open(path, "r+b" if writable else "rb") as f:
        offset = _read_npy_header(f, path, shape, np_dtype)
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(f.fileno(), 0, access=access)
    array = np.ndarray(shape, dtype=np_dtype, buffer=mm, offset=offset)
    return mm, array


def _iov_max() -> int:
    try:
        return max(1, min(1024, os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):
        return 16


_IOV_MAX = _iov_max()


class _RowFile:
    """The rows of a 2-d ``.npy`` file, read and written with positioned I/O (no mapping).

    Rows of a batch are sorted by position; each run of adjacent rows is one ``preadv`` /
    ``pwritev`` call scattering to (gathering from) the batch's rows in their original order.
    Where ``os.preadv`` is missing (Windows), a seek and a read or write per row.
    """

    def __init__(self, path: Path, shape: tuple, np_dtype: np.dtype, writable: bool) -> None:
        self.path, self.shape, self.np_dtype = path, tuple(shape), np_dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np_dtype.itemsize
        self._file = open(path, "r+b" if writable else "rb", buffering=0)
        try:
            self.offset = _read_npy_header(self._file, path, self.shape, np_dtype)
        except BaseException:
            self._file.close()
            raise
        self.fd = self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def sync(self) -> None:
        if not self._file.closed and self._file.writable():
            os.fsync(self.fd)

    def _seek_io(self, buffers, offset: int, write: bool) -> int:  # pragma: no cover - Windows
        done = 0
        self._file.seek(offset)
        for part in buffers:
            done += self._file.write(part) if write else self._file.readinto(part)
        return done

    def _io(self, rows: np.ndarray, buffer: np.ndarray, write: bool) -> None:
        """Read (write) file row ``rows[i]`` into (from) ``buffer[i]``, one call per run."""
        view = memoryview(buffer.reshape(buffer.shape[0], -1)).cast("B")
        rb = self.row_bytes
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.diff(sorted_rows, prepend=-2) != 1)  # first of each run
        offsets = (sorted_rows[starts] * rb + self.offset).tolist()
        slots = [view[i * rb:(i + 1) * rb] for i in order.tolist()]
        bounds = [*starts.tolist(), len(slots)]
        if hasattr(os, "preadv"):
            call = os.pwritev if write else os.preadv
        else:  # pragma: no cover - Windows
            call = lambda fd, buffers, offset: self._seek_io(buffers, offset, write)  # noqa: E731
        for k, offset in enumerate(offsets):
            lo, hi = bounds[k], bounds[k + 1]
            while lo < hi:  # at most _IOV_MAX buffers a call
                part = slots[lo:hi] if hi - lo <= _IOV_MAX else slots[lo:lo + _IOV_MAX]
                expected = len(part) * rb
                done = call(self.fd, part, offset)
                if done != expected:
                    raise OSError(
                        f"{self.path}: {'wrote' if write else 'read'} {done} of {expected} bytes "
                        f"at offset {offset}"
                    )
                offset += expected
                lo += len(part)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """``(B, ...)`` copy of the rows ``rows`` (any order, repeats allowed)."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.np_dtype)
        if len(rows):
            self._io(rows, out, write=False)
        return out

    def scatter(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` to row ``rows[i]`` (``rows`` without repeats)."""
        if len(rows):
            self._io(rows, np.ascontiguousarray(values), write=True)

    def read(self, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``start:stop`` (into ``out``, C-contiguous, when given)."""
        if out is None:
            out = np.empty((stop - start, *self.shape[1:]), dtype=self.np_dtype)
        view = memoryview(out.reshape(-1)).cast("B")
        done, offset = 0, self.offset + start * self.row_bytes
        while done < len(view):
            if hasattr(os, "preadv"):
                got = os.preadv(self.fd, [view[done:]], offset + done)
            else:  # pragma: no cover - Windows
                self._file.seek(offset + done)
                got = self._file.readinto(view[done:])
            if not got:
                raise OSError(f"{self.path}: file ends {len(view) - done} bytes early")
            done += got
        return out


class PseudoLabelBank:
    """Running averages of per-sample unimodal predictions over the last ``window`` epochs.

    Call :meth:`update` once per epoch (and modality) with the predictions of the unimodal
    model for the samples it saw: classification softmax probabilities, regression values, or
    L2-normalised video embeddings for retrieval. Updates of epochs before
    ``total_epochs - window`` are checked and ignored; later ones are folded into a running
    mean, so memory is ``O(N * C)`` per modality (see the module notes for the memory model and
    the float16 error bound). :meth:`targets` then gives the pseudo-labels of a batch.

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

    Raises:
        ValueError: bad sizes, window, modality names or dtype; see also each method.

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
    ) -> None:
        config = self._check_config(num_samples, num_outputs, modalities, window, total_epochs, dtype)
        check_positive_int("resident_budget", resident_budget)
        self._init(config, storage, resident_budget, create=True, overwrite=overwrite)

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
        if dtype not in _DTYPES:
            raise ValueError(
                f"dtype: expected one of torch.float16, torch.bfloat16, torch.float32, got {dtype}"
            )
        return {
            "num_samples": num_samples,
            "num_outputs": num_outputs,
            "modalities": sorted(names),
            "window": window,
            "total_epochs": total_epochs,
            "dtype": _DTYPES[dtype][1],
        }

    def _init(self, config: dict, storage, resident_budget: int, create: bool, overwrite=False):
        self._config = dict(config)
        self.num_samples: int = config["num_samples"]
        self.num_outputs: int = config["num_outputs"]
        self.modalities: list[str] = list(config["modalities"])
        self.window: int = config["window"]
        self.total_epochs: int = config["total_epochs"]
        self.dtype: torch.dtype = _DTYPE_BY_NAME[config["dtype"]]
        self.resident_budget = resident_budget
        self.storage: Optional[Path] = None if storage is None else Path(storage).resolve()
        self._maps: list[mmap.mmap] = []
        self._files: dict[str, _RowFile] = {}
        self._mean: dict[str, Tensor] = {}
        self._seen: dict[str, Tensor] = {}
        shape = (self.num_samples, self.num_outputs)
        if self.storage is None:
            for m in self.modalities:
                self._mean[m] = torch.zeros(shape, dtype=self.dtype)
                self._seen[m] = torch.zeros(self.num_samples, dtype=torch.int64)
            return
        meta = self.storage / "bank.json"
        if create:
            if meta.exists() and not overwrite:
                raise FileExistsError(
                    f"storage: {self.storage} already holds a PseudoLabelBank; reopen it with "
                    f"PseudoLabelBank.load(path, mmap=True) or pass overwrite=True"
                )
            self.storage.mkdir(parents=True, exist_ok=True)
            for m in self.modalities:
                _create_npy(self._mean_path(self.storage, m), shape, self._np_dtype)
                _create_npy(self._seen_path(self.storage, m), (self.num_samples,), np.dtype("<i8"))
            self._write_meta(self.storage)
        try:
            for m in self.modalities:
                self._files[m] = _RowFile(self._mean_path(self.storage, m), shape, self._np_dtype, True)
                mm, array = _map_npy(self._seen_path(self.storage, m), (self.num_samples,),
                                     np.dtype("<i8"), True)
                self._maps.append(mm)
                self._seen[m] = torch.from_numpy(array)
        except BaseException:
            self.close()
            raise

    @property
    def _np_dtype(self) -> np.dtype:
        return _DTYPES[self.dtype][0]

    def _as_tensor(self, array: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor

    def _as_numpy(self, tensor: Tensor) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            tensor = tensor.view(torch.uint16)
        return tensor.numpy()

    @property
    def _chunk_rows(self) -> int:
        """Rows per step when streaming whole files."""
        budget = _CHUNK_BYTES if self.storage is None else min(_CHUNK_BYTES, self.resident_budget)
        return max(1, budget // (self.num_outputs * self.dtype.itemsize))

    def _gather(self, modality: str, indices: Tensor) -> Tensor:
        """``(B, C)`` means of ``indices`` in the storage dtype (a copy in file-backed mode)."""
        if self.storage is None:
            return self._mean[modality].index_select(0, indices)
        return self._as_tensor(self._files[modality].gather(indices.numpy()))

    def _scatter(self, modality: str, indices: Tensor, values: Tensor) -> None:
        """Store ``(B, C)`` means (storage dtype) at ``indices`` (no repeats)."""
        if self.storage is None:
            self._mean[modality].index_copy_(0, indices, values)
        else:
            self._files[modality].scatter(indices.numpy(), self._as_numpy(values.contiguous()))

    def _read_block(self, modality: str, start: int, stop: int) -> Tensor:
        """Means of rows ``start:stop`` (a view in memory, a copy in file-backed mode)."""
        if self.storage is None:
            return self._mean[modality][start:stop]
        return self._as_tensor(self._files[modality].read(start, stop))

    def _write_block(self, modality: str, start: int, values: Tensor) -> None:
        if self.storage is None:
            self._mean[modality][start:start + values.shape[0]].copy_(values)
        else:
            rows = torch.arange(start, start + values.shape[0])
            self._scatter(modality, rows, values)

    def _means(self, modality: str) -> Tensor:
        """All ``(N, C)`` means (the bank's tensor in memory, a full copy in file-backed mode)."""
        return self._read_block(modality, 0, self.num_samples)

    @staticmethod
    def _mean_path(root: Path, modality: str) -> Path:
        return root / f"mean.{modality}.npy"

    @staticmethod
    def _seen_path(root: Path, modality: str) -> Path:
        return root / f"seen.{modality}.npy"

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
        """Bytes held by the bank's arrays (in memory, or in its files in file-backed mode)."""
        return self.estimate_nbytes(self.num_samples, self.num_outputs, len(self.modalities), self.dtype)

    @staticmethod
    def estimate_nbytes(
        num_samples: int, num_outputs: int, num_modalities: int, dtype: torch.dtype = torch.float16
    ) -> int:
        """Bytes a bank of this size holds: ``M * N * (C * itemsize + 8)``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_modalities * num_samples * (num_outputs * itemsize + 8)

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
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {indices.dtype}")
        indices = indices.detach().to("cpu", torch.int64)
        if indices.numel():
            bad = (indices < 0) | (indices >= self.num_samples)
            if bool(bad.any()):
                raise ValueError(
                    f"{name}: expected sample ids in [0, {self.num_samples}), got "
                    f"{int(bad.sum())} out of range, e.g. {_few(indices[bad])}"
                )
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
                f"e.g. {_few(values[counts > 1])}"
            )
        if epoch < self.first_epoch or indices.numel() == 0:
            return
        bit = 1 << (epoch - self.first_epoch)
        seen = self._seen[modality].index_select(0, indices)
        again = (seen & bit) != 0
        if bool(again.any()):
            raise ValueError(
                f"indices: {int(again.sum())} of {indices.numel()} samples were already recorded "
                f"for modality {modality!r} at epoch {epoch}, e.g. {_few(indices[again])}"
            )
        weight = 1.0 / (_popcount(seen, self.window).to(torch.float32) + 1.0)
        mean = self._gather(modality, indices).float()
        mean.lerp_(x, weight[:, None])  # m + (x - m) / (count + 1), exact x on the first update
        self._scatter(modality, indices, mean.to(self.dtype))
        self._seen[modality].index_copy_(0, indices, seen | bit)

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
                f"{_few(none.nonzero().flatten())}"
            )
        several = bool((num_present > 1).any())
        gt = self._check_ground_truth(ground_truth, batch) if ground_truth is not None else None
        if several and gt is None:
            raise ValueError(
                f"ground_truth: required to choose between modalities, "
                f"{int((num_present > 1).sum())} of {batch} samples have several, rows "
                f"{_few((num_present > 1).nonzero().flatten())}"
            )
        for m, mask in masks.items():
            ids = indices[mask]
            never = self._seen[m][ids] == 0
            if bool(never.any()):
                raise ValueError(
                    f"present: modality {m!r} was never recorded (in epochs "
                    f"{self.first_epoch}..{self.total_epochs - 1}) for {int(never.sum())} of "
                    f"{ids.numel()} samples, e.g. ids {_few(ids[never])}"
                )
        out = torch.zeros(batch, self.num_outputs, dtype=torch.float32)
        best = torch.full((batch,), -float("inf"))
        for m, mask in masks.items():
            rows = mask.nonzero().flatten()
            values = self._gather(m, indices[rows]).float()
            score = self._cosine(values, gt, rows) if several else torch.zeros(rows.numel())
            better = score > best[rows]
            out[rows[better]] = values[better]
            best[rows[better]] = score[better]
        return out if device is None else out.to(device)

    def _check_ground_truth(self, ground_truth: Any, batch: int) -> Tensor:
        check_tensor("ground_truth", ground_truth)
        if ground_truth.dim() == 1:
            check_tensor("ground_truth", ground_truth, ("B",), {"B": batch})
            if ground_truth.is_floating_point() or ground_truth.dtype == torch.bool:
                raise TypeError(
                    f"ground_truth: a 1-d ground truth holds class labels and must be an "
                    f"integer tensor, got dtype {ground_truth.dtype}"
                )
            gt = ground_truth.detach().to("cpu", torch.int64)
            if gt.numel():
                bad = (gt < 0) | (gt >= self.num_outputs)
                if bool(bad.any()):
                    raise ValueError(
                        f"ground_truth: expected class labels in [0, {self.num_outputs}), got "
                        f"{int(bad.sum())} out of range, e.g. {_few(gt[bad])}"
                    )
            return gt
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
        """File-backed mode: drop the mapped pages of the bit masks from the process.

        The means are never mapped (see the module notes), so this frees at most ``8 * N``
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
        for f in self._files.values():
            f.sync()

    def close(self) -> None:
        """Flush and close the files (file-backed mode). The bank is unusable afterwards."""
        self.flush()
        maps, self._maps = self._maps, []
        files, self._files = self._files, {}
        self._mean, self._seen = {}, {}
        for f in files.values():
            f.close()
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the map closes when it is freed
                pass

    def __enter__(self) -> "PseudoLabelBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, path: PathLike) -> None:
        """Write the bank to the directory ``path`` (created), every file atomically.

        Layout: ``mean.<modality>.npy`` ``(N, C)``, ``seen.<modality>.npy`` ``(N,)`` int64 epoch
        bit masks, then ``bank.json`` (written last: a directory with ``bank.json`` is complete).
        Saving a file-backed bank to its own storage just flushes it.
        """
        root = Path(path).resolve()
        if self.storage is not None and root == self.storage:
            self.flush()
            self._write_meta(root)
            return
        root.mkdir(parents=True, exist_ok=True)
        rows = self._chunk_rows
        for m in self.modalities:
            _write_npy(self._mean_path(root, m), (self.num_samples, self.num_outputs), self._np_dtype,
                       lambda i, j, m=m: self._as_numpy(self._read_block(m, i, j)), rows)
            seen = self._seen[m].numpy()
            _write_npy(self._seen_path(root, m), seen.shape, seen.dtype, lambda i, j: seen[i:j],
                       max(1, _CHUNK_BYTES // 8))
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
        """
        root = Path(path)
        config = cls._read_meta(root)
        bank = cls.__new__(cls)
        if mmap:
            bank._init(config, root, resident_budget, create=False)
            return bank
        bank._init(config, None, resident_budget, create=False)
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
                f"{meta.get('format')!r} version {meta.get('version')!r}"
            )
        config = {k: meta[k] for k in
                  ("num_samples", "num_outputs", "modalities", "window", "total_epochs", "dtype")}
        if config["dtype"] not in _DTYPE_BY_NAME:
            raise ValueError(f"{meta_path}: unknown dtype {config['dtype']!r}")
        PseudoLabelBank._check_config(
            config["num_samples"], config["num_outputs"], config["modalities"], config["window"],
            config["total_epochs"], _DTYPE_BY_NAME[config["dtype"]])
        return config

    def _copy_from_files(self, root: Path) -> None:
        shape = (self.num_samples, self.num_outputs)
        rows = self._chunk_rows
        for m in self.modalities:
            source = _RowFile(self._mean_path(root, m), shape, self._np_dtype, False)
            try:
                for start in range(0, self.num_samples, rows):
                    stop = min(self.num_samples, start + rows)
                    if self.storage is None:  # straight into the bank's tensor
                        source.read(start, stop, self._as_numpy(self._mean[m][start:stop]))
                    else:
                        self._write_block(m, start, self._as_tensor(source.read(start, stop)))
            finally:
                source.close()
            seen = _RowFile(self._seen_path(root, m), (self.num_samples,), np.dtype("<i8"), False)
            try:
                self._seen[m].copy_(torch.from_numpy(seen.read(0, self.num_samples)))
            finally:
                seen.close()

    def state_dict(self) -> dict:
        """The bank's state for a checkpoint.

        In memory: ``{"config": ..., "mean": {m: (N, C)}, "seen": {m: (N,)}}`` holding the
        bank's own tensors (not copies, as ``nn.Module.state_dict``; ``torch.save`` copies them).
        In file-backed mode the files are flushed and the state only references them:
        ``{"config": ..., "storage": "<path>"}``, so a checkpoint is as small as a path, the
        files must be kept with it, and they go on changing with later updates (save a copy
        with :meth:`save` for a frozen snapshot).
        """
        state: dict = {"config": self.config()}
        if self.storage is not None:
            self.flush()
            self._write_meta(self.storage)
            state["storage"] = str(self.storage)
        else:
            state["mean"] = dict(self._mean)
            state["seen"] = dict(self._seen)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (either kind) into this bank, whose config must match."""
        config = state.get("config") if isinstance(state, Mapping) else None
        if config != self.config():
            raise ValueError(f"state: expected config {self.config()}, got {config}")
        if "storage" in state:
            root = Path(state["storage"]).resolve()
            if self.storage is not None and root == self.storage:
                return
            self._copy_from_files(root)
            return
        for m in self.modalities:
            mean, seen = state["mean"][m], state["seen"][m]
            check_tensor(f"state['mean'][{m!r}]", mean, (self.num_samples, self.num_outputs))
            check_tensor(f"state['seen'][{m!r}]", seen, (self.num_samples,))
            if mean.dtype != self.dtype or seen.dtype != torch.int64:
                raise TypeError(
                    f"state: expected {self.dtype} means and int64 masks for {m!r}, got "
                    f"{mean.dtype} and {seen.dtype}"
                )
            rows = self._chunk_rows
            for start in range(0, self.num_samples, rows):
                self._write_block(m, start, mean[start:start + rows])
            self._seen[m].copy_(seen)
