"""The two-stage recipe (umilayers.train.run): every method and task end to end, metrics.json
schema, resume equals an uninterrupted run (in-process crash and kill -9), refusal of finished
runs, bad stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from umilayers.baselines import METHODS
from umilayers.data import StoreError
from umilayers.data.synthetic import make_synthetic_store
from umilayers.losses import TASKS
from umilayers.train import FitConfig, FitEvent, RunExistsError, evaluate, fit

# Tiny models and one epoch per stage: the point is the plumbing, not the accuracy.
TINY = dict(dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=1, unimodal_epochs=1,
            pseudo_window=1, batch_size=8, lr=1e-3, quiet=True, device="cpu")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {task: str(make_synthetic_store(task, root / task, num_train=16, num_eval=10, tokens=4, dim=12).path)
            for task in TASKS}


def _options(method, store_path, **extra):
    options = dict(TINY, **extra)
    if method == "unimodal":
        from umilayers.data import FeatureStore

        options["modality"] = sorted(FeatureStore(store_path).modalities)[0]
    return options


def _check_schema(metrics, task, method):
    assert metrics["method"] == method and metrics["task"] == task and metrics["seed"] == 0
    for part in ("val", "test"):
        result = metrics[part]
        if task == "classification":
            assert 0.0 <= result["top1"] <= 1.0
        elif task == "regression":
            assert np.isfinite(result["mae"]) and result["mae"] >= 0
        else:
            for side in ("t2v", "v2t"):
                assert set(result[side]) == {"r1", "r5", "r10", "median_rank", "mean_rank"}
                assert 0.0 <= result[side]["r1"] <= result[side]["r5"] <= result[side]["r10"] <= 1.0
                assert 1.0 <= result[side]["mean_rank"] <= result["num_samples"]
            assert result["mean_rank"] == pytest.approx((result["t2v"]["mean_rank"] + result["v2t"]["mean_rank"]) / 2)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_fit_every_method_and_task(stores, tmp_path, task, method):
    out = tmp_path / "run"
    metrics = fit(stores[task], method, out, **_options(method, stores[task]))
    _check_schema(metrics, task, method)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    saved = json.loads((out / "config.json").read_text())
    assert FitConfig.from_dict(saved["config"]).method == method
    predictions = np.load(out / "test_predictions.npy")
    assert predictions.shape[0] == metrics["test"]["num_samples"] and np.isfinite(predictions).all()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    stages = [r.get("stage") for r in log]
    assert "multimodal" in stages and stages[-1] == "test"
    assert ("unimodal" in stages) == (method in ("umi", "pooled"))
    assert (out / "pseudo_labels" / "bank.json").is_file() == (method in ("umi", "pooled"))


def test_classification_predictions_reproduce_top1(stores, tmp_path):
    metrics = fit(stores["classification"], "umi", tmp_path / "run", **TINY)
    probs = np.load(tmp_path / "run" / "test_predictions.npy")
    labels = np.load(Path(stores["classification"]) / "test" / "targets.npy")
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert metrics["test"]["top1"] == pytest.approx(float((probs.argmax(1) == labels).mean()))


class _Crash(RuntimeError):
    pass


def _crash_after(calls):
    """A fit callback that crashes the run right after its ``calls``-th checkpoint."""
    count = {"n": 0}

    def callback(event: FitEvent) -> None:
        if event.kind == "checkpoint":
            count["n"] += 1
            if count["n"] == calls:
                raise _Crash("simulated crash right after a checkpoint")

    return callback


@pytest.mark.parametrize("task,crash_at,unimodal_epochs", [("classification", 3, 2), ("retrieval", 9, 1)])
def test_resume_equals_uninterrupted(stores, tmp_path, task, crash_at, unimodal_epochs):
    # Checkpoints: one per unimodal epoch of each modality, one "stage 1 done", one per
    # multimodal epoch. Classification (2 modalities x 2 epochs): crash_at=3 stops after the
    # first epoch of the second modality. Retrieval (7 modalities x 1 epoch): crash_at=9 stops
    # after the first multimodal epoch (the bank and caption embeddings come from disk).
    options = dict(TINY, epochs=3, unimodal_epochs=unimodal_epochs, pseudo_window=unimodal_epochs)
    straight = fit(stores[task], "umi", tmp_path / "straight", **options)
    with pytest.raises(_Crash):
        fit(stores[task], "umi", tmp_path / "resumed", callback=_crash_after(crash_at), **options)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    with pytest.raises(RunExistsError, match="unfinished run"):
        fit(stores[task], "umi", tmp_path / "resumed", **options)
    resumed = fit(stores[task], "umi", tmp_path / "resumed", resume=True, **options)
    assert resumed == straight
    np.testing.assert_array_equal(np.load(tmp_path / "straight" / "test_predictions.npy"),
                                  np.load(tmp_path / "resumed" / "test_predictions.npy"))


def test_resume_within_multimodal_stage(stores, tmp_path):
    options = dict(TINY, epochs=4)
    straight = fit(stores["regression"], "vanilla", tmp_path / "straight", **options)
    with pytest.raises(_Crash):  # vanilla has no stage 1: stop after 2 of 4 epochs
        fit(stores["regression"], "vanilla", tmp_path / "resumed", callback=_crash_after(2), **options)
    assert fit(stores["regression"], "vanilla", tmp_path / "resumed", resume=True, **options) == straight


# The killed run: fit in a child process whose callback reports each step on stdout and then
# sleeps, so the test can kill it at a chosen step (timing controlled from outside the library).
# The child computes with this process's number of threads: the resumed run must equal the
# uninterrupted one bit for bit, and a float sum can differ with the thread count.
_CHILD = """
import json, sys, time
import torch
from umilayers.train import fit

torch.set_num_threads(int(sys.argv[4]))

def report_and_wait(event):
    if event.kind == "step":
        print(event.stage, event.modality, event.epoch, event.step, flush=True)
        time.sleep(0.2)

fit(sys.argv[1], "umi", sys.argv[2], callback=report_and_wait, **json.loads(sys.argv[3]))
"""


def test_kill_9_mid_epoch_then_resume(stores, tmp_path):
    store = stores["regression"]
    options = dict(TINY, epochs=3, unimodal_epochs=2, batch_size=4)
    straight = fit(store, "umi", tmp_path / "straight", **options)
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    argv = [sys.executable, "-c", _CHILD, store, str(run), json.dumps(options), str(torch.get_num_threads())]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill after step 1 of the second epoch of the first unimodal model: one epoch is checkpointed,
    # the next is half done (4 steps an epoch).
    for line in proc.stdout:
        stage, _, epoch, step = line.split()
        if (stage, epoch, step) == ("unimodal", "2", "1"):  # epochs count from 1
            break
    else:
        raise AssertionError(f"the run ended before the chosen step: {proc.stderr.read()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    resumed = fit(store, "umi", run, resume=True, **options)
    assert resumed == straight


def test_refuses_a_finished_run(stores, tmp_path):
    out = tmp_path / "run"
    first = fit(stores["regression"], "late-fusion", out, **TINY)
    with pytest.raises(RunExistsError, match="finished run"):
        fit(stores["regression"], "late-fusion", out, **TINY)
    assert fit(stores["regression"], "late-fusion", out, resume=True, **TINY) == first  # nothing to do
    again = fit(stores["regression"], "late-fusion", out, overwrite=True, **TINY)
    assert again == first  # same seed, fresh run
    with pytest.raises(ValueError, match="different options"):
        fit(stores["regression"], "late-fusion", out, resume=True, **dict(TINY, lr=0.5))


def test_bad_store_fails_before_training(stores, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stores["classification"], bad)
    features = np.load(bad / "val" / "rgb.npy")
    features[3, 1, 2] = np.nan
    np.save(bad / "val" / "rgb.npy", features)
    with pytest.raises(StoreError, match="rgb.npy"):
        fit(bad, "umi", tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()
    missing = tmp_path / "missing"
    shutil.copytree(stores["classification"], missing)
    (missing / "test" / "targets.npy").unlink()
    with pytest.raises(StoreError, match="targets.npy"):
        fit(missing, "vanilla", tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,message", [
    (dict(method="unimodal"), "needs the modality"),
    (dict(method="umi", modality="rgb"), "only used by method 'unimodal'"),
    (dict(method="unimodal", modality="smell"), "not a modality of the store"),
    (dict(method="umi", pseudo_window=3), "pseudo_window"),
    (dict(method="umi", heads=3), "heads"),
    (dict(method="umi", epochs=0), "epochs"),
    (dict(method="umi", num_align_tokens=3), "num_align_tokens"),
])
def test_bad_options(stores, tmp_path, options, message):
    method = options.pop("method")
    with pytest.raises(ValueError, match=message):
        fit(stores["classification"], method, tmp_path / "run", **{**TINY, **options})
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_evaluate_modality_subsets(stores, tmp_path):
    out = tmp_path / "run"
    metrics = fit(stores["regression"], "umi", out, **TINY)
    full = evaluate(out)
    assert full["mae"] == pytest.approx(metrics["test"]["mae"])
    modalities = full["modalities"]
    assert len(modalities) == 4
    for m in modalities:
        single = evaluate(out, modalities=[m])
        assert single["modalities"] == [m] and np.isfinite(single["mae"])
    with pytest.raises(ValueError, match="subset"):
        evaluate(out, modalities=["smell"])
    assert evaluate(out, split="val")["mae"] == pytest.approx(metrics["val"]["mae"])


def test_amp_smoke(stores, tmp_path):
    metrics = fit(stores["classification"], "umi", tmp_path / "run", amp=True, **TINY)
    assert 0.0 <= metrics["test"]["top1"] <= 1.0


@pytest.mark.slow
def test_compile_smoke(stores, tmp_path):
    pytest.importorskip("torch._dynamo")
    metrics = fit(stores["regression"], "vanilla", tmp_path / "run", compile=True, **TINY)
    assert np.isfinite(metrics["test"]["mae"])


def test_fitconfig_roundtrip_and_unknown_keys():
    cfg = FitConfig.from_options(method="pooled", use_alignment=False, projection_depth=2)
    assert FitConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.model.projection_depth, cfg.model.fusion_depth) == (2, 6)
    with pytest.raises(ValueError, match="unknown options"):
        FitConfig.from_dict({"method": "umi", "learning_rate": 1})
    assert FitConfig.from_options(method="umi", use_pseudo=False).uses_pseudo_labels is False
    assert FitConfig(method="vanilla").uses_pseudo_labels is False


# ---------------------------------------------------------------- defaults


def test_default_learning_rate_follows_the_square_root_batch_rule():
    from umilayers.train.config import BASE_BATCH, BASE_LR, TrainConfig

    assert TrainConfig().lr is None and TrainConfig().peak_lr() == BASE_LR and TrainConfig().batch_size == BASE_BATCH
    assert TrainConfig(batch_size=4 * BASE_BATCH).peak_lr() == pytest.approx(2 * BASE_LR)
    assert TrainConfig(batch_size=256, lr=3e-4).peak_lr() == 3e-4  # a given lr is used as is
    assert TrainConfig().warmup_epochs == 1 and FitConfig().predictor == "transformer"
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)


# ---------------------------------------------------------------- options beyond the paper


@pytest.mark.parametrize("task,options,message", [
    ("regression", dict(pair_same_label=0.5), "pair_same_label: pairs rows of the same class"),
    ("classification", dict(pair_same_label=1.5), r"pair_same_label: expected a probability in \[0, 1\]"),
    ("classification", dict(positions="rotary"), "positions"),
])
def test_options_that_do_not_fit(stores, tmp_path, task, options, message):
    with pytest.raises(ValueError, match=message):
        fit(stores[task], "umi", tmp_path / "run", **TINY, **options)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("method,options,expected", [
    ("umi", dict(positions="learned", normalize="slots", feature_norm=True, subset_ensemble=True,
                 pair_same_label=0.5), dict(positions="learned", normalize="slots", feature_norm=True,
                                            ensemble_subsets=[["audio"], ["rgb"]])),
    ("late-fusion", dict(predictor="mlp"), dict(predictor="mlp", modality_tokens={"audio": 4, "rgb": 4})),
    ("vanilla", dict(positions="learned", pair_same_label=1.0), dict(positions="learned")),
])
def test_options_reach_the_model(stores, tmp_path, method, options, expected):
    metrics = fit(stores["classification"], method, tmp_path / "run", **TINY, **options)
    assert 0.0 <= metrics["test"]["top1"] <= 1.0
    config = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["spec"]["config"]
    config = json.loads(json.dumps(config))  # tuples as lists
    assert {k: config[k] for k in expected} == expected
