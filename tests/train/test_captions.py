"""Several captions per video (MSR-VTT has about 20): training draws one per row and epoch,
evaluation scores every caption (CE's protocol), the pseudo-labels follow the drawn caption, and
2 processes give what 1 does."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.train.test_distributed import _free_port
from umilayers import metrics
from umilayers.baselines import model_from_spec
from umilayers.data import FeatureStore
from umilayers.data.synthetic import make_synthetic_store
from umilayers.pseudo_labels import PseudoLabelBank
from umilayers.train import evaluate, fit

K = 3  # caption slots
TINY = dict(dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=2, unimodal_epochs=2,
            pseudo_window=1, batch_size=8, lr=1e-3, quiet=True, device="cpu")


def several_caption_store(root, seed=0):
    """The synthetic retrieval store with up to K captions a row: caption k is the row's caption
    plus noise of scale 0.3 k; rows have 1 to K captions (every count occurs); caption lengths vary."""
    base = make_synthetic_store("retrieval", root / "base", num_train=16, num_eval=10, tokens=4, dim=12, seed=seed)
    rng = np.random.default_rng(seed)
    tokens, text_dim = base.text
    store = FeatureStore.create(root / "store", "retrieval", int(base.num_outputs), base.modalities,
                                text=(tokens, text_dim), captions=K)
    for name, info in base.splits.items():
        folder = base.path / name
        features = {m: np.load(folder / f"{m}.npy") for m in info.modalities}
        lengths = {m: np.load(folder / f"{m}.lengths.npy") for m in info.modalities
                   if (folder / f"{m}.lengths.npy").is_file()}
        caption = base.targets(name).astype(np.float32)  # (size, t, d)
        counts = 1 + np.arange(info.size) % K
        targets = np.zeros((info.size, K, tokens, text_dim), np.float32)
        caption_lengths = np.zeros((info.size, K), np.int64)
        for k in range(K):
            filled = counts > k
            noisy = caption + 0.3 * k * rng.standard_normal(caption.shape).astype(np.float32)
            targets[filled, k] = noisy[filled]
            caption_lengths[filled, k] = rng.integers(1, tokens + 1, size=int(filled.sum()))
        store.write_split(name, info.role, features, targets, lengths or None,
                          target_lengths=caption_lengths, target_counts=counts)
    return FeatureStore(root / "store")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return several_caption_store(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    """A finished umi run on the store, and what its callback saw: (stage, epoch, batch, pseudo)."""
    out = tmp_path_factory.mktemp("run") / "run"
    seen = []

    def record(event):
        if event.kind == "step":
            seen.append((event.stage, event.epoch, event.batch, event.pseudo_targets))

    fit(store, "umi", out, callback=record, **TINY)
    return out, seen


def _reference_metrics(store, out, split="test"):
    """Every valid caption of the split embedded by the best model, ranked against the videos."""
    checkpoint = torch.load(out / "model.pt", weights_only=False)
    model = model_from_spec(checkpoint["spec"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    data = store.dataset(split, caption="all")
    items = [data[i] for i in range(len(data))]
    from umilayers.data import collate

    batch = collate(items)
    with torch.no_grad():
        video = model(batch.inputs, batch.padding_masks, batch.present).prediction
        captions, owners = [], []
        for row, item in enumerate(items):
            for k in range(item["caption_count"]):
                length = int(item["target_length"][k])
                captions.append(model.encode_text(item["target"][k][None, :length])[0])
                owners.append(row)
    sim = torch.stack(captions).double() @ video.double().T
    return metrics.retrieval_metrics(sim, torch.tensor(owners), ties="average"), len(owners)


def test_evaluation_scores_every_caption_of_every_video(store, run):
    out, _ = run
    result = json.loads((out / "metrics.json").read_text())["test"]
    expected, captions = _reference_metrics(store, out)
    assert result["num_captions"] == captions == int(store.caption_counts("test").sum())
    assert result["num_samples"] == store.splits["test"].size
    assert result["mean_rank"] == pytest.approx(expected["mean_rank"], abs=1e-9)
    for direction in ("t2v", "v2t"):
        for key, value in expected[direction].items():
            assert result[direction][key] == pytest.approx(value, abs=1e-9), (direction, key)
    # evaluate() scores the same way
    again = evaluate(out, split="test", device="cpu")
    assert again["num_captions"] == captions and again["mean_rank"] == pytest.approx(result["mean_rank"], abs=1e-9)


def test_training_draws_one_caption_per_row_and_epoch(store, run):
    _, seen = run
    offsets = store.train_index()
    counts = {offsets[name] + row: int(c) for name in offsets for row, c in enumerate(store.caption_counts(name))}
    slots: dict[tuple[str, int], dict[int, int]] = {}
    for stage, epoch, batch, _ in seen:
        assert batch.caption_slots is not None and batch.caption_counts is None
        for index, slot in zip(batch.indices.tolist(), batch.caption_slots.tolist()):
            assert 0 <= slot < counts[index]
            slots.setdefault((stage, epoch), {})[index] = slot
    # a row with several captions is not always given the same one
    multimodal = [slots[("multimodal", e)] for e in range(1, TINY["epochs"] + 1)]  # epochs count from 1
    varied = [i for i in multimodal[0] if counts[i] > 1 and multimodal[0][i] != multimodal[1][i]]
    assert varied
    assert any(s != 0 for per_epoch in slots.values() for s in per_epoch.values())


def test_relational_pseudo_labels_follow_the_drawn_caption(store, run):
    out, seen = run
    bank = PseudoLabelBank.load(out / "pseudo_labels")
    tables = torch.load(out / "pseudo_labels" / "text_embeddings.pt")
    for table in tables.values():  # every slot of every training row, zeros past a row's count
        assert table.shape == (store.num_train, K, int(store.num_outputs))
    stage, epoch, batch, pseudo = next(s for s in seen if s[0] == "multimodal")
    indices, slots = batch.indices, batch.caption_slots
    for i in range(len(indices)):
        rows = []
        for m, mask in batch.present.items():
            if bool(mask[i]):
                p = F.normalize(bank.targets(indices[i : i + 1], {m: torch.ones(1, dtype=torch.bool)}), dim=-1)
                t = F.normalize(tables[m][indices, slots].float(), dim=-1)
                rows.append((p @ t.T)[0])
        torch.testing.assert_close(pseudo[i], torch.stack(rows).mean(0))


def test_paper_pseudo_labels_take_the_closest_modality_for_the_drawn_caption(store, tmp_path):
    seen = []

    def record(event):
        if event.kind == "step" and event.stage == "multimodal":
            seen.append((event.batch, event.pseudo_targets))

    fit(store, "umi", tmp_path / "run", callback=record, retrieval_pseudo="paper", **TINY)
    bank = PseudoLabelBank.load(tmp_path / "run" / "pseudo_labels")
    tables = torch.load(tmp_path / "run" / "pseudo_labels" / "text_embeddings.pt")
    batch, pseudo = seen[0]
    assert pseudo.shape == (batch.size, int(store.num_outputs))
    for i, (index, slot) in enumerate(zip(batch.indices.tolist(), batch.caption_slots.tolist())):
        scores = {}
        for m in sorted(batch.present):
            if bool(batch.present[m][i]):
                p = F.normalize(bank.targets(torch.tensor([index]), {m: torch.tensor([True])})[0], dim=-1)
                truth = F.normalize(tables[m][index, slot].float(), dim=-1)
                scores[m] = (float(p @ truth), p)
        best = max(scores, key=lambda m: scores[m][0])
        torch.testing.assert_close(pseudo[i], scores[best][1])


def _evaluate_worker(rank, world, port, out, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = evaluate(out, split="test", device="cpu", batch_size=3)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(result, f)


@pytest.mark.slow
def test_two_processes_score_every_caption_as_one_does(run, tmp_path):
    out, _ = run
    single = evaluate(out, split="test", device="cpu", batch_size=3)
    mp.spawn(_evaluate_worker, args=(2, _free_port(), str(out), str(tmp_path / "two.json")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_captions"] == single["num_captions"] and two["num_samples"] == single["num_samples"]
    for direction in ("t2v", "v2t"):
        for key, value in single[direction].items():
            assert two[direction][key] == pytest.approx(value, abs=1e-6), (direction, key)
