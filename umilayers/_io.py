"""Atomic file writes: the one implementation every writer in the package uses.

A file is written to a temporary name in the same folder, flushed and ``fsync``-ed, then renamed
over the destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is
``fsync``-ed so the rename itself survives a crash. A reader therefore sees either the previous
complete file or the new complete file, never a partial one, even when the writer is killed
with ``SIGKILL`` half-way through; a failed write leaves no temporary file behind.

Example::

    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(folder, "a.json"), {"x": 1})
    >>> read_json(os.path.join(folder, "a.json"))
    {'x': 1}
    >>> sorted(os.listdir(folder))  # no temporary file left behind
    ['a.json']
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Any, Callable, Union

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_numpy_save",
    "read_json",
    "append_jsonl",
    "fsync_dir",
]

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary binary file next to ``path``, then rename it to ``path``.

    Streaming through ``write`` keeps large files (checkpoints, feature arrays) out of memory.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, streamed (no copy of the bytes in memory)."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_numpy_save(path: PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` (which should end in ``.npy``) atomically, without pickles."""
    atomic_write(path, lambda handle: np.save(handle, np.asarray(array), allow_pickle=False))


def read_json(path: PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one JSON line and fsync it.

    A log, so appending is the point: a crash can tear only the last line, which readers skip.
    """
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
