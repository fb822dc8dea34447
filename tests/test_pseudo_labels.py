import json
import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from umilayers.pseudo_labels import PseudoLabelBank, closest_to_truth

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


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


def _dense(calls, n, c, modalities, first_epoch, dtype):
    """The means of a row for every sample and modality, updated as the bank defines it (float32
    ``lerp`` by ``1 / count``, one rounding to ``dtype`` per update): the bits the bank must give."""
    means = {m: torch.zeros(n, c, dtype=dtype) for m in modalities}
    counts = {m: torch.zeros(n) for m in modalities}
    for m, ids, preds, epoch in calls:
        if epoch >= first_epoch:
            ids = torch.from_numpy(ids)
            weight = 1.0 / (counts[m][ids] + 1.0)
            means[m][ids] = means[m][ids].float().lerp(torch.from_numpy(preds), weight[:, None]).to(dtype)
            counts[m][ids] += 1
    return means


def _chunk_bytes(n, c, dtype):
    """Bytes of one chunk of rows: ``ceil(N / 8)`` rows at these small sizes (16 MiB at most)."""
    return min(16 << 20, -(-n // 8) * c * dtype.itemsize)


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
    pattern=st.sampled_from(["random", "split"]),
)
def test_averages_match_numpy_reference(n, c, num_modalities, total_epochs, window_frac, dtype,
                                        probabilities, seed, pattern):
    """The bank gives the numpy reference within the error bound, and the very same bits as a
    row for every sample and modality updated by the same rule."""
    rng = np.random.default_rng(seed)
    window = max(1, round(window_frac * total_epochs))
    modalities = ["audio", "rgb", "flow"][:num_modalities]
    max_abs = 1.0 if probabilities else 50.0
    calls = _plan_updates(rng, n, c, modalities, total_epochs, max_abs, pattern)
    sums, counts = _reference(calls, n, c, modalities, total_epochs - window)
    dense = _dense(calls, n, c, modalities, total_epochs - window, dtype)
    bank = PseudoLabelBank(n, c, modalities, window, total_epochs, dtype=dtype)
    _apply(bank, calls)
    for m in modalities:
        assert bank.counts(m).tolist() == counts[m].tolist()
        assert torch.equal(bank.stored(m), torch.from_numpy(counts[m] > 0))
        rows = np.nonzero(counts[m])[0]
        if len(rows) == 0:
            continue
        got = bank.targets(torch.from_numpy(rows), {m: _one(len(rows))})
        assert got.dtype == torch.float32 and got.shape == (len(rows), c)
        expected = sums[m][rows] / counts[m][rows][:, None]
        bound = bank.error_bound(max_abs)
        err = np.abs(got.double().numpy() - expected).max()
        assert err <= bound, (err, bound)
        assert torch.equal(got, dense[m][torch.from_numpy(rows)].float())
    stored = sum(int(bank.stored(m).sum()) for m in modalities)
    exact = stored * c * dtype.itemsize + num_modalities * n * 16
    assert exact <= bank.nbytes <= exact + num_modalities * _chunk_bytes(n, c, dtype)  # one chunk ahead


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


@given(n=st.integers(1, 10), c=st.integers(2, 6), classification=st.booleans(), seed=st.integers(0, 2**16))
def test_cosine_selection_picks_the_closest_modality(n, c, classification, seed):
    rng = np.random.default_rng(seed)
    modalities = ["audio", "depth", "rgb"]
    present = {m: torch.from_numpy(rng.random(n) < 0.7) for m in modalities}
    present["rgb"] |= ~(present["audio"] | present["depth"])  # every row has a modality
    # only the pairs that exist are recorded, so they are the only rows
    bank = PseudoLabelBank(n, c, modalities, window=2, total_epochs=2, dtype=torch.float32)
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


def test_closest_to_truth_one_target_per_candidate_ties_and_absent_candidates():
    candidates = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]],
                               [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]])  # (M=2, B=3, C=2)
    available = torch.tensor([[True, False, True], [True, True, True]])
    # one ground truth per candidate (each modality's own embedding space): each is compared
    # with its own; row 1 has only its second candidate; row 2's candidates tie (cos 1)
    truth = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
                          [[0.0, 1.0], [0.0, 1.0], [2.0, 2.0]]])
    expected = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 3.0]])
    assert torch.equal(closest_to_truth(candidates, available, truth), expected)
    # a shared (B, C) target and class labels (one-hot) give the same choice here
    assert torch.equal(closest_to_truth(candidates, available, torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])),
                       expected)
    assert torch.equal(closest_to_truth(candidates, available, torch.tensor([1, 1, 0])), expected)


def _split_masks(n, modalities=("audio", "rgb")):
    """Two training splits: the first half of the samples has audio only, the rest rgb only."""
    first = torch.arange(n) < n // 2
    return {modalities[0]: first, modalities[1]: ~first}


def test_two_split_bank_holds_one_row_per_sample():
    """Each sample has one modality: rows for those pairs only, the same bits as a full table."""
    n, c = 40, 7
    split = _split_masks(n)
    rng = np.random.default_rng(0)
    bank = PseudoLabelBank(n, c, ["audio", "rgb"], window=2, total_epochs=3)
    calls = []
    for epoch in range(3):
        for m, mask in split.items():
            ids = mask.nonzero().flatten()[torch.from_numpy(rng.permutation(int(mask.sum())))]
            preds = torch.from_numpy(rng.random((ids.numel(), c))).float().softmax(-1)
            calls.append((m, ids.numpy(), preds.numpy(), epoch))
    _apply(bank, calls)
    full = _dense(calls, n, c, ["audio", "rgb"], 1, torch.float16)
    for m, mask in split.items():
        assert torch.equal(bank.stored(m), mask)
    ids = torch.from_numpy(rng.permutation(n))
    present = {m: mask[ids] for m, mask in split.items()}
    expected = torch.where(present["audio"][:, None], full["audio"][ids], full["rgb"][ids]).float()
    assert torch.equal(bank.targets(ids, present), expected)
    half = n * c * 2 + 2 * n * 16  # a row per sample, plus its row number and epoch mask per modality
    assert half <= bank.nbytes <= half + 2 * 5 * c * 2  # at most one chunk (5 rows) ahead a modality
    every = PseudoLabelBank(n, c, ["audio", "rgb"], window=2, total_epochs=3)
    for m in split:
        every.update(m, torch.arange(n), torch.rand(n, c), 2)
    assert bank.nbytes < every.nbytes == 2 * n * c * 2 + 2 * n * 16  # no chunk beyond the N-th row


def _filled_bank(dtype=torch.float16, seed=0):
    """A bank driven by random updates of 17 samples x 2 modalities (some pairs never recorded);
    its rows fill several chunks of 3 rows."""
    bank = PseudoLabelBank(17, 5, ["audio", "rgb"], window=3, total_epochs=6, dtype=dtype)
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
    bank = _filled_bank(dtype=dtype)
    bank.save(tmp_path / "bank")
    assert sorted(os.listdir(tmp_path / "bank")) == [
        "bank.json", "mean.audio.npy", "mean.rgb.npy", "seen.audio.npy", "seen.rgb.npy",
        "slot.audio.npy", "slot.rgb.npy"]
    loaded = PseudoLabelBank.load(tmp_path / "bank")
    _assert_same_bank(bank, loaded)
    _assert_same_state(_snapshot(bank), _snapshot(loaded))
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


def test_truncated_or_padded_file_is_an_error(tmp_path):
    _filled_bank().save(tmp_path / "a")
    path = tmp_path / "a" / "mean.rgb.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match=r"mean.rgb.npy: holds fewer bytes than its \d+ rows of 5 values"):
        PseudoLabelBank.load(tmp_path / "a")
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match=r"mean.rgb.npy: holds more bytes than its \d+ rows of 5 values"):
        PseudoLabelBank.load(tmp_path / "a")
    np.save(path, np.zeros((3, 4), dtype=np.float16))
    with pytest.raises(ValueError, match=r"mean.rgb.npy: expected a float16 array of shape \(P, 5\), got .* \(3, 4\)"):
        PseudoLabelBank.load(tmp_path / "a")


def test_inconsistent_files_are_an_error(tmp_path):
    bank = _filled_bank()
    bank.save(tmp_path / "a")
    slot = np.load(tmp_path / "a" / "slot.rgb.npy")
    slot[slot >= 0] = 0  # every sample on row 0
    np.save(tmp_path / "a" / "slot.rgb.npy", slot)
    with pytest.raises(ValueError, match=r"expected slot to give each of the \d+ rows to exactly one sample"):
        PseudoLabelBank.load(tmp_path / "a")
    np.save(tmp_path / "a" / "slot.rgb.npy", np.full(17, -1))
    with pytest.raises(ValueError, match="expected slot to give each"):
        PseudoLabelBank.load(tmp_path / "a")
    np.save(tmp_path / "a" / "slot.rgb.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError,
                       match=r"slot.rgb.npy: expected an int64 array of shape \(17,\), got int64 shape \(3,\)"):
        PseudoLabelBank.load(tmp_path / "a")


def test_version_1_banks_are_refused(tmp_path):
    meta = {"format": "umilayers.PseudoLabelBank", "version": 1, "num_samples": 2, "num_outputs": 2,
            "modalities": ["rgb"], "window": 1, "total_epochs": 1, "dtype": "float16"}
    (tmp_path / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected format 'umilayers.PseudoLabelBank' version 2, got .* version 1"):
        PseudoLabelBank.load(tmp_path)


def test_state_dict_round_trips(tmp_path):
    bank = _filled_bank()  # several chunks of rows
    state = bank.state_dict()
    assert set(state) == {"config", "slot", "seen", "mean"}
    assert all(isinstance(blocks, list) and len(blocks) > 1 for blocks in state["mean"].values())
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    assert os.path.getsize(path) < 17 * 2 * 5 * 2 + 2 * 17 * 16 + 8192  # no spare rows
    restored = PseudoLabelBank(17, 5, ["rgb", "audio"], window=3, total_epochs=6)
    restored.load_state_dict(torch.load(path))
    _assert_same_bank(bank, restored)
    _assert_same_state(_snapshot(bank), _snapshot(restored))
    # one (P_m, C) tensor per modality is accepted as well as a list of blocks
    one_tensor = _snapshot(bank)
    again = PseudoLabelBank(17, 5, ["rgb", "audio"], window=3, total_epochs=6)
    again.load_state_dict(one_tensor)
    _assert_same_bank(bank, again)
    with pytest.raises(ValueError, match="state: expected config"):
        PseudoLabelBank(17, 5, ["audio", "rgb"], window=2, total_epochs=6).load_state_dict(state)


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


def test_saved_files_hold_exactly_the_rows(tmp_path):
    """The memory model, on disk: ``P * C * itemsize + 16 * M * N`` bytes for ``P`` pairs."""
    bank = PseudoLabelBank(100, 7, ["audio", "rgb"], window=2, total_epochs=3)
    bank.update("rgb", torch.arange(0, 100, 3), torch.rand(34, 7), 2)
    bank.save(tmp_path)
    data = sum(os.path.getsize(tmp_path / f"{kind}.{m}.npy") for kind in ("mean", "slot", "seen")
               for m in ("audio", "rgb"))
    exact = 34 * 7 * 2 + 2 * 100 * 16
    assert 0 <= data - exact <= 6 * 128  # six .npy headers
    assert exact <= bank.nbytes <= exact + _chunk_bytes(100, 7, torch.float16)  # one chunk ahead, in memory


def test_update_errors_leave_the_bank_unchanged():
    bank = PseudoLabelBank(5, 3, ["audio", "rgb"], window=2, total_epochs=4)
    ids, preds = torch.tensor([0, 1]), torch.rand(2, 3)
    bank.update("rgb", ids, preds, 3)
    before = _snapshot(bank)
    cases = [
        (("depth", ids, preds, 3), ValueError,
         r"modality: unknown modality 'depth', expected one of \['audio', 'rgb'\]"),
        (("rgb", torch.tensor([0, 5]), preds, 3), ValueError,
         r"indices: expected sample ids in \[0, 5\), got 1 out of range, e.g. \[5\]"),
        (("rgb", torch.tensor([-1, 2]), preds, 3), ValueError, r"e.g. \[-1\]"),
        (("rgb", ids, torch.rand(2, 4), 3), ValueError, r"predictions: expected shape \(B=2, C=3\), got \(2, 4\)"),
        (("rgb", ids, torch.rand(3, 3), 3), ValueError, r"predictions: expected shape \(B=2, C=3\), got \(3, 3\)"),
        (("rgb", ids, preds, 4), ValueError, r"epoch: expected 0 <= epoch < total_epochs=4, got 4"),
        (("rgb", ids, preds, -1), ValueError, r"got -1"),
        (("rgb", ids, preds, 2.0), TypeError, r"epoch: expected an int"),
        (("rgb", torch.tensor([2, 2]), preds, 2), ValueError,
         r"indices: expected no duplicates, got 1 ids repeated, e.g. \[2\]"),
        (("rgb", torch.tensor([2, 1]), preds, 3), ValueError,
         r"1 of 2 samples were already recorded for modality 'rgb' at epoch 3, e.g. \[1\]"),
        (("rgb", torch.tensor([3, 4]), torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3]), 2), ValueError,
         "predictions: expected finite values, found 1"),
        (("rgb", torch.tensor([3, 4]), torch.full((2, 3), 7e4), 2), ValueError,
         r"overflow the bank's dtype torch.float16"),
        (("rgb", torch.tensor([0.0, 1.0]), preds, 2), TypeError, "indices: expected an integer tensor"),
        (("rgb", torch.zeros(2, 1, dtype=torch.long), preds, 2), ValueError, "indices: expected a 1-d tensor"),
        (("rgb", ids, torch.ones(2, 3, dtype=torch.long), 2), TypeError,
         "predictions: expected a floating-point tensor"),
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
    bank = PseudoLabelBank(5, 3, ["audio", "rgb"], window=1, total_epochs=1)
    bank.update("rgb", torch.tensor([0, 1]), torch.rand(2, 3), 0)
    bank.update("audio", torch.tensor([1, 2]), torch.rand(2, 3), 0)
    yes, both = torch.tensor([True]), {"audio": torch.tensor([True]), "rgb": torch.tensor([True])}
    # samples 2 (recorded in audio only) and 4 (never recorded) have no rgb pseudo-label
    with pytest.raises(ValueError, match=r"modality 'rgb' was never recorded \(in epochs 0..0\) "
                                         r"for 2 of 3 samples, e.g. ids \[2, 4\]"):
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
