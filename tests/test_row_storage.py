import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from umilayers.row_storage import FileRows, MemoryRows, map_npy, numpy_dtype, save_rows

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# longer than one preadv / pwritev call takes (IOV_MAX, capped at 1024 buffers)
LONG_RUN = 2 * 1024 + 3


def _bits(t):
    """Compare tensors by their bits (bfloat16 has no numpy dtype)."""
    return t.view(torch.int16).numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def _random_values(rng, rows, width, dtype):
    return torch.from_numpy(rng.normal(size=(rows, width))).to(dtype)


def _exercise(table, rng, steps, width, dtype):
    """Grow, scatter, gather, write and read ``table`` at random; compare with a tensor copy."""
    reference = torch.zeros(len(table), width, dtype=dtype)  # new rows are zeros
    for _ in range(steps):
        count = int(rng.integers(0, 7))
        first = table.grow(count, exact=bool(rng.random() < 0.3))
        assert first == reference.shape[0] and len(table) == first + count
        reference = torch.cat([reference, torch.zeros(count, width, dtype=dtype)])
        n = len(table)
        if n == 0:
            continue
        slots = torch.from_numpy(rng.permutation(n)[: rng.integers(0, n + 1)])
        values = _random_values(rng, slots.numel(), width, dtype)
        table.scatter(slots, values)
        reference[slots] = values
        start = int(rng.integers(0, n))
        block = _random_values(rng, int(rng.integers(0, n - start + 1)), width, dtype)
        table.write(start, block)
        reference[start:start + block.shape[0]] = block
        wanted = torch.from_numpy(rng.integers(0, n, int(rng.integers(0, 2 * n))))  # repeats
        assert np.array_equal(_bits(table.gather(wanted)), _bits(reference[wanted]))
    max_rows = int(rng.integers(1, 5))
    blocks = list(table.blocks(max_rows))
    assert all(0 < b.shape[0] <= max_rows for b in blocks)
    whole = torch.cat(blocks) if blocks else torch.zeros(0, width, dtype=dtype)
    assert np.array_equal(_bits(whole), _bits(reference))
    return reference


@given(width=st.integers(1, 4), chunk_rows=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       steps=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_memory_rows_match_a_tensor(width, chunk_rows, dtype, steps, seed):
    table = MemoryRows(width, dtype, chunk_bytes=chunk_rows * width * dtype.itemsize)
    assert table.chunk_rows == chunk_rows
    _exercise(table, np.random.default_rng(seed), steps, width, dtype)
    # whole chunks are allocated: at most one chunk ahead of the rows (exact growth adds none)
    row_bytes = width * dtype.itemsize
    assert len(table) * row_bytes <= table.nbytes <= (len(table) + chunk_rows) * row_bytes


@given(width=st.integers(1, 4), dtype=st.sampled_from(DTYPES), steps=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_file_rows_match_a_tensor_and_stay_a_plain_npy(width, dtype, steps, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.npy"
        table = FileRows.create(path, width, dtype, rows=int(rng.integers(0, 4)))
        reference = _exercise(table, rng, steps, width, dtype)
        assert table.nbytes == len(table) * width * dtype.itemsize
        table.close()
        on_disk = np.load(path)
        assert on_disk.dtype == numpy_dtype(dtype) and on_disk.shape == (len(reference), width)
        assert np.array_equal(on_disk.view(np.int16) if dtype != torch.float32 else on_disk, _bits(reference))


@given(n=st.integers(1, 2 * LONG_RUN), width=st.integers(1, 3), seed=st.integers(0, 2**16),
       runs=st.booleans())
def test_file_rows_gather_scatter_long_runs_and_repeats(n, width, seed, runs):
    """Positioned reads and writes: any order, repeats (reads), runs of adjacent rows longer
    than one ``preadv`` call takes."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(-2**15, 2**15, size=(n, width)).astype("<f2")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.npy")
        np.save(path, reference)  # a file numpy wrote: its header has room to grow too
        table = FileRows(path, width, torch.float16)
        try:
            if runs:  # a long shuffled block of adjacent rows plus a few others
                start = int(rng.integers(0, n))
                stop = min(n, start + int(rng.integers(1, LONG_RUN + 1)))
                rows = np.unique(np.concatenate([np.arange(start, stop), rng.integers(0, n, 5)]))
                rng.shuffle(rows)
            else:
                rows = rng.permutation(n)[: rng.integers(0, n + 1)]
            with_repeats = torch.from_numpy(np.concatenate([rows, rows[:3]]))
            assert np.array_equal(table.gather(with_repeats).numpy(), reference[with_repeats.numpy()])
            values = rng.integers(-2**15, 2**15, size=(len(rows), width)).astype("<f2")
            table.scatter(torch.from_numpy(rows), torch.from_numpy(values))
            reference[rows] = values
            assert np.array_equal(torch.cat(list(table.blocks(n))).numpy(), reference)
            table.grow(2)
        finally:
            table.close()
        assert np.array_equal(np.load(path), np.concatenate([reference, np.zeros((2, width), "<f2")]))


def test_memory_rows_grow_without_copying():
    table = MemoryRows(3, torch.float32, chunk_bytes=4 * 3 * 4)
    table.grow(4)
    table.scatter(torch.arange(4), torch.arange(12.0).reshape(4, 3))
    first = next(table.blocks(4))
    for _ in range(5):
        table.grow(3)
    assert next(table.blocks(4)).data_ptr() == first.data_ptr()  # the first chunk never moved
    assert table.gather(torch.arange(4)).tolist() == torch.arange(12.0).reshape(4, 3).tolist()
    assert table.nbytes == 20 * 3 * 4  # 5 chunks of 4 rows: 19 rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_rows_round_trip(tmp_path, dtype):
    table = MemoryRows(5, dtype, chunk_bytes=3 * 5 * dtype.itemsize)
    table.grow(10)
    values = _random_values(np.random.default_rng(0), 10, 5, dtype)
    table.write(0, values)
    save_rows(tmp_path / "rows.npy", table, max_rows=4)
    reopened = FileRows(tmp_path / "rows.npy", 5, dtype, writable=False)
    assert len(reopened) == 10
    assert np.array_equal(_bits(reopened.gather(torch.arange(10))), _bits(values))
    reopened.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_file_rows_errors(tmp_path):
    path = tmp_path / "rows.npy"
    FileRows.create(path, 4, torch.float16, rows=3).close()
    with pytest.raises(ValueError, match=r"rows.npy: expected a float16 array of shape \(R, 5\), got float16 shape \(3, 4\)"):
        FileRows(path, 5, torch.float16)
    with pytest.raises(ValueError, match=r"expected a float32 array of shape \(R, 4\), got float16"):
        FileRows(path, 4, torch.float32)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(ValueError, match=r"rows.npy: holds 21 bytes of data, expected 3 rows x 8 bytes = 24"):
        FileRows(path, 4, torch.float16)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((3, 4), "<f2")))
    with pytest.raises(ValueError, match="expected a C-ordered array"):
        FileRows(tmp_path / "fortran.npy", 4, torch.float16)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        numpy_dtype(torch.int8)


def test_map_npy_checks_shape_and_dtype(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(5, dtype="<i8"))
    mm, array = map_npy(tmp_path / "a.npy", (5,), np.dtype("<i8"), writable=True)
    array[2] = 7
    del array
    mm.close()
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 7, 3, 4]
    with pytest.raises(ValueError, match=r"a.npy: expected a int64 array of shape \(6\), got int64 shape \(5,\)"):
        map_npy(tmp_path / "a.npy", (6,), np.dtype("<i8"), writable=False)
