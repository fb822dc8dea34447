import json
import os
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from umilayers.pseudo_labels import PseudoLabelBank
from umilayers.row_storage import DEFAULT_CHUNK_BYTES

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# which (sample, modality) pairs a bank is told up front with ``present=``
LAYOUTS = ["learned", "told", "told_all", "told_some"]


def _plan_updates(rng, n, c, modalities, total_epochs, max_abs, pattern="random", skip=0.3,
                  order="shuffled"):
    """Random update calls ``(modality, ids, predictions, epoch)``, several per epoch as batches.

    ``pattern="split"``: every sample has one modality (the two-split training of the paper);
    ``"random"``: any sample may be recorded in any modality.
    """
    owner = rng.integers(0, len(modalities), n)
    epochs = list(range(total_epochs))
    if order == "shuffled":
        rng.shuffle(epochs)
    calls = []
    for epoch in epochs:
        for j, m in enumerate(modalities):
            candidates = np.flatnonzero(owner == j) if pattern == "split" else np.arange(n)
            chosen = rng.permutation(candidates)[: rng.integers(0, len(candidates) + 1)]
            if rng.random() < skip:
                continue
            preds = rng.uniform(-max_abs, max_abs, size=(len(chosen), c))
            for part in np.array_split(np.arange(len(chosen)), rng.integers(1, 4)):
                calls.append((m, chosen[part], preds[part].astype(np.float32), epoch))
    return calls


def _apply(bank, calls):
    for m, ids, preds, epoch in calls:
        bank.update(m, torch.from_numpy(ids), torch.from_numpy(preds), epoch)


def _reference(calls, n, c, modalities, first_epoch):
    """Float64 sums and counts of the float32 predictions recorded inside the window."""
    sums = {m: np.zeros((n, c)) for m in modalities}
    counts = {m: np.zeros(n, dtype=np.int64) for m in modalities}
    for m, ids, preds, epoch in calls:
        if epoch >= first_epoch:
            sums[m][ids] += preds.astype(np.float64)
            counts[m][ids] += 1
    return sums, counts


def _present(layout, rng, counts, n):
    """The ``present=`` argument of a layout, given the pairs the updates will record."""
    if layout == "learned":
        return None
    if layout == "told_all":  # a row for every sample and modality: the layout of version 1
        return {m: torch.ones(n, dtype=torch.bool) for m in counts}
    recorded = {m: torch.from_numpy(k > 0) for m, k in counts.items()}
    if layout == "told":
        return recorded
    # told_some: some recorded pairs left out (added when written), some never recorded told
    return {m: (r & torch.from_numpy(rng.random(n) < 0.5)) | torch.from_numpy(rng.random(n) < 0.2)
            for m, r in recorded.items()}


def _one(k):
    return torch.ones(k, dtype=torch.bool)


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
    layout=st.sampled_from(LAYOUTS),
    pattern=st.sampled_from(["random", "split"]),
    chunk_rows=st.integers(1, 5),
)
def test_averages_match_numpy_reference(n, c, num_modalities, total_epochs, window_frac, dtype,
                                        probabilities, seed, on_disk, layout, pattern, chunk_rows):
    """Every layout gives the numpy reference within the error bound, and the very same bits as
    a bank holding a row for every sample and modality."""
    rng = np.random.default_rng(seed)
    window = max(1, round(window_frac * total_epochs))
    modalities = ["audio", "rgb", "flow"][:num_modalities]
    max_abs = 1.0 if probabilities else 50.0
    calls = _plan_updates(rng, n, c, modalities, total_epochs, max_abs, pattern)
    sums, counts = _reference(calls, n, c, modalities, total_epochs - window)
    present = _present(layout, rng, counts, n)
    dense = PseudoLabelBank(n, c, modalities, window, total_epochs, dtype=dtype,
                            present={m: _one(n) for m in modalities})
    _apply(dense, calls)
    with tempfile.TemporaryDirectory() as tmp:
        bank = PseudoLabelBank(n, c, modalities, window, total_epochs, storage=tmp if on_disk else None,
                               dtype=dtype, present=present, chunk_bytes=chunk_rows * c * dtype.itemsize)
        _apply(bank, calls)
        for m in modalities:
            assert bank.counts(m).tolist() == counts[m].tolist()
            told = torch.zeros(n, dtype=torch.bool) if present is None else present[m]
            assert torch.equal(bank.stored(m), told | torch.from_numpy(counts[m] > 0))
            rows = np.nonzero(counts[m])[0]
            if len(rows) == 0:
                continue
            got = bank.targets(torch.from_numpy(rows), {m: _one(len(rows))})
            assert got.dtype == torch.float32 and got.shape == (len(rows), c)
            expected = sums[m][rows] / counts[m][rows][:, None]
            bound = bank.error_bound(max_abs)
            err = np.abs(got.double().numpy() - expected).max()
            assert err <= bound, (err, bound)
            assert torch.equal(got, dense.targets(torch.from_numpy(rows), {m: _one(len(rows))}))
        stored = sum(int(bank.stored(m).sum()) for m in modalities)
        if on_disk or layout == "told":  # exact sizes: the file's rows, or rows allocated at once
            assert bank.nbytes == PseudoLabelBank.estimate_nbytes(n, c, num_modalities, dtype, pairs=stored)
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
    assert only_early.stored("rgb").tolist() == [False, False]  # ignored epochs store no row


@given(n=st.integers(1, 10), c=st.integers(2, 6), classification=st.booleans(),
       seed=st.integers(0, 2**16), learned=st.booleans())
def test_cosine_selection_picks_the_closest_modality(n, c, classification, seed, learned):
    rng = np.random.default_rng(seed)
    modalities = ["audio", "depth", "rgb"]
    present = {m: torch.from_numpy(rng.random(n) < 0.7) for m in modalities}
    present["rgb"] |= ~(present["audio"] | present["depth"])  # every row has a modality
    # only the pairs that exist are recorded: rows learned from the updates, or told up front
    bank = PseudoLabelBank(n, c, modalities, window=2, total_epochs=2, dtype=torch.float32,
                           present=None if learned else present, chunk_bytes=2 * c * 4)
    for m in modalities:
        ids = present[m].nonzero().flatten()
        for epoch in range(2):
            values = rng.random((len(ids), c)) if classification else rng.normal(size=(len(ids), c))
            bank.update(m, ids, torch.from_numpy(values).float(), epoch)
    if classification:
        gt = torch.from_numpy(rng.integers(0, c, n))
        gt_vec = np.eye(c)[gt.numpy()]
    else:
        gt = torch.from_numpy(rng.normal(size=(n, c))).float()
        gt_vec = gt.double().numpy()
    ids = torch.arange(n)
    single = {}
    for m in modalities:
        rows = present[m].nonzero().flatten()
        single[m] = np.zeros((n, c))
        if rows.numel():
            single[m][rows.numpy()] = bank.targets(rows, {m: _one(rows.numel())}).double().numpy()
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


def _split_masks(n, modalities=("audio", "rgb")):
    """Two training splits: the first half of the samples has audio only, the rest rgb only."""
    first = torch.arange(n) < n // 2
    return {modalities[0]: first, modalities[1]: ~first}


def test_two_split_bank_holds_one_row_per_sample():
    """Each sample has one modality: rows for those pairs only, the same bits as a full bank."""
    n, c = 40, 7
    split = _split_masks(n)
    rng = np.random.default_rng(0)
    learned = PseudoLabelBank(n, c, ["audio", "rgb"], window=2, total_epochs=3, chunk_bytes=5 * c * 2)
    told = PseudoLabelBank(n, c, ["audio", "rgb"], window=2, total_epochs=3, present=split)
    full = PseudoLabelBank(n, c, ["audio", "rgb"], window=2, total_epochs=3,
                           present={m: _one(n) for m in split})
    for epoch in range(3):
        for m, mask in split.items():
            ids = mask.nonzero().flatten()[torch.from_numpy(rng.permutation(int(mask.sum())))]
            preds = torch.from_numpy(rng.random((ids.numel(), c))).float().softmax(-1)
            for bank in (learned, told, full):
                bank.update(m, ids, preds, epoch)
    for m, mask in split.items():
        assert torch.equal(learned.stored(m), mask) and torch.equal(told.stored(m), mask)
    ids = torch.from_numpy(rng.permutation(n))
    present = {m: mask[ids] for m, mask in split.items()}
    expected = full.targets(ids, present)
    assert torch.equal(learned.targets(ids, present), expected)
    assert torch.equal(told.targets(ids, present), expected)
    half = PseudoLabelBank.estimate_nbytes(n, c, 2, pairs=n)
    assert told.nbytes == half < full.nbytes == PseudoLabelBank.estimate_nbytes(n, c, 2)
    assert half <= learned.nbytes <= half + 2 * 5 * c * 2  # at most one chunk ahead a modality


def _filled_bank(storage=None, dtype=torch.float16, seed=0, **kwargs):
    """A bank driven by random updates of 17 samples x 2 modalities (some pairs never recorded)."""
    bank = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6, storage=storage,
                           dtype=dtype, **kwargs)
    calls = _plan_updates(np.random.default_rng(seed), 17, 5, bank.modalities, 6, 1.0, order="sorted")
    _apply(bank, calls)
    return bank


def _assert_same_bank(a, b):
    """Same config, counts, rows and (bit for bit) targets of every recorded pair."""
    assert a.config() == b.config()
    for m in a.modalities:
        assert torch.equal(a.counts(m), b.counts(m))
        assert torch.equal(a.stored(m), b.stored(m))
        ids = (a.counts(m) > 0).nonzero().flatten()
        if ids.numel():  # float32 holds every float16 / bfloat16 value exactly
            assert torch.equal(a.targets(ids, {m: _one(ids.numel())}), b.targets(ids, {m: _one(ids.numel())}))


def _snapshot(bank):
    """A deep copy of an in-memory bank's state."""
    state = bank.state_dict()
    return {
        "config": state["config"],
        "slot": {m: t.clone() for m, t in state["slot"].items()},
        "seen": {m: t.clone() for m, t in state["seen"].items()},
        "mean": {m: torch.cat(blocks) for m, blocks in state["mean"].items()},
    }


def _assert_same_state(a, b):
    assert a["config"] == b["config"]
    for key in ("slot", "seen", "mean"):
        for m in a[key]:
            assert torch.equal(a[key][m].view(torch.int16) if a[key][m].dtype == torch.bfloat16 else a[key][m],
                               b[key][m].view(torch.int16) if b[key][m].dtype == torch.bfloat16 else b[key][m])


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    bank = _filled_bank(dtype=dtype, chunk_bytes=3 * 5 * dtype.itemsize)
    bank.save(tmp_path / "bank")
    assert sorted(os.listdir(tmp_path / "bank")) == [
        "bank.json", "mean.audio.npy", "mean.rgb.npy", "seen.audio.npy", "seen.rgb.npy",
        "slot.audio.npy", "slot.rgb.npy"]
    loaded = PseudoLabelBank.load(tmp_path / "bank")
    assert loaded.storage is None
    _assert_same_bank(bank, loaded)
    _assert_same_state(_snapshot(bank), _snapshot(loaded))
    with PseudoLabelBank.load(tmp_path / "bank", mmap=True) as mapped:
        _assert_same_bank(bank, mapped)
    # the saved files are plain .npy: the rows in the order created, each sample's row (or -1)
    state = _snapshot(bank)
    for m in bank.modalities:
        slot = np.load(tmp_path / "bank" / f"slot.{m}.npy")
        assert np.array_equal(slot, state["slot"][m].numpy())
        assert np.array_equal(slot >= 0, bank.stored(m).numpy())
        assert np.array_equal(np.load(tmp_path / "bank" / f"seen.{m}.npy"), state["seen"][m].numpy())
        if dtype == torch.float16:
            means = np.load(tmp_path / "bank" / f"mean.{m}.npy")
            assert means.shape == (int(bank.stored(m).sum()), 5)
            assert np.array_equal(means, state["mean"][m].numpy())
    # saving again over an existing bank replaces it
    other = _filled_bank(dtype=dtype, seed=1)
    other.save(tmp_path / "bank")
    _assert_same_bank(other, PseudoLabelBank.load(tmp_path / "bank"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_file_backed_mode_gives_the_same_numbers(tmp_path, dtype):
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
    stored = sum(int(memory.stored(m).sum()) for m in memory.modalities)
    assert mapped.nbytes == PseudoLabelBank.estimate_nbytes(17, 5, 2, dtype, pairs=stored) <= memory.nbytes
    # the files are the bank: reopening them after a flush gives the same numbers
    mapped.flush()
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "a"))
    assert np.load(tmp_path / "a" / "mean.rgb.npy").shape == (int(memory.stored("rgb").sum()), 5)
    mapped.save(tmp_path / "a")  # saving onto its own storage just flushes
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "a"))
    tight.save(tmp_path / "copy")  # streamed row by row from the files
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "copy"))
    with PseudoLabelBank.load(tmp_path / "copy", mmap=True, resident_budget=1) as reopened:
        _assert_same_bank(memory, reopened)
        # a reopened bank goes on growing: a pair never recorded gets a row
        new = (~memory.stored("rgb")).nonzero().flatten()[:2]
        preds = torch.rand(new.numel(), 5)
        for bank in (memory, reopened):
            bank.update("rgb", new, preds, 5)
        _assert_same_bank(memory, reopened)
    _assert_same_bank(memory, PseudoLabelBank.load(tmp_path / "copy"))
    mapped.close()
    tight.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_file_backed_bank_does_not_map_its_means(tmp_path):
    """The process holds the batch, not the table: the means' files are never mapped."""
    bank = PseudoLabelBank(300, 64, ["audio", "rgb"], window=2, total_epochs=2,
                           storage=tmp_path / "bank")
    ids = torch.randperm(300)[:100]
    bank.update("rgb", ids, torch.rand(100, 64), 1)
    bank.targets(ids, {"rgb": torch.ones(100, dtype=torch.bool)})
    maps = open("/proc/self/maps").read()
    for small in ("seen.rgb.npy", "slot.rgb.npy"):  # the 8-byte per-sample arrays are mapped
        assert str(tmp_path / "bank" / small) in maps
    assert "mean.rgb.npy" not in maps and "mean.audio.npy" not in maps
    bank.close()


def test_truncated_file_is_an_error(tmp_path):
    bank = _filled_bank(storage=tmp_path / "a")
    bank.close()
    path = tmp_path / "a" / "mean.rgb.npy"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    for mmap in (False, True):
        with pytest.raises(ValueError, match=r"mean.rgb.npy: holds \d+ bytes of data, expected \d+ rows x 10 bytes"):
            PseudoLabelBank.load(tmp_path / "a", mmap=mmap)


def test_inconsistent_files_are_an_error(tmp_path):
    bank = _filled_bank()
    bank.save(tmp_path / "a")
    slot = np.load(tmp_path / "a" / "slot.rgb.npy")
    slot[slot >= 0] = 0  # every sample on row 0
    np.save(tmp_path / "a" / "slot.rgb.npy", slot)
    for mmap in (False, True):
        with pytest.raises(ValueError, match=r"expected slot to give each of the \d+ rows to exactly one sample"):
            PseudoLabelBank.load(tmp_path / "a", mmap=mmap)
    np.save(tmp_path / "a" / "slot.rgb.npy", np.full(17, -1))
    with pytest.raises(ValueError, match="expected slot to give each"):
        PseudoLabelBank.load(tmp_path / "a")
    np.save(tmp_path / "a" / "slot.rgb.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"slot.rgb.npy: expected a int64 array of shape \(17\), got int64 shape \(3,\)"):
        PseudoLabelBank.load(tmp_path / "a")


def test_version_1_banks_are_refused(tmp_path):
    meta = {"format": "umilayers.PseudoLabelBank", "version": 1, "num_samples": 2, "num_outputs": 2,
            "modalities": ["rgb"], "window": 1, "total_epochs": 1, "dtype": "float16"}
    (tmp_path / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected format 'umilayers.PseudoLabelBank' version 2, got .* version 1"):
        PseudoLabelBank.load(tmp_path)


def test_file_storage_is_refused_when_it_holds_a_bank(tmp_path):
    bank = PseudoLabelBank(4, 2, ["rgb"], 1, 1, storage=tmp_path)
    bank.update("rgb", torch.tensor([1]), torch.ones(1, 2), 0)
    bank.close()
    with pytest.raises(FileExistsError, match="already holds a PseudoLabelBank"):
        PseudoLabelBank(4, 2, ["rgb"], 1, 1, storage=tmp_path)
    fresh = PseudoLabelBank(4, 2, ["rgb"], 1, 1, storage=tmp_path, overwrite=True)
    assert fresh.counts("rgb").tolist() == [0, 0, 0, 0]
    assert fresh.stored("rgb").tolist() == [False] * 4
    fresh.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_state_dict_round_trips(tmp_path):
    bank = _filled_bank(chunk_bytes=4 * 5 * 2)  # several chunks of rows
    state = bank.state_dict()
    assert set(state) == {"config", "slot", "seen", "mean"}
    assert all(isinstance(blocks, list) and len(blocks) > 1 for blocks in state["mean"].values())
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    assert os.path.getsize(path) < PseudoLabelBank.estimate_nbytes(17, 5, 2) + 8192  # no spare rows
    restored = PseudoLabelBank(17, 5, ["rgb", "audio"], window=3, total_epochs=6)
    restored.load_state_dict(torch.load(path))
    _assert_same_bank(bank, restored)
    _assert_same_state(_snapshot(bank), _snapshot(restored))
    # one (P_m, C) tensor per modality is accepted as well as a list of blocks
    one_tensor = _snapshot(bank)
    again = PseudoLabelBank(17, 5, ["rgb", "audio"], window=3, total_epochs=6)
    again.load_state_dict(one_tensor)
    _assert_same_bank(bank, again)
    # a file-backed bank's state references its files; loading it into a memory bank copies them
    mapped = _filled_bank(storage=tmp_path / "mm")
    mm_state = mapped.state_dict()
    assert set(mm_state) == {"config", "storage"}
    json.dumps(mm_state)
    copy = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6)
    copy.load_state_dict(mm_state)
    _assert_same_bank(mapped, copy)
    mapped.load_state_dict(mm_state)  # its own files: nothing to do
    # and a memory state loads into a file-backed bank
    target = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6, storage=tmp_path / "t")
    target.load_state_dict(state)
    _assert_same_bank(bank, target)
    _assert_same_bank(bank, PseudoLabelBank.load(tmp_path / "t"))
    with pytest.raises(ValueError, match="state: expected config"):
        PseudoLabelBank(17, 5, ["audio", "rgb"], window=2, total_epochs=6).load_state_dict(state)
    mapped.close()
    target.close()


def test_load_state_dict_checks_everything_before_changing_the_bank():
    bank = _filled_bank()
    before = _snapshot(bank)
    bad = _snapshot(bank)
    bad["slot"]["rgb"] = torch.full((17,), -1)  # rgb has rows but no sample owns them
    with pytest.raises(ValueError, match=r"state\[...\]\['rgb'\]: expected slot to give each"):
        bank.load_state_dict(bad)
    bad = _snapshot(bank)
    bad["mean"]["rgb"] = bad["mean"]["rgb"].float()
    with pytest.raises(TypeError, match=r"state\['mean'\]\['rgb'\]\[0\]: expected torch.float16, got torch.float32"):
        bank.load_state_dict(bad)
    _assert_same_state(before, _snapshot(bank))


def test_restored_bank_continues_like_the_original():
    a = PseudoLabelBank(6, 3, ["rgb"], window=3, total_epochs=4, dtype=torch.float16)
    a.update("rgb", torch.arange(4), torch.rand(4, 3), 1)
    b = PseudoLabelBank(6, 3, ["rgb"], window=3, total_epochs=4)
    b.load_state_dict(_snapshot(a))
    preds = torch.rand(6, 3)
    a.update("rgb", torch.arange(6), preds, 2)
    b.update("rgb", torch.arange(6), preds, 2)
    _assert_same_bank(a, b)
    _assert_same_state(_snapshot(a), _snapshot(b))
    with pytest.raises(ValueError, match="already recorded"):
        b.update("rgb", torch.tensor([3]), preds[:1], 1)


def test_nbytes_at_epic_size_two_splits_is_under_600_megabytes():
    n, c = 62_429, 3_806
    # two training splits: each sample has one of the two modalities
    half = PseudoLabelBank.estimate_nbytes(n, c, 2, torch.float16, pairs=n)
    assert half == n * c * 2 + 2 * n * 16
    assert half + 2 * DEFAULT_CHUNK_BYTES < 600_000_000  # learning its rows: one chunk ahead at most
    # a row for every sample and modality (the version 1 layout) would not fit
    assert PseudoLabelBank.estimate_nbytes(n, c, 2, torch.float16) > 950_000_000
    # the estimate is what a bank told its pairs really allocates
    split = _split_masks(123)
    small = PseudoLabelBank(123, 45, ["audio", "rgb"], window=10, total_epochs=30, present=split)
    state = small.state_dict()
    tensors = [*state["slot"].values(), *state["seen"].values(), *(b for bs in state["mean"].values() for b in bs)]
    assert small.nbytes == sum(t.untyped_storage().nbytes() for t in tensors)
    assert small.nbytes == PseudoLabelBank.estimate_nbytes(123, 45, 2, pairs=123)


def test_file_backed_files_hold_exactly_the_data(tmp_path):
    bank = PseudoLabelBank(100, 7, ["rgb"], window=2, total_epochs=3, storage=tmp_path)
    bank.update("rgb", torch.arange(0, 100, 3), torch.rand(34, 7), 2)
    files = ("mean.rgb.npy", "slot.rgb.npy", "seen.rgb.npy")
    data = sum(os.path.getsize(tmp_path / f) for f in files)
    assert bank.nbytes == PseudoLabelBank.estimate_nbytes(100, 7, 1, pairs=34)
    assert 0 <= data - bank.nbytes <= 3 * 128  # three .npy headers
    bank.close()


def test_update_errors_leave_the_bank_unchanged():
    bank = PseudoLabelBank(5, 3, ["audio", "rgb"], window=2, total_epochs=4)
    ids, preds = torch.tensor([0, 1]), torch.rand(2, 3)
    bank.update("rgb", ids, preds, 3)
    before = _snapshot(bank)
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
        (("rgb", torch.tensor([3, 4]), torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3]), 2), ValueError, "predictions: expected finite values, found 1"),
        (("rgb", torch.tensor([3, 4]), torch.full((2, 3), 7e4), 2), ValueError, r"overflow the bank's dtype torch.float16"),
        (("rgb", torch.tensor([0.0, 1.0]), preds, 2), TypeError, "indices: expected an integer tensor"),
        (("rgb", torch.zeros(2, 1, dtype=torch.long), preds, 2), ValueError, "indices: expected a 1-d tensor"),
        (("rgb", ids, torch.ones(2, 3, dtype=torch.long), 2), TypeError, "predictions: expected a floating-point tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            bank.update(*args)
    _assert_same_state(before, _snapshot(bank))  # no row added for samples 2, 3 or 4 either
    assert bank.stored("rgb").tolist() == [True, True, False, False, False]
    # errors are raised for early (ignored) epochs too
    with pytest.raises(ValueError, match="indices: expected sample ids"):
        bank.update("rgb", torch.tensor([9]), torch.rand(1, 3), 0)


def test_targets_errors():
    bank = PseudoLabelBank(5, 3, ["audio", "rgb"], window=1, total_epochs=1,
                           present={"rgb": torch.tensor([True, True, True, False, False])})
    bank.update("rgb", torch.tensor([0, 1]), torch.rand(2, 3), 0)
    bank.update("audio", torch.tensor([1, 2]), torch.rand(2, 3), 0)
    yes, both = torch.tensor([True]), {"audio": torch.tensor([True]), "rgb": torch.tensor([True])}
    # sample 2 has an rgb row (announced) that was never recorded, sample 4 none: the same error
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
    with pytest.raises(TypeError, match="ground_truth: expected an integer tensor of class labels"):
        bank.targets(torch.tensor([1]), both, ground_truth=torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"present\['rgb'\]: expected shape \(B=1\)"):
        bank.targets(torch.tensor([1]), {"rgb": torch.tensor([True, True])})
    with pytest.raises(TypeError, match=r"present\['rgb'\]: expected a torch.bool mask"):
        bank.targets(torch.tensor([1]), {"rgb": torch.tensor([1])})
    with pytest.raises(ValueError, match="present: expected a non-empty mapping"):
        bank.targets(torch.tensor([1]), {})
    with pytest.raises(ValueError, match="modality: unknown modality"):
        bank.counts("depth")
    with pytest.raises(ValueError, match="modality: unknown modality"):
        bank.stored("depth")


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
    with pytest.raises(ValueError, match="chunk_bytes: expected a positive int, got 0"):
        PseudoLabelBank(2, 2, ["a"], 1, 1, chunk_bytes=0)
    with pytest.raises(ValueError, match=r"present: unknown modality 'b', expected one of \['a'\]"):
        PseudoLabelBank(2, 2, ["a"], 1, 1, present={"b": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"present\['a'\]: expected shape \(N=2\), got \(3\)"):
        PseudoLabelBank(2, 2, ["a"], 1, 1, present={"a": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"present\['a'\]: expected a torch.bool mask"):
        PseudoLabelBank(2, 2, ["a"], 1, 1, present={"a": torch.ones(2)})
    with pytest.raises(TypeError, match="present: expected a mapping"):
        PseudoLabelBank(2, 2, ["a"], 1, 1, present=[torch.ones(2, dtype=torch.bool)])
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="present: unknown modality"):  # before any file is made
        PseudoLabelBank(2, 2, ["a"], 1, 1, storage=tmp_path / "s", present={"b": torch.ones(2, dtype=torch.bool)})
    assert not (tmp_path / "s").exists()
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
