import json
import os
import sys
import tempfile

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from umilayers.pseudo_labels import _IOV_MAX, PseudoLabelBank, _RowFile

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _random_updates(rng, bank, modalities, max_abs, skip=0.3, order="shuffled"):
    """Drive ``bank`` with random updates; return the float64 reference sums and counts."""
    n, c = bank.num_samples, bank.num_outputs
    sums = {m: np.zeros((n, c)) for m in modalities}
    counts = {m: np.zeros(n, dtype=np.int64) for m in modalities}
    epochs = list(range(bank.total_epochs))
    if order == "shuffled":
        rng.shuffle(epochs)
    for epoch in epochs:
        for m in modalities:
            chosen = rng.permutation(n)[: rng.integers(0, n + 1)]
            if rng.random() < skip:
                continue
            preds = rng.uniform(-max_abs, max_abs, size=(len(chosen), c))
            # several calls per epoch, as batches of a data loader
            for part in np.array_split(np.arange(len(chosen)), rng.integers(1, 4)):
                bank.update(m, torch.from_numpy(chosen[part]), torch.from_numpy(preds[part]).float(), epoch)
            if epoch >= bank.first_epoch:
                # the reference sees the float32 predictions the bank was given
                sums[m][chosen] += preds.astype(np.float32).astype(np.float64)
                counts[m][chosen] += 1
    return sums, counts


@given(
    n=st.integers(1, 12),
    c=st.integers(1, 6),
    num_modalities=st.integers(1, 3),
    total_epochs=st.integers(1, 8),
    window_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    probabilities=st.booleans(),
    seed=st.integers(0, 2**16),
    on_disk=st.booleans(),
)
def test_averages_match_numpy_reference(n, c, num_modalities, total_epochs, window_frac, dtype,
                                        probabilities, seed, on_disk):
    with tempfile.TemporaryDirectory() as tmp:
        _check_averages(n, c, num_modalities, total_epochs, window_frac, dtype, probabilities,
                        seed, storage=tmp if on_disk else None)


def _check_averages(n, c, num_modalities, total_epochs, window_frac, dtype, probabilities, seed,
                    storage):
    rng = np.random.default_rng(seed)
    window = max(1, round(window_frac * total_epochs))
    modalities = ["audio", "rgb", "flow"][:num_modalities]
    bank = PseudoLabelBank(n, c, modalities, window, total_epochs, storage=storage, dtype=dtype)
    max_abs = 1.0 if probabilities else 50.0
    sums, counts = _random_updates(rng, bank, modalities, max_abs)
    for m in modalities:
        assert bank.counts(m).tolist() == counts[m].tolist()
        rows = np.nonzero(counts[m])[0]
        if len(rows) == 0:
            continue
        got = bank.targets(torch.from_numpy(rows), {m: torch.ones(len(rows), dtype=torch.bool)})
        assert got.dtype == torch.float32 and got.shape == (len(rows), c)
        expected = sums[m][rows] / counts[m][rows][:, None]
        bound = bank.error_bound(max_abs)
        err = np.abs(got.double().numpy() - expected).max()
        assert err <= bound, (err, bound)
    bank.close()


def test_error_bound_values_and_fp16_is_much_coarser_than_fp32():
    fp16 = PseudoLabelBank(1, 1, ["a"], 10, 10)
    fp32 = PseudoLabelBank(1, 1, ["a"], 10, 10, dtype=torch.float32)
    assert fp16.error_bound() == pytest.approx(5.5 * (2**-11 + 8 * 2**-24 + 2**-25))
    assert fp16.error_bound() < 3e-3
    assert fp32.error_bound() < 3.1e-6
    # the bound is not vacuous: plain float16 rounding of 1/3 already costs ~1e-4
    bank = PseudoLabelBank(1, 1, ["a"], 1, 1)
    bank.update("a", torch.tensor([0]), torch.tensor([[1 / 3]]), 0)
    err = abs(float(bank.targets(torch.tensor([0]), {"a": torch.tensor([True])})) - 1 / 3)
    assert 0 < err <= bank.error_bound(updates=1)


def test_early_epochs_are_ignored_and_missed_epochs_averaged_correctly():
    bank = PseudoLabelBank(3, 2, ["rgb"], window=3, total_epochs=5, dtype=torch.float32)
    ids = torch.tensor([0, 1, 2])
    for epoch in range(5):
        preds = torch.full((3, 2), float(epoch))
        if epoch == 3:  # sample 2 is missed in epoch 3
            bank.update("rgb", ids[:2], preds[:2], epoch)
        else:
            bank.update("rgb", ids, preds, epoch)
    assert bank.counts("rgb").tolist() == [3, 3, 2]
    got = bank.targets(ids, {"rgb": torch.ones(3, dtype=torch.bool)})
    assert got[:, 0].tolist() == [3.0, 3.0, 3.0]  # (2+3+4)/3 and (2+4)/2
    only_early = PseudoLabelBank(2, 2, ["rgb"], window=1, total_epochs=3)
    only_early.update("rgb", torch.tensor([0]), torch.ones(1, 2), 0)
    assert only_early.counts("rgb").tolist() == [0, 0]


@given(n=st.integers(1, 10), c=st.integers(2, 6), classification=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cosine_selection_picks_the_closest_modality(n, c, classification, seed):
    rng = np.random.default_rng(seed)
    modalities = ["audio", "depth", "rgb"]
    bank = PseudoLabelBank(n, c, modalities, window=2, total_epochs=2, dtype=torch.float32)
    ids = torch.arange(n)
    for m in modalities:
        for epoch in range(2):
            values = rng.random((n, c)) if classification else rng.normal(size=(n, c))
            bank.update(m, ids, torch.from_numpy(values).float(), epoch)
    present = {m: torch.from_numpy(rng.random(n) < 0.7) for m in modalities}
    present["rgb"] |= ~(present["audio"] | present["depth"])  # every row has a modality
    if classification:
        gt = torch.from_numpy(rng.integers(0, c, n))
        gt_vec = np.eye(c)[gt.numpy()]
    else:
        gt = torch.from_numpy(rng.normal(size=(n, c))).float()
        gt_vec = gt.double().numpy()
    single = {m: bank.targets(ids, {m: torch.ones(n, dtype=torch.bool)}).double().numpy()
              for m in modalities}
    got = bank.targets(ids, present, ground_truth=gt)
    for i in range(n):
        scores = []
        for m in modalities:
            if present[m][i]:
                v = single[m][i]
                scores.append((v @ gt_vec[i] / (np.linalg.norm(v) * np.linalg.norm(gt_vec[i])), m))
        ranked = sorted((s for s, _ in scores), reverse=True)
        assume(len(ranked) == 1 or ranked[0] - ranked[1] > 1e-5)
        best = max(scores, key=lambda sm: sm[0])[1]
        assert torch.equal(got[i].double(), torch.from_numpy(single[best][i])), (i, scores)


def test_cosine_selection_example_and_ties():
    bank = PseudoLabelBank(2, 3, ["audio", "rgb"], window=1, total_epochs=1, dtype=torch.float32)
    bank.update("audio", torch.tensor([0, 1]), torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]), 0)
    bank.update("rgb", torch.tensor([0, 1]), torch.tensor([[0.1, 0.8, 0.1], [0.5, 0.5, 0.0]]), 0)
    both = {"audio": torch.tensor([True, True]), "rgb": torch.tensor([True, True])}
    got = bank.targets(torch.tensor([0, 0]), both, ground_truth=torch.tensor([0, 1]))
    torch.testing.assert_close(got, torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))
    # regression-style ground truth
    got = bank.targets(torch.tensor([0]), {"audio": torch.tensor([True]), "rgb": torch.tensor([True])},
                       ground_truth=torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.8, 0.1]]))
    # identical averages: first modality in sorted order
    got = bank.targets(torch.tensor([1]), {"rgb": torch.tensor([True]), "audio": torch.tensor([True])},
                       ground_truth=torch.tensor([0]))
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.5, 0.0]]))
    # a modality absent from `present` or False for the row is not considered
    got = bank.targets(torch.tensor([0]), {"rgb": torch.tensor([True]), "audio": torch.tensor([False])},
                       ground_truth=torch.tensor([0]))
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.8, 0.1]]))


def _filled_bank(storage=None, dtype=torch.float16, seed=0, **kwargs):
    bank = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6, storage=storage,
                           dtype=dtype, **kwargs)
    _random_updates(np.random.default_rng(seed), bank, bank.modalities, 1.0, order="sorted")
    return bank


def _assert_same_bank(a, b):
    assert a.config() == b.config()
    for m in a.modalities:
        ma, mb = a._means(m), b._means(m)
        assert torch.equal(ma.view(torch.int16) if a.dtype != torch.float32 else ma,
                           mb.view(torch.int16) if b.dtype != torch.float32 else mb)
        assert torch.equal(a._seen[m], b._seen[m])


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    bank = _filled_bank(dtype=dtype)
    bank.save(tmp_path / "bank")
    assert sorted(os.listdir(tmp_path / "bank")) == [
        "bank.json", "mean.audio.npy", "mean.rgb.npy", "seen.audio.npy", "seen.rgb.npy"]
    loaded = PseudoLabelBank.load(tmp_path / "bank")
    assert loaded.storage is None
    _assert_same_bank(bank, loaded)
    with PseudoLabelBank.load(tmp_path / "bank", mmap=True) as mapped:
        _assert_same_bank(bank, mapped)
    # the saved files are plain .npy
    if dtype == torch.float16:
        assert np.array_equal(np.load(tmp_path / "bank" / "mean.rgb.npy"), bank._mean["rgb"].numpy())
    # saving again over an existing bank replaces it
    other = _filled_bank(dtype=dtype, seed=1)
    other.save(tmp_path / "bank")
    _assert_same_bank(other, PseudoLabelBank.load(tmp_path / "bank"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_memmap_mode_gives_the_same_numbers(tmp_path, dtype):
    memory = _filled_bank(dtype=dtype)
    mapped = _filled_bank(storage=tmp_path / "a", dtype=dtype)
    tight = _filled_bank(storage=tmp_path / "b", dtype=dtype, resident_budget=1)  # 1-row chunks
    ids = torch.arange(17)
    for m in memory.modalities:
        assert torch.equal(memory.counts(m), mapped.counts(m))
        updated = memory.counts(m) > 0
        one = {m: torch.ones(int(updated.sum()), dtype=torch.bool)}
        expected = memory.targets(ids[updated], one)
        assert torch.equal(mapped.targets(ids[updated], one), expected)
        assert torch.equal(tight.targets(ids[updated], one), expected)
    _assert_same_bank(memory, mapped)
    _assert_same_bank(memory, tight)
    assert mapped.nbytes == memory.nbytes
    # the files are the bank: reopening them after a flush gives the same numbers
    mapped.flush()
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "a"))
    mapped.save(tmp_path / "a")  # saving onto its own storage just flushes
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "a"))
    tight.save(tmp_path / "copy")  # streamed row by row from the files
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "copy"))
    with PseudoLabelBank.load(tmp_path / "copy", mmap=True, resident_budget=1) as reopened:
        _assert_same_bank(memory, reopened)
        assert torch.equal(reopened.targets(ids[:3], {"rgb": torch.ones(3, dtype=torch.bool)},),
                           memory.targets(ids[:3], {"rgb": torch.ones(3, dtype=torch.bool)}))
    mapped.close()
    tight.close()


@given(n=st.integers(1, 2200), width=st.integers(1, 3), seed=st.integers(0, 2**16),
       runs=st.booleans())
def test_row_file_gather_scatter_match_numpy(n, width, seed, runs):
    """Positioned reads and writes: any order, repeats (reads), runs of adjacent rows longer
    than one ``preadv`` call takes (``_IOV_MAX``)."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(-2**15, 2**15, size=(n, width)).astype("<i2")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.npy")
        np.save(path, reference)
        rows_file = _RowFile(Path(path), (n, width), np.dtype("<i2"), writable=True)
        try:
            if runs:  # a long shuffled block of adjacent rows plus a few others
                start = int(rng.integers(0, n))
                stop = min(n, start + int(rng.integers(1, 2 * _IOV_MAX + 3)))
                rows = np.concatenate([np.arange(start, stop), rng.integers(0, n, 5)])
                rows = np.unique(rows)
                rng.shuffle(rows)
            else:
                rows = rng.permutation(n)[: rng.integers(0, n + 1)]
            with_repeats = np.concatenate([rows, rows[:3]])
            assert np.array_equal(rows_file.gather(with_repeats), reference[with_repeats])
            values = rng.integers(-2**15, 2**15, size=(len(rows), width)).astype("<i2")
            rows_file.scatter(rows, values)
            reference[rows] = values
            assert np.array_equal(rows_file.read(0, n), reference)
            lo = int(rng.integers(0, n))
            assert np.array_equal(rows_file.read(lo, n), reference[lo:])
        finally:
            rows_file.close()
        assert np.array_equal(np.load(path), reference)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_file_backed_bank_does_not_map_its_means(tmp_path):
    """The process holds the batch, not the table: the means' files are never mapped."""
    bank = PseudoLabelBank(300, 64, ["audio", "rgb"], window=2, total_epochs=2,
                           storage=tmp_path / "bank")
    ids = torch.randperm(300)[:100]
    bank.update("rgb", ids, torch.rand(100, 64), 1)
    bank.targets(ids, {"rgb": torch.ones(100, dtype=torch.bool)})
    maps = open("/proc/self/maps").read()
    assert str(tmp_path / "bank" / "seen.rgb.npy") in maps  # the 8-byte masks are mapped
    assert "mean.rgb.npy" not in maps and "mean.audio.npy" not in maps
    bank.close()


def test_truncated_file_is_an_error(tmp_path):
    bank = _filled_bank(storage=tmp_path / "a")
    bank.close()
    path = tmp_path / "a" / "mean.rgb.npy"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(OSError, match="mean.rgb.npy: file ends 3 bytes early"):
        PseudoLabelBank.load(tmp_path / "a")
    with PseudoLabelBank.load(tmp_path / "a", mmap=True) as mapped:
        with pytest.raises(OSError, match=r"mean.rgb.npy: read \d+ of 10 bytes"):
            mapped.targets(torch.tensor([16]), {"rgb": torch.tensor([True])})


def test_memmap_storage_is_refused_when_it_holds_a_bank(tmp_path):
    bank = PseudoLabelBank(4, 2, ["rgb"], 1, 1, storage=tmp_path)
    bank.update("rgb", torch.tensor([1]), torch.ones(1, 2), 0)
    bank.close()
    with pytest.raises(FileExistsError, match="already holds a PseudoLabelBank"):
        PseudoLabelBank(4, 2, ["rgb"], 1, 1, storage=tmp_path)
    fresh = PseudoLabelBank(4, 2, ["rgb"], 1, 1, storage=tmp_path, overwrite=True)
    assert fresh.counts("rgb").tolist() == [0, 0, 0, 0]
    fresh.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_state_dict_round_trips(tmp_path):
    bank = _filled_bank()
    state = bank.state_dict()
    assert set(state) == {"config", "mean", "seen"}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    restored = PseudoLabelBank(17, 5, ["rgb", "audio"], window=3, total_epochs=6)
    restored.load_state_dict(torch.load(path))
    _assert_same_bank(bank, restored)
    # a memmap bank's state references its files; loading it into a memory bank copies them
    mapped = _filled_bank(storage=tmp_path / "mm")
    mm_state = mapped.state_dict()
    assert set(mm_state) == {"config", "storage"}
    json.dumps(mm_state)
    copy = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6)
    copy.load_state_dict(mm_state)
    _assert_same_bank(mapped, copy)
    mapped.load_state_dict(mm_state)  # its own files: nothing to do
    # and a memory state loads into a memmap bank
    target = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6, storage=tmp_path / "t")
    target.load_state_dict(state)
    _assert_same_bank(bank, target)
    with pytest.raises(ValueError, match="state: expected config"):
        PseudoLabelBank(17, 5, ["audio", "rgb"], window=2, total_epochs=6).load_state_dict(state)
    mapped.close()
    target.close()


def test_restored_bank_continues_like_the_original():
    a = PseudoLabelBank(6, 3, ["rgb"], window=3, total_epochs=4, dtype=torch.float16)
    a.update("rgb", torch.arange(6), torch.rand(6, 3), 1)
    b = PseudoLabelBank(6, 3, ["rgb"], window=3, total_epochs=4)
    b.load_state_dict({k: ({m: t.clone() for m, t in v.items()} if isinstance(v, dict) and k != "config" else v)
                       for k, v in a.state_dict().items()})
    preds = torch.rand(6, 3)
    a.update("rgb", torch.arange(6), preds, 2)
    b.update("rgb", torch.arange(6), preds, 2)
    _assert_same_bank(a, b)
    with pytest.raises(ValueError, match="already recorded"):
        b.update("rgb", torch.tensor([4]), preds[:1], 1)


def test_nbytes_at_epic_size_is_under_one_gigabyte():
    n, c = 62_429, 3_806
    estimate = PseudoLabelBank.estimate_nbytes(n, c, 2, torch.float16)
    assert estimate == 2 * n * (c * 2 + 8)
    assert estimate < 1_000_000_000
    # the estimate is what a bank really allocates
    small = PseudoLabelBank(123, 45, ["audio", "rgb"], window=10, total_epochs=30)
    arrays = [*small._mean.values(), *small._seen.values()]
    assert small.nbytes == sum(t.untyped_storage().nbytes() for t in arrays)
    assert small.nbytes == PseudoLabelBank.estimate_nbytes(123, 45, 2)
    # float32 at EPIC size would not fit
    assert PseudoLabelBank.estimate_nbytes(n, c, 2, torch.float32) > 1_000_000_000


def test_memmap_files_hold_exactly_the_data(tmp_path):
    bank = PseudoLabelBank(100, 7, ["rgb"], window=2, total_epochs=3, storage=tmp_path)
    data = os.path.getsize(tmp_path / "mean.rgb.npy") + os.path.getsize(tmp_path / "seen.rgb.npy")
    assert 0 <= data - bank.nbytes <= 2 * 4096  # two .npy headers
    bank.close()


def test_update_errors_leave_the_bank_unchanged():
    bank = PseudoLabelBank(5, 3, ["audio", "rgb"], window=2, total_epochs=4)
    ids, preds = torch.tensor([0, 1]), torch.rand(2, 3)
    bank.update("rgb", ids, preds, 3)
    before = (bank._mean["rgb"].clone(), bank._seen["rgb"].clone())
    cases = [
        (("depth", ids, preds, 3), ValueError, r"modality: unknown modality 'depth', expected one of \['audio', 'rgb'\]"),
        (("rgb", torch.tensor([0, 5]), preds, 3), ValueError, r"indices: expected sample ids in \[0, 5\), got 1 out of range, e.g. \[5\]"),
        (("rgb", torch.tensor([-1, 2]), preds, 3), ValueError, r"e.g. \[-1\]"),
        (("rgb", ids, torch.rand(2, 4), 3), ValueError, r"predictions: expected shape \(B=2, C=3\), got \(2, 4\)"),
        (("rgb", ids, torch.rand(3, 3), 3), ValueError, r"predictions: expected shape \(B=2, C=3\), got \(3, 3\)"),
        (("rgb", ids, preds, 4), ValueError, r"epoch: expected 0 <= epoch < total_epochs=4, got 4"),
        (("rgb", ids, preds, -1), ValueError, r"got -1"),
        (("rgb", ids, preds, 2.0), TypeError, r"epoch: expected an int"),
        (("rgb", torch.tensor([2, 2]), preds, 2), ValueError, r"indices: expected no duplicates, got 1 ids repeated, e.g. \[2\]"),
        (("rgb", torch.tensor([2, 1]), preds, 3), ValueError, r"1 of 2 samples were already recorded for modality 'rgb' at epoch 3, e.g. \[1\]"),
        (("rgb", ids, torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3]), 2), ValueError, "predictions: expected finite values, found 1"),
        (("rgb", ids, torch.full((2, 3), 7e4), 2), ValueError, r"overflow the bank's dtype torch.float16"),
        (("rgb", torch.tensor([0.0, 1.0]), preds, 2), TypeError, "indices: expected an integer tensor"),
        (("rgb", torch.zeros(2, 1, dtype=torch.long), preds, 2), ValueError, "indices: expected a 1-d tensor"),
        (("rgb", ids, torch.ones(2, 3, dtype=torch.long), 2), TypeError, "predictions: expected a floating-point tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            bank.update(*args)
    assert torch.equal(bank._mean["rgb"], before[0]) and torch.equal(bank._seen["rgb"], before[1])
    # errors are raised for early (ignored) epochs too
    with pytest.raises(ValueError, match="indices: expected sample ids"):
        bank.update("rgb", torch.tensor([9]), torch.rand(1, 3), 0)


def test_targets_errors():
    bank = PseudoLabelBank(5, 3, ["audio", "rgb"], window=1, total_epochs=1)
    bank.update("rgb", torch.tensor([0, 1]), torch.rand(2, 3), 0)
    bank.update("audio", torch.tensor([1, 2]), torch.rand(2, 3), 0)
    yes, both = torch.tensor([True]), {"audio": torch.tensor([True]), "rgb": torch.tensor([True])}
    with pytest.raises(ValueError, match=r"modality 'rgb' was never recorded \(in epochs 0..0\) for 2 of 3 samples, e.g. ids \[2, 4\]"):
        bank.targets(torch.tensor([0, 2, 4]), {"rgb": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"present: unknown modality 'depth'"):
        bank.targets(torch.tensor([0]), {"depth": yes})
    with pytest.raises(ValueError, match=r"indices: expected sample ids in \[0, 5\)"):
        bank.targets(torch.tensor([7]), {"rgb": yes})
    with pytest.raises(ValueError, match=r"present: 1 of 2 samples have no modality, rows \[1\]"):
        bank.targets(torch.tensor([0, 1]), {"rgb": torch.tensor([True, False])})
    with pytest.raises(ValueError, match=r"ground_truth: required to choose between modalities, 1 of 1"):
        bank.targets(torch.tensor([1]), both)
    with pytest.raises(ValueError, match=r"ground_truth: expected class labels in \[0, 3\)"):
        bank.targets(torch.tensor([1]), both, ground_truth=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"ground_truth: expected shape \(B=1, C=3\)"):
        bank.targets(torch.tensor([1]), both, ground_truth=torch.rand(1, 4))
    with pytest.raises(TypeError, match="ground_truth: a 1-d ground truth holds class labels"):
        bank.targets(torch.tensor([1]), both, ground_truth=torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"present\['rgb'\]: expected shape \(B=1\)"):
        bank.targets(torch.tensor([1]), {"rgb": torch.tensor([True, True])})
    with pytest.raises(TypeError, match=r"present\['rgb'\]: expected a torch.bool mask"):
        bank.targets(torch.tensor([1]), {"rgb": torch.tensor([1])})
    with pytest.raises(ValueError, match="present: expected a non-empty mapping"):
        bank.targets(torch.tensor([1]), {})
    with pytest.raises(ValueError, match="modality: unknown modality"):
        bank.counts("depth")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"window: expected 1 <= window <= min\(total_epochs=3, 63\), got 4"):
        PseudoLabelBank(2, 2, ["a"], 4, 3)
    with pytest.raises(ValueError, match="got 64"):
        PseudoLabelBank(2, 2, ["a"], 64, 100)
    with pytest.raises(ValueError, match="num_samples: expected a positive int, got 0"):
        PseudoLabelBank(0, 2, ["a"], 1, 1)
    with pytest.raises(ValueError, match="modalities: expected unique names"):
        PseudoLabelBank(2, 2, ["a", "a"], 1, 1)
    with pytest.raises(ValueError, match="modalities: names may hold"):
        PseudoLabelBank(2, 2, ["a/b"], 1, 1)
    with pytest.raises(TypeError, match="modalities: expected a sequence of names"):
        PseudoLabelBank(2, 2, "rgb", 1, 1)
    with pytest.raises(ValueError, match="modalities: expected at least one"):
        PseudoLabelBank(2, 2, [], 1, 1)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        PseudoLabelBank(2, 2, ["a"], 1, 1, dtype=torch.int32)
    with pytest.raises(FileNotFoundError, match="bank.json missing"):
        PseudoLabelBank.load(tmp_path)
    (tmp_path / "bank.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="expected format 'umilayers.PseudoLabelBank'"):
        PseudoLabelBank.load(tmp_path)


def test_targets_device_and_dtype_of_inputs():
    bank = PseudoLabelBank(4, 2, ["rgb"], window=1, total_epochs=1, dtype=torch.float32)
    bank.update("rgb", [3, 1], torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), 0)
    got = bank.targets(torch.tensor([1, 3], dtype=torch.int32), {"rgb": torch.tensor([True, True])},
                       device="cpu")
    assert got.tolist() == [[3.0, 4.0], [1.0, 2.0]]
    assert "storage" not in repr(bank) and "num_samples=4" in repr(bank)
