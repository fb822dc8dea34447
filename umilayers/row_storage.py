"""Row storage: a growable table of fixed-width rows, in memory or in a ``.npy`` file.

The :class:`~umilayers.pseudo_labels.PseudoLabelBank` keeps one row (a running mean of ``C``
values) per (sample, modality) pair that exists, in the order the rows were created, and looks
rows up by *slot* (row number). This module is that table, with no notion of samples or epochs:

- :class:`MemoryRows` holds the rows in tensors of about ``chunk_bytes`` each. Growing adds a
  chunk and copies nothing, so a table grown row by row never holds two copies of itself and
  wastes at most one chunk; a size known in advance is allocated exactly (``exact=True``).
- :class:`FileRows` holds them in a 2-d ``.npy`` file and reads and writes the rows of a batch
  with positioned I/O (``os.preadv`` / ``os.pwritev``: rows sorted by slot, each run of adjacent
  rows one call), so the process holds the batch and never the table. Growing extends the file
  (sparse: no data is written) and rewrites the shape in its header in place; numpy leaves room
  in every header for the first axis to grow (``GROWTH_AXIS_MAX_DIGITS``), and the file stays a
  plain ``.npy`` that ``numpy.load`` reads.

Both give the same bits: values are stored in their ``dtype`` (``torch.bfloat16`` as its raw
16 bits, ``<u2``, since numpy has no bfloat16). New rows read as zeros.
"""

from __future__ import annotations

import abc
import io
import mmap
import os
from pathlib import Path
from typing import IO, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from umilayers._io import atomic_write

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "RowStorage",
    "MemoryRows",
    "FileRows",
    "numpy_dtype",
    "save_rows",
    "map_npy",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Bytes of one :class:`MemoryRows` chunk unless told otherwise: small enough that the unused
#: tail of the last chunk is a few percent of an EPIC-size table, large enough that a batch
#: touches a few dozen chunks at most.
DEFAULT_CHUNK_BYTES = 16 << 20

# storage dtype -> numpy dtype of its bytes on disk (numpy has no bfloat16: its raw bits)
_NUMPY_DTYPES = {
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("<u2"),
    torch.float32: np.dtype("<f4"),
    torch.int64: np.dtype("<i8"),
}


def _iov_max() -> int:
    try:
        return max(1, min(1024, os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):
        return 16


#: Buffers one ``preadv`` / ``pwritev`` call takes (``IOV_MAX``, capped at 1024).
_IOV_MAX = _iov_max()


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds the bytes of ``dtype`` on disk (``<u2`` for bfloat16)."""
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype: expected one of {list(_NUMPY_DTYPES)}, got {dtype}")
    return _NUMPY_DTYPES[dtype]


def _to_numpy(tensor: Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a numpy array (bfloat16 viewed as ``uint16``)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16)
    return tensor.numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


# ----------------------------------------------------------------------------- npy headers


def _header_bytes(shape: Tuple[int, ...], np_dtype: np.dtype) -> bytes:
    """A version 1.0 ``.npy`` header; its length does not change when ``shape[0]`` does."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np_dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _read_header(f: IO[bytes], path: Path) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of an open ``.npy`` file (C order only)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise ValueError(f"{path}: expected a C-ordered array, got fortran_order=True")
    return tuple(shape), dtype, f.tell()


def _check_npy(path: Path, shape: Tuple[int, ...], dtype: np.dtype, expected: Tuple, expected_dtype) -> None:
    """Raise one line naming the file when its shape (``None`` = any size) or dtype differ."""
    sizes_ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not sizes_ok or dtype != expected_dtype:
        wanted = "(" + ", ".join("R" if e is None else str(e) for e in expected) + ")"
        raise ValueError(
            f"{path}: expected a {expected_dtype} array of shape {wanted}, got {dtype} shape {shape}"
        )


def map_npy(path: PathLike, shape: Tuple[int, ...], np_dtype: np.dtype,
            writable: bool) -> Tuple[mmap.mmap, np.ndarray]:
    """Map a ``.npy`` file whose dtype and shape must be ``np_dtype`` and ``shape``.

    Returns ``(mmap, array)``; the array is a view of the mapping (close the mapping when no view
    is left). Used for small per-sample arrays that are updated in place.
    """
    path = Path(path)
    with open(path, "r+b" if writable else "rb") as f:
        file_shape, file_dtype, offset = _read_header(f, path)
        _check_npy(path, file_shape, file_dtype, tuple(shape), np_dtype)
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(f.fileno(), 0, access=access)
    return mm, np.ndarray(shape, dtype=np_dtype, buffer=mm, offset=offset)


# ----------------------------------------------------------------------------- storage


class RowStorage(abc.ABC):
    """Rows of ``width`` values of one ``dtype`` in slots ``0 .. len(self) - 1``.

    Slots are given as ``int64`` CPU tensors and trusted (the caller checks them).

    Example::

        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> tables = [MemoryRows(2, torch.float32), FileRows.create(os.path.join(folder, "t.npy"), 2, torch.float32)]
        >>> for table in tables:
        ...     first = table.grow(3)
        ...     table.scatter(torch.tensor([2, 0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> [table.gather(torch.tensor([0, 1, 2, 0])).tolist() for table in tables]  # the same
        [[[3.0, 4.0], [0.0, 0.0], [1.0, 2.0], [3.0, 4.0]], [[3.0, 4.0], [0.0, 0.0], [1.0, 2.0], [3.0, 4.0]]]
        >>> tables[1].close()
    """

    width: int
    dtype: torch.dtype

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows in the table."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held for the rows (memory allocated, or the file's data)."""

    @abc.abstractmethod
    def grow(self, count: int, exact: bool = False) -> int:
        """Append ``count`` zero rows; returns the first new slot.

        ``exact``: allocate only what is missing (the final size is known), not a whole chunk.
        """

    @abc.abstractmethod
    def gather(self, slots: Tensor) -> Tensor:
        """``(B, width)`` copy of the rows ``slots`` (any order, repeats allowed)."""

    @abc.abstractmethod
    def scatter(self, slots: Tensor, values: Tensor) -> None:
        """Write ``values[i]`` to row ``slots[i]`` (``slots`` without repeats)."""

    @abc.abstractmethod
    def blocks(self, max_rows: int) -> Iterator[Tensor]:
        """Every row in slot order, as consecutive ``(r, width)`` blocks of ``r <= max_rows``.

        Views of the table in memory (valid until it changes), copies read from a file.
        """

    @abc.abstractmethod
    def write(self, start: int, values: Tensor) -> None:
        """Write ``values`` to the consecutive rows ``start .. start + len(values) - 1``."""

    def flush(self) -> None:
        """Make written rows durable (file: ``fsync``). A no-op in memory."""

    def close(self) -> None:
        """Release the storage; it is unusable afterwards."""


class MemoryRows(RowStorage):
    """Rows in tensors of about ``chunk_bytes`` each; growing never copies a row.

    Args:
        width: values per row (``C``).
        dtype: the values' dtype.
        chunk_bytes: size of the chunk :meth:`grow` adds when the last one is full.

    Example::

        >>> import torch
        >>> rows = MemoryRows(width=3, dtype=torch.float16, chunk_bytes=12)  # 2 rows a chunk
        >>> [rows.grow(1) for _ in range(5)]  # one row at a time: the first new slot
        [0, 1, 2, 3, 4]
        >>> rows.scatter(torch.tensor([4, 0]), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).half())
        >>> rows.gather(torch.tensor([0, 4, 1])).tolist()
        [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
        >>> len(rows), rows.nbytes  # 3 chunks of 2 rows x 3 values x 2 bytes
        (5, 36)
        >>> rows.grow(10, exact=True), rows.nbytes  # a known size: no spare rows beyond it
        (5, 90)
    """

    def __init__(self, width: int, dtype: torch.dtype, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.width, self.dtype = width, dtype
        self.chunk_rows = max(1, chunk_bytes // (width * dtype.itemsize))
        self._chunks: List[Tensor] = []
        self._starts: List[int] = []  # first slot of each chunk
        self._all_starts = torch.zeros(0, dtype=torch.int64)  # _starts as a tensor
        self._inner_starts = self._all_starts  # _starts[1:], for searchsorted
        self._len = 0
        self._capacity = 0

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return self._capacity * self.width * self.dtype.itemsize

    def grow(self, count: int, exact: bool = False) -> int:
        first, missing = self._len, self._len + count - self._capacity
        if missing > 0:
            rows = missing if exact else max(missing, self.chunk_rows)
            self._chunks.append(torch.zeros(rows, self.width, dtype=self.dtype))
            self._starts.append(self._capacity)
            self._all_starts = torch.tensor(self._starts, dtype=torch.int64)
            self._inner_starts = self._all_starts[1:]
            self._capacity += rows
        self._len += count
        return first

    def _by_chunk(self, slots: Tensor) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        """``(chunk, positions in slots, offsets in the chunk)`` for each chunk ``slots`` touch."""
        chunk = torch.searchsorted(self._inner_starts, slots, right=True)
        order = torch.argsort(chunk, stable=True)
        offsets = slots[order] - self._all_starts[chunk[order]]
        counts = torch.bincount(chunk, minlength=len(self._chunks)).tolist()
        pieces = zip(self._chunks, torch.split(order, counts), torch.split(offsets, counts))
        return ((c, positions, offset) for c, positions, offset in pieces if positions.numel())

    def gather(self, slots: Tensor) -> Tensor:
        if len(self._chunks) == 1:
            return self._chunks[0].index_select(0, slots)
        out = torch.empty(slots.numel(), self.width, dtype=self.dtype)
        for chunk, positions, offsets in self._by_chunk(slots):
            out.index_copy_(0, positions, chunk.index_select(0, offsets))
        return out

    def scatter(self, slots: Tensor, values: Tensor) -> None:
        if len(self._chunks) == 1:
            self._chunks[0].index_copy_(0, slots, values)
            return
        for chunk, positions, offsets in self._by_chunk(slots):
            chunk.index_copy_(0, offsets, values.index_select(0, positions))

    def _spans(self, start: int, stop: int) -> Iterator[Tuple[Tensor, int, int, int]]:
        """``(chunk, offset in chunk, row in start..stop, rows)`` covering ``start .. stop``."""
        for chunk, first in zip(self._chunks, self._starts):
            lo, hi = max(start, first), min(stop, first + chunk.shape[0])
            if lo < hi:
                yield chunk, lo - first, lo - start, hi - lo

    def blocks(self, max_rows: int) -> Iterator[Tensor]:
        for chunk, offset, _, rows in self._spans(0, self._len):
            for lo in range(0, rows, max_rows):
                yield chunk[offset + lo: offset + min(rows, lo + max_rows)]

    def write(self, start: int, values: Tensor) -> None:
        for chunk, offset, at, rows in self._spans(start, start + values.shape[0]):
            chunk[offset: offset + rows].copy_(values[at: at + rows])

    def close(self) -> None:
        self._chunks, self._starts, self._len, self._capacity = [], [], 0, 0
        self._all_starts = self._inner_starts = torch.zeros(0, dtype=torch.int64)


class FileRows(RowStorage):
    """Rows in a 2-d ``.npy`` file, read and written with positioned I/O (the file is not mapped).

    Open an existing file with the constructor, make a new one with :meth:`create`. The rows of
    a batch are sorted by slot; each run of adjacent rows is one ``preadv`` / ``pwritev`` call
    scattering to (gathering from) the batch's rows in their original order. Where
    ``os.preadv`` is missing (Windows), a seek and a read or write per run.

    Args:
        path: the ``.npy`` file, shape ``(R, width)``.
        width: values per row; the file's must match.
        dtype: the values' dtype; the file holds :func:`numpy_dtype` of it.
        writable: open for writing (:meth:`scatter`, :meth:`write`, :meth:`grow`).

    Raises:
        ValueError: the file's dtype or width differ, or it holds fewer or more bytes than
            its header says.

    Example::

        >>> import os, tempfile, numpy as np, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.npy")
        >>> rows = FileRows.create(path, width=2, dtype=torch.float32, rows=2)
        >>> rows.grow(2)  # the file grows; the new rows are zeros (a sparse file)
        2
        >>> rows.scatter(torch.tensor([3, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> rows.close()
        >>> np.load(path).tolist()  # a plain .npy
        [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 2.0]]
    """

    def __init__(self, path: PathLike, width: int, dtype: torch.dtype, writable: bool = True) -> None:
        self.path, self.width, self.dtype = Path(path), width, dtype
        self.np_dtype = numpy_dtype(dtype)
        self.row_bytes = width * self.np_dtype.itemsize
        self._file = open(self.path, "r+b" if writable else "rb", buffering=0)
        try:
            shape, file_dtype, self.offset = _read_header(self._file, self.path)
            _check_npy(self.path, shape, file_dtype, (None, width), self.np_dtype)
            self._len = shape[0]
            size, expected = os.fstat(self._file.fileno()).st_size, self.offset + self._len * self.row_bytes
            if size != expected:
                raise ValueError(
                    f"{self.path}: holds {size - self.offset} bytes of data, expected "
                    f"{self._len} rows x {self.row_bytes} bytes = {expected - self.offset}"
                )
        except BaseException:
            self._file.close()
            raise
        self.fd = self._file.fileno()

    @classmethod
    def create(cls, path: PathLike, width: int, dtype: torch.dtype, rows: int = 0) -> "FileRows":
        """Create ``path`` atomically with ``rows`` zero rows (a sparse file) and open it."""
        header = _header_bytes((rows, width), numpy_dtype(dtype))

        def write(f: IO[bytes]) -> None:
            f.write(header)
            f.truncate(len(header) + rows * width * numpy_dtype(dtype).itemsize)

        atomic_write(path, write)
        return cls(path, width, dtype, writable=True)

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return self._len * self.row_bytes

    def grow(self, count: int, exact: bool = False) -> int:
        first = self._len
        header = _header_bytes((first + count, self.width), self.np_dtype)
        if len(header) != self.offset:  # only if the header was not written by numpy
            raise ValueError(f"{self.path}: its .npy header leaves no room to grow to {first + count} rows")
        os.ftruncate(self.fd, self.offset + (first + count) * self.row_bytes)
        self._call([memoryview(header)], 0, write=True)
        self._len += count
        return first

    def _seek_io(self, buffers: Sequence[memoryview], offset: int, write: bool) -> int:  # pragma: no cover
        done = 0
        self._file.seek(offset)
        for part in buffers:
            done += self._file.write(part) if write else self._file.readinto(part)
        return done

    def _call(self, buffers: Sequence[memoryview], offset: int, write: bool) -> None:
        """One positioned read (write) of ``buffers`` at ``offset``; all bytes or an error."""
        if hasattr(os, "preadv"):
            done = (os.pwritev if write else os.preadv)(self.fd, buffers, offset)
        else:  # pragma: no cover - Windows
            done = self._seek_io(buffers, offset, write)
        expected = sum(len(b) for b in buffers)
        if done != expected:
            raise OSError(f"{self.path}: {'wrote' if write else 'read'} {done} of {expected} bytes at offset {offset}")

    def _io(self, slots: np.ndarray, buffer: np.ndarray, write: bool) -> None:
        """Read (write) file row ``slots[i]`` into (from) ``buffer[i]``, one call per run."""
        view = memoryview(buffer.reshape(buffer.shape[0], -1)).cast("B")
        rb = self.row_bytes
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # first of each run
        offsets = (ordered[starts] * rb + self.offset).tolist()
        parts = [view[i * rb:(i + 1) * rb] for i in order.tolist()]
        bounds = [*starts.tolist(), len(parts)]
        for k, offset in enumerate(offsets):
            for lo in range(bounds[k], bounds[k + 1], _IOV_MAX):  # at most _IOV_MAX buffers a call
                batch = parts[lo:min(bounds[k + 1], lo + _IOV_MAX)]
                self._call(batch, offset + (lo - bounds[k]) * rb, write)

    def gather(self, slots: Tensor) -> Tensor:
        out = np.empty((slots.numel(), self.width), dtype=self.np_dtype)
        if slots.numel():
            self._io(slots.numpy(), out, write=False)
        return _from_numpy(out, self.dtype)

    def scatter(self, slots: Tensor, values: Tensor) -> None:
        if slots.numel():
            self._io(slots.numpy(), _to_numpy(values.contiguous()), write=True)

    def read(self, start: int, stop: int) -> Tensor:
        """Rows ``start .. stop - 1``, a copy."""
        out = np.empty((stop - start, self.width), dtype=self.np_dtype)
        if stop > start:
            self._call([memoryview(out.reshape(-1)).cast("B")], self.offset + start * self.row_bytes, write=False)
        return _from_numpy(out, self.dtype)

    def blocks(self, max_rows: int) -> Iterator[Tensor]:
        for start in range(0, self._len, max_rows):
            yield self.read(start, min(self._len, start + max_rows))

    def write(self, start: int, values: Tensor) -> None:
        if values.shape[0]:
            data = _to_numpy(values.contiguous())
            self._call([memoryview(data.reshape(-1)).cast("B")], self.offset + start * self.row_bytes, write=True)

    def truncate(self) -> None:
        """Drop every row (length 0), keeping the file."""
        self._len = 0
        self.grow(0)

    def flush(self) -> None:
        if not self._file.closed and self._file.writable():
            os.fsync(self.fd)

    def close(self) -> None:
        self._file.close()


def save_rows(path: PathLike, rows: RowStorage, max_rows: int) -> None:
    """Write every row of ``rows`` to the ``.npy`` file ``path`` atomically, ``max_rows`` at a time.

    The file can be reopened with :class:`FileRows` (and grown) or read with ``numpy.load``.
    """
    header = _header_bytes((len(rows), rows.width), numpy_dtype(rows.dtype))

    def write(f: IO[bytes]) -> None:
        f.write(header)
        for block in rows.blocks(max_rows):
            f.write(_to_numpy(block.contiguous()).data)

    atomic_write(path, write)

