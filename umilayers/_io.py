"""Atomic file writes: the one implementation every writer in the package uses.

A file is written to a temporary name in the same folder, flushed and ``fsync``-ed, then renamed
over the destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is
``fsync``-ed so the rename itself survives a crash. A reader therefore sees either the previous
complete file or the new complete file, never a partial one, even when the writer is killed
with ``SIGKILL`` half-way through; a failed write leaves no temporary file behind.

The file gets the permissions any other tool would give it: a new file ``0o666`` less the
process's umask (``-rw-r--r--`` under the usual ``022``), a replaced file keeps its own mode.
(The temporary file is created private, ``0o600``, as ``tempfile.mkstemp`` does; its mode is set
before it is renamed into place.)

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
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Union

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
    "remove_entries",
    "fsync_dir",
    "file_mode",
]

PathLike = Union[str, "os.PathLike[str]"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it and set it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode(path: PathLike) -> int:
    """The permission bits a file written at ``path`` gets: the existing file's own, or for a new
    file ``0o666`` less the umask (what ``open(path, "w")`` gives).

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> previous = os.umask(0o027)
        >>> oct(file_mode(path))
        '0o640'
        >>> _ = os.umask(previous)
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


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
    mode = file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, mode)  # mkstemp made it 0o600
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


def remove_entries(folder: PathLike, names: Iterable[str]) -> None:
    """Remove the files and folders ``names`` of ``folder`` that exist (what ``--overwrite`` clears)."""
    for name in names:
        target = Path(folder) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
