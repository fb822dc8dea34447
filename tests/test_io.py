"""``umilayers._io``: atomic writes leave whole files with the permissions any tool would give."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from umilayers._io import (
    append_jsonl,
    atomic_numpy_save,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_mode,
    read_json,
)

WRITERS = {
    "json": lambda path: atomic_write_json(path, {"x": 1}),
    "text": lambda path: atomic_write_text(path, "text"),
    "torch": lambda path: atomic_torch_save(path, {"w": torch.zeros(2)}),
    "numpy": lambda path: atomic_numpy_save(path, np.zeros(3)),
}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask_like_open(tmp_path, umask, writer, mask):
    umask(mask)
    WRITERS[writer](tmp_path / "atomic")
    with open(tmp_path / "plain", "w"):  # what every other tool gives a new file
        pass
    assert _mode(tmp_path / "atomic") == _mode(tmp_path / "plain") == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["atomic", "plain"]  # no temporary file left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"x": 1})
    os.chmod(path, 0o600)
    atomic_write_json(path, {"x": 2})
    assert _mode(path) == 0o600 and read_json(path) == {"x": 2}
    assert file_mode(path) == 0o600 and file_mode(tmp_path / "new") == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_append_jsonl(tmp_path):
    append_jsonl(tmp_path / "log.jsonl", {"a": 1})
    append_jsonl(tmp_path / "log.jsonl", {"a": 2})
    assert (tmp_path / "log.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
