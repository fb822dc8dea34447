"""umilayers.train.compare: the paired interval and the verdict against hand-computed values,
resume after an interruption, a store where one method is clearly better, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umilayers import cli
from umilayers._validation import InvalidArgument
from umilayers.data import FeatureStore
from umilayers.data.synthetic import make_synthetic_store
from umilayers.train import FitEvent, compare
from umilayers.train.compare import paired_interval, parse_lr_grid, parse_methods, summarize, verdict

TINY = dict(dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=2, unimodal_epochs=1,
            pseudo_window=1, batch_size=16, quiet=True, device="cpu")
SMALL = dict(methods="umi,vanilla", seeds=2, lr_grid=[1.0])


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("differences, expected", [
    # n = 3: each of the 27 resamples has probability 1/27 = 3.7 % > 2.5 %, so the extremes are the bounds.
    ([1.0, 2.0, 3.0], (1.0, 3.0)),
    ([-1.0, 2.0, 3.0], (-1.0, 3.0)),
    # n = 2: means 1 (1/4), 2 (1/2), 3 (1/4).
    ([1.0, 3.0], (1.0, 3.0)),
    # n = 5, one 1 among zeros: the mean is k/5 with k ~ Binomial(5, 1/5); P(k = 0) = 0.328 > 2.5 %;
    # P(k <= 2) = 0.942 < 97.5 % <= P(k <= 3) = 0.993.
    ([0.0, 0.0, 0.0, 0.0, 1.0], (0.0, 0.6)),
])
def test_paired_interval_is_the_exact_bootstrap(differences, expected):
    assert paired_interval(differences) == pytest.approx(expected)


def test_one_seed_has_no_interval_and_no_verdict():
    assert paired_interval([0.3]) is None
    assert verdict(None, "vanilla") == "no verdict on umi against vanilla: one seed gives no interval"


@pytest.mark.parametrize("interval, word", [((0.1, 0.4), "beats"), ((-0.4, -0.1), "loses to"),
                                            ((-0.1, 0.4), "is level with"), ((0.0, 0.4), "is level with")])
def test_verdict_rule(interval, word):
    assert verdict(interval, "late-fusion") == f"umi {word} late-fusion on this store"


def _record(method, seed, value, key):
    return {"method": method, "seed": seed, "lr": 1e-3, "chosen": True, "test": {"a+b": {key: value}}}


@pytest.mark.parametrize("task, key, umi, other, word", [
    ("classification", "top1", [0.90, 0.92, 0.91], [0.80, 0.81, 0.79], "beats"),  # higher is better
    ("regression", "mae", [0.50, 0.52, 0.51], [0.80, 0.81, 0.79], "beats"),  # lower is better
    ("regression", "mae", [0.80, 0.81, 0.79], [0.50, 0.52, 0.51], "loses to"),
])
def test_paired_differences_follow_the_metric_direction(task, key, umi, other, word):
    settings = {"task": task, "methods": ["umi", "x"]}
    runs = ([_record("umi", s, v, key) for s, v in enumerate(umi)]
            + [_record("x", s, v, key) for s, v in enumerate(other)])
    result = summarize(settings, runs, [("a", "b")])
    sign = 1 if key == "top1" else -1
    assert result["paired"]["x"]["differences"] == pytest.approx([sign * (u - o) for u, o in zip(umi, other)])
    assert result["verdicts"]["x"] == f"umi {word} x on this store"
    assert result["summary"]["umi"]["test"]["a+b"][key]["mean"] == pytest.approx(np.mean(umi))


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(make_synthetic_store("classification", tmp_path_factory.mktemp("s") / "cls", num_train=24,
                                    num_eval=12, tokens=4, dim=12).path)


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "cmp"
    return out, compare(store, out, **SMALL, **TINY, log=lambda line: None)


def _without_times(result):
    result = json.loads(json.dumps(result))
    result.pop("seconds")
    for run in result["runs"]:
        run.pop("seconds")
    return result


def test_outputs_and_every_run_is_a_fit_run(finished):
    out, result = finished
    assert {p.name for p in out.iterdir()} == {"settings.json", "runs", "compare.json", "compare.md", "compare.png"}
    assert json.loads((out / "compare.json").read_text()) == result
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [
        ("umi", 0), ("umi", 1), ("vanilla", 0), ("vanilla", 1)]
    assert result["subsets"] == ["audio+rgb", "rgb", "audio"]  # all, then the training splits' sets
    for run in result["runs"]:
        metrics = json.loads((out / run["run"] / "metrics.json").read_text())
        assert metrics["method"] == run["method"] and metrics["seed"] == run["seed"]
        assert run["test"]["audio+rgb"] == metrics["test"] and set(run["val"]) == set(result["subsets"])
    table = (out / "compare.md").read_text()
    assert "umi" in table and result["verdicts"]["vanilla"] in table


def test_resume_after_an_interruption_reaches_the_same_result(store, finished, tmp_path):
    class Crash(RuntimeError):
        pass

    started = []

    def crash(event: FitEvent):
        # the third run (vanilla, seed 0) dies in its second epoch, after the first's checkpoint
        if event.kind == "epoch" and event.stage == "multimodal" and event.epoch == 1:  # epochs count from 1
            started.append(1)
        if event.kind == "step" and event.epoch == 2 and len(started) == 3:
            raise Crash

    out = tmp_path / "cmp"
    with pytest.raises(Crash):
        compare(store, out, **SMALL, **TINY, callback=crash, log=lambda line: None)
    interrupted = out / "runs" / "vanilla-lr0.001-seed0"
    assert (interrupted / "checkpoint.pt").is_file() and not (interrupted / "metrics.json").is_file()
    lines = []
    again = compare(store, out, **SMALL, **TINY, log=lines.append)
    assert sum("reused" in line for line in lines) == 2 and len(lines) == 4
    resumed = [json.loads(line) for line in (interrupted / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in resumed)
    assert _without_times(again) == _without_times(finished[1])


def test_refuses_a_folder_of_other_settings_and_bad_arguments(store, finished, tmp_path, capsys):
    out, _ = finished
    with pytest.raises(InvalidArgument, match=r"holds a comparison of other settings \(epochs: it has 2, given 3\)"):
        compare(store, out, **SMALL, **{**TINY, "epochs": 3})
    flags = [x for k, v in TINY.items() if k not in ("quiet", "heads")
             for x in (cli.flag(k), str(v))]  # all the same but --heads
    code = cli.main(["compare", store, "--out", str(out), "--methods", "umi,vanilla", "--seeds", "2",
                     "--lr-grid", "1", *flags, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"umilayers compare: error: --out: {out} holds a comparison of other settings "
                                 f"(--heads: it has 2, given 8); choose another folder or pass --overwrite"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="holds no comparison"):
        compare(store, tmp_path / "other", **SMALL, **TINY)
    for bad, match in ((dict(methods="vanilla"), "include 'umi'"), (dict(methods="umi,umi"), "each method once"),
                       (dict(methods="umi,unimodal"), "methods: expected one of"),
                       (dict(lr_grid="1,0"), "lr_grid: expected a number > 0"), (dict(seeds=0), "seeds"),
                       (dict(seed=1), "set by the comparison")):
        with pytest.raises(InvalidArgument, match=match):
            compare(store, tmp_path / "new", **{**SMALL, **TINY, **bad})
    assert not (tmp_path / "new").exists()
    assert parse_methods("umi, late-fusion:mlp") == ["umi", "late-fusion:mlp"] and parse_lr_grid("2") == [2.0]


def _pairing_store(path, n=96, n_eval=64, seed=0):
    """Two modalities, 4 tokens each, whose class is in how each token's two features pair up
    (``s * (1, +1, 0, 0)`` or ``s * (1, -1, 0, 0)`` with a sign ``s`` per token, two of each sign): the
    mean over the tokens is the same for both classes, so a linear model on mean-pooled tokens
    (``late-fusion:linear``) is at chance, while any per-token non-linearity sees it."""
    rng = np.random.default_rng(seed)

    def tokens(labels):
        signs = np.array([rng.permutation([1, 1, -1, -1]) for _ in labels], dtype=np.float32)
        pair = np.stack([np.ones(len(labels)), 2.0 * labels - 1, 0 * labels, 0 * labels], axis=1).astype(np.float32)
        x = signs[:, :, None] * pair[:, None, :]
        return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    fs = FeatureStore.create(path, "classification", 2, {"a": (4, 4), "b": (4, 4)})
    for name, role, mods, size in (("train_a", "train", ("a",), n), ("train_b", "train", ("b",), n),
                                   ("val", "val", ("a", "b"), n_eval), ("test", "test", ("a", "b"), n_eval)):
        labels = rng.integers(0, 2, size)
        fs.write_split(name, role, {m: tokens(labels) for m in mods}, labels)
    return fs


def test_a_clearly_better_method_gets_the_verdict(tmp_path):
    result = compare(_pairing_store(tmp_path / "store"), tmp_path / "cmp", methods="umi,late-fusion:linear",
                     seeds=2, lr_grid=[1.0], log=lambda line: None, **{**TINY, "epochs": 3, "unimodal_epochs": 2})
    umi = result["summary"]["umi"]["test"]["a+b"]["top1"]["values"]
    linear = result["summary"]["late-fusion:linear"]["test"]["a+b"]["top1"]["values"]
    assert min(umi) > 0.9 and max(linear) < 0.7, (umi, linear)
    assert result["verdicts"]["late-fusion:linear"] == "umi beats late-fusion:linear on this store"


def test_command_line_takes_fit_options_and_its_own():
    parser = cli.build_parser()
    args = parser.parse_args(["compare", "store", "--out", "o", "--epochs", "4", "--dim", "16", "--seeds", "5"])
    assert (args.epochs, args.dim, args.seeds, args.methods, args.lr_grid) == (4, 16, 5, "umi,late-fusion,"
                                                                               "late-fusion:mlp,vanilla", "0.5,1,2")
    assert not hasattr(args, "method") and not hasattr(args, "seed")  # set by the comparison
