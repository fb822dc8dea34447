"""Atomic files and random-number state for the training recipe.

Every file the recipe writes goes through :func:`atomic_write_bytes`: the bytes go to a
temporary file in the same folder, are flushed and ``fsync``-ed, and the temporary file is then
renamed over the destination with ``os.replace`` (atomic on POSIX and Windows). A reader
therefore sees either the previous complete file or the new complete file, never a partial one,
even when the writer is killed with ``SIGKILL`` half-way through.

Example::

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(folder, "a.json"), {"x": 1})
    >>> read_json(os.path.join(folder, "a.json"))
    {'x': 1}
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_numpy_save",
    "read_json",
    "append_jsonl",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
    "derive_seed",
]


def _fsync_dir(folder: str) -> None:
    # Make the rename itself durable; not supported on every platform (e.g. Windows).
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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_torch_save(path: str, obj: Any) -> None:
    """``torch.save`` to memory, then :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_numpy_save(path: str, array: np.ndarray) -> None:
    """``np.save`` to memory, then :func:`atomic_write_bytes` (``path`` should end in ``.npy``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line and fsync it (a log, so appending is the point; a torn last line
    is skipped by readers)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU and (if used) CUDA generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on every part (stable across runs and platforms)."""
    import hashlib

    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
