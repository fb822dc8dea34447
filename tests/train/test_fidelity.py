"""The recipe's switches that reach the paper's (or the released code's) choices: stage 1 on rows
lacking one of their split's modalities, the optimiser and schedule, the projection's softmax
axis from the command line to the layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umilayers.baselines import model_from_spec
from umilayers.cli import build_parser, fit_config
from umilayers.data import FeatureStore
from umilayers.data.synthetic import make_synthetic_store
from umilayers.pseudo_labels import PseudoLabelBank
from umilayers.train import FitConfig, TrainConfig, evaluate, fit
from umilayers.train.distributed import DistContext
from umilayers.train.loop import Phase, make_optimizer

TINY = dict(dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=1, unimodal_epochs=1,
            pseudo_window=1, batch_size=8, lr=1e-3, quiet=True, device="cpu")


# ----------------------------------------------------------------------------- rows lacking a modality


def store_with_missing_rows(root):
    """The synthetic regression store (splits {depth, image} and {force, proprio}) with some rows
    of each training split, and of val, lacking one of the split's modalities (length 0)."""
    base = make_synthetic_store("regression", root / "base", num_train=12, num_eval=8, tokens=4, dim=12)
    store = FeatureStore.create(root / "store", "regression", int(base.num_outputs), base.modalities)
    lacking = {}
    for name, info in base.splits.items():
        folder = base.path / name
        features = {m: np.load(folder / f"{m}.npy") for m in info.modalities}
        lengths = {m: np.full(info.size, base.modalities[m][0], np.int64) for m in info.modalities}
        first, second = sorted(info.modalities)[:2]
        lengths[first][[1, 4]] = 0  # rows 1 and 4 lack the split's first modality
        if name.startswith("train"):
            lengths[second][[6]] = 0
        lacking[name] = {first: [1, 4], **({second: [6]} if name.startswith("train") else {})}
        store.write_split(name, info.role, features, base.targets(name), lengths)
    return FeatureStore(root / "store"), lacking


def test_stage_one_trains_each_modality_on_the_rows_that_have_it(tmp_path):
    store, lacking = store_with_missing_rows(tmp_path)
    steps = []
    metrics = fit(store, "umi", tmp_path / "run", callback=lambda e: steps.append(e) if e.kind == "step" else None,
                  **TINY)
    assert np.isfinite(metrics["test"]["mae"])
    bank = PseudoLabelBank.load(tmp_path / "run" / "pseudo_labels")
    offsets = store.train_index()
    for name in store.splits_with_role("train"):
        for m in store.splits[name].modalities:
            ids = offsets[name] + np.arange(store.splits[name].size)
            stored = bank.stored(m)[ids].numpy()
            np.testing.assert_array_equal(stored, store.present(name, m))  # a pseudo-label exactly where m is
    for event in steps:
        if event.stage == "unimodal":  # every row of a stage-1 batch has the model's modality
            assert bool(event.batch.present[event.modality].all())
    # stage 2 used every training row, each with the pseudo-labels of the modalities it has
    seen = {int(i) for e in steps if e.stage == "multimodal" for i in e.batch.indices}
    assert seen == set(range(store.num_train))


def test_evaluate_with_some_modalities_leaves_out_rows_without_them(tmp_path):
    store, lacking = store_with_missing_rows(tmp_path)
    fit(store, "late-fusion", tmp_path / "run", **TINY)
    val = store.splits["val"]
    first = sorted(val.modalities)[0]
    result = evaluate(tmp_path / "run", split="val", modalities=[first], device="cpu")
    assert result["num_samples"] == val.size - len(lacking["val"][first])


# ----------------------------------------------------------------------------- optimiser and schedule


def _lrs(train: TrainConfig, steps_per_epoch: int, epochs: int) -> list[float]:
    from umilayers.baselines import LateFusion

    phase = Phase(LateFusion({"rgb": 4}, num_outputs=3), FitConfig(train=train), DistContext(), steps_per_epoch,
                  epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(phase.scheduler.get_last_lr()[0])
        phase.optimizer.step()
        phase.scheduler.step()
    return lrs


def test_sgd_with_momentum_and_weight_decay():
    optimizer = make_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="sgd", lr=1e-2, weight_decay=5e-4))
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-2, 0.9, 5e-4)
    assert isinstance(make_optimizer(torch.nn.Linear(2, 2), TrainConfig()), torch.optim.AdamW)


def test_step_schedule_is_the_papers_epic_schedule():
    # 1e-4 for the first 70 epochs, 1e-5 for the last 50 (here 2 steps an epoch)
    lrs = _lrs(TrainConfig(lr=1e-4, schedule="step", lr_drop_epochs="70", epochs=120, warmup_epochs=0), 2, 120)
    assert lrs[: 2 * 70] == pytest.approx([1e-4] * 140)
    assert lrs[2 * 70 :] == pytest.approx([1e-5] * 100)
    several = _lrs(TrainConfig(lr=1.0, schedule="step", lr_drop_epochs="1,3", lr_drop_factor=0.5,
                                 warmup_epochs=0), 1, 4)
    assert several == pytest.approx([1.0, 0.5, 0.5, 0.25])
    assert _lrs(TrainConfig(lr=0.1, schedule="constant", warmup_epochs=0), 3, 2) == pytest.approx([0.1] * 6)
    warm = _lrs(TrainConfig(lr=1.0, schedule="constant", warmup_epochs=1), 2, 2)
    assert warm == pytest.approx([0.5, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("options,message", [
    (dict(schedule="step"), "lr_drop_epochs: schedule 'step' needs"),
    (dict(lr_drop_epochs="70"), "lr_drop_epochs: only used by schedule 'step'"),
    (dict(schedule="step", lr_drop_epochs="70,x"), "lr_drop_epochs: expected comma-separated epochs"),
    (dict(schedule="step", lr_drop_epochs="70,30"), "lr_drop_epochs: expected increasing epochs"),
    (dict(optimizer="adam"), "optimizer: expected one of"),
    (dict(optimizer="sgd"), "lr: optimizer 'sgd' needs a learning rate"),
])
def test_bad_schedule_options(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_the_command_line_reaches_the_optimiser_and_schedule():
    args = build_parser().parse_args(["fit", "store", "--out", "run", "--optimizer", "sgd", "--lr", "0.03",
                                      "--momentum", "0.8", "--schedule", "step", "--lr-drop-epochs", "70,100",
                                      "--lr-drop-factor", "0.5"])
    train = fit_config(args).train
    assert (train.optimizer, train.momentum, train.schedule, train.lr_drop_epochs, train.lr_drop_factor) == \
        ("sgd", 0.8, "step", "70,100", 0.5)


# ----------------------------------------------------------------------------- --normalize end to end


@pytest.mark.parametrize("normalize", ["inputs", "slots"])
def test_normalize_reaches_the_feature_projection(tmp_path, normalize):
    store = make_synthetic_store("classification", tmp_path / "store", num_train=16, num_eval=8, tokens=4, dim=12)
    args = build_parser().parse_args(["fit", str(store.path), "--out", str(tmp_path / "run"),
                                      "--normalize", normalize])
    config = fit_config(args)
    assert config.model.normalize == normalize
    options = {k: v for k, v in TINY.items() if k not in ("dim", "heads", "num_tokens")}
    fit(store, out=tmp_path / "run", config=config.replace(model=config.model.replace(dim=16, heads=2, num_tokens=4)),
        **options)
    checkpoint = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    model = model_from_spec(checkpoint["spec"])
    projections = list(model.projections.values())
    assert projections and all(p.normalize == normalize for p in projections)
    # and the softmax really runs over that axis: (B, k_m, K) weights sum to 1 over the input
    # tokens (the paper's text) or over the K slots (the released code)
    p = projections[0]
    weights = p.weights(p.logits(torch.randn(2, 5, p.in_dim)))
    total = weights.sum(1 if normalize == "inputs" else 2)
    torch.testing.assert_close(total, torch.ones_like(total))
