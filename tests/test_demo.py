import json
import shutil
import subprocess
from pathlib import Path

import pytest

from umilayers import demo
from umilayers._progress import Heartbeat

ROOT = Path(__file__).resolve().parents[1]


def test_format_table_layout_and_spread():
    results = {"late fusion": {"classification": [0.5, 0.7], "regression": [1.0, 1.0]},
               "ours (umi)": {"classification": [0.8, 0.8], "regression": [0.5, 0.7]}}
    table = demo.format_table(results, ["classification", "regression"], "method")
    lines = table.splitlines()
    assert lines[0].startswith("| method") and "top-1" in lines[0] and "MAE" in lines[0]
    assert "60.00 ± 14.14" in lines[2]  # top-1 as percent, mean ± sample std over seeds
    assert "0.600 ± 0.141" in lines[3]  # MAE with three decimals


def test_headline_metric_per_task():
    assert demo.headline_metric("classification", {"top1": 0.25}) == 0.25
    assert demo.headline_metric("regression", {"mae": 1.5}) == 1.5
    assert demo.headline_metric("retrieval", {"mean_rank": 7.0, "t2v": {}}) == 7.0


def test_run_grid_trains_each_row_on_each_task(tmp_path):
    size = demo.DemoSize(num_train=48, num_eval=24, epochs=1, unimodal_epochs=2, pseudo_window=1,
                         model=dict(dim=8, num_tokens=2, projection_depth=1, fusion_depth=1, heads=2, batch_size=16,
                                    lr=1e-3))
    rows = {"umi": {"method": "umi"}, "late": {"method": "late-fusion"}}
    logged = []
    results = demo.run_grid(tmp_path, ["classification", "regression"], rows, [0], size, log=logged.append)
    assert set(results) == {"umi", "late"}
    assert all(len(results[r][t]) == 1 for r in rows for t in ("classification", "regression"))
    assert 0.0 <= results["umi"]["classification"][0] <= 1.0
    assert len(logged) == 4
    for number, options in enumerate(rows.values()):  # each run where run_dir says, with its result
        saved = json.loads((demo.run_dir(tmp_path, "regression", number, options, 0) / "metrics.json").read_text())
        assert saved["method"] == options["method"]
        assert saved["test"]["mae"] == results[list(rows)[number]]["regression"][0]


def test_main_rejects_bad_seeds(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0"])


def test_demo_sizes_share_one_setting_for_every_method():
    # The demo's fairness rule: one training setting for all methods; only the rows' own
    # ablation switches differ.
    for size in (demo.DemoSize.default(), demo.DemoSize.quick()):
        # the learning setting is FitConfig's defaults: the demo runs what `umilayers fit` runs
        assert not set(size.model) & {"lr", "warmup_epochs", "predictor"}
        assert not set(size.model) & {"method", "use_alignment", "use_pseudo", "branches"}
    for options in list(demo.METHOD_ROWS.values()) + list(demo.ABLATION_ROWS.values()):
        assert set(options) <= {"method", "use_alignment", "use_pseudo", "branches"}


def test_fit_predictor_reaches_late_fusion_and_stage_one(tmp_path):
    import torch

    from umilayers.data.synthetic import make_synthetic_store
    from umilayers.train import FitConfig, fit

    store = make_synthetic_store("classification", tmp_path / "store", num_train=24, num_eval=12)
    tiny = dict(dim=8, num_tokens=2, projection_depth=1, fusion_depth=1, heads=2, epochs=1, unimodal_epochs=1,
                pseudo_window=1, batch_size=12, quiet=True)
    fit(store, "late-fusion", tmp_path / "lf", predictor="transformer", **tiny)
    spec = torch.load(tmp_path / "lf" / "model.pt", weights_only=False)["spec"]
    assert spec["class"] == "LateFusion" and spec["config"]["predictor"] == "transformer"
    assert spec["config"]["depth"] == 1
    fit(store, "late-fusion", tmp_path / "lin", predictor="linear", **tiny)
    spec = torch.load(tmp_path / "lin" / "model.pt", weights_only=False)["spec"]
    assert spec["config"]["predictor"] == "linear"  # the paper's, still reachable by name
    fit(store, "late-fusion", tmp_path / "default", **tiny)
    spec = torch.load(tmp_path / "default" / "model.pt", weights_only=False)["spec"]
    assert spec["config"]["predictor"] == "transformer"  # the default
    with pytest.raises(ValueError, match="predictor"):
        FitConfig(predictor="cnn")


def test_cli_parses_predictor():
    from umilayers.cli import build_parser, fit_config

    args = build_parser().parse_args(["fit", "S", "--out", "O", "--predictor", "transformer"])
    assert fit_config(args).predictor == "transformer"


def test_help_is_plain_text():
    text = demo.build_parser().format_help()
    assert "``" not in text and ":func:" not in text and ":meth:" not in text and ":mod:" not in text
    for option in ("--quick", "--seeds", "--out", "--overwrite", "--no-ablation", "--threads"):
        assert option in text
    assert "umilayers-demo-quick" in text and "(default: 1)" in text


def test_quick_has_its_own_folder():
    assert demo.default_out(quick=True) != demo.default_out(quick=False)


@pytest.mark.parametrize("quick", [False, True])
def test_refuses_to_overwrite_a_finished_demo(tmp_path, refused, quick):
    finished = {"size": "default", "seeds": [0, 1, 2], "seconds": 687.0, "table4": {}}
    (tmp_path / "demo.json").write_text(json.dumps(finished))
    line = refused(demo.main, ["--out", str(tmp_path)] + ["--quick"] * quick, tmp_path,
                   f"umilayers demo: error: {tmp_path / 'demo.json'}: a finished demo is there")
    assert "(default size, 3 seed(s), 687 s); pass --overwrite to replace it, or --out DIR" in line


def test_heartbeat_estimates_each_task_from_its_own_runs():
    clock = iter(range(0, 1000, 10))
    beat = Heartbeat(demo.grid_plan(["classification", "retrieval"], {"a": {}, "b": {}}, [0]),
                          clock=lambda: float(next(clock)))
    assert beat.plan == ["classification", "classification", "retrieval", "retrieval"]
    assert beat.tick("classification", 2.0) == "[1/4] 10s elapsed, about 6s left"  # 3 runs x 2 s
    assert beat.tick("classification", 4.0) == "[2/4] 20s elapsed, about 6s left"  # 2 x mean 3 s
    assert beat.tick("retrieval", 90.0) == "[3/4] 30s elapsed, about 1m30s left"   # retrieval's own
    assert beat.tick("retrieval", 10.0) == "[4/4] 40s elapsed, done"


def test_heartbeat_of_a_resumed_run_counts_on():
    clock = iter(range(0, 1000, 10))
    beat = Heartbeat(["unimodal"] * 2 + ["multimodal"] * 2, clock=lambda: float(next(clock)), start=2)
    assert beat.tick("multimodal", 5.0, "umi epoch 1/2: loss 1.0") == \
        "[3/4] umi epoch 1/2: loss 1.0; 10s elapsed, about 5s left"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_what_demo_and_the_quickstart_write_in_the_current_folder_is_ignored_by_git():
    paths = [str(demo.default_out(quick) / "demo.json") for quick in (False, True)] + ["data/cls/store.json"]
    for path in paths:
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
        assert result.returncode == 0, f"{path} is not ignored by .gitignore"


def test_fit_options_are_what_every_run_shares():
    size = demo.DemoSize.default()
    options = size.fit_options()
    assert options["epochs"] == size.epochs and options["pseudo_window"] == size.pseudo_window
    assert {k: options[k] for k in size.model} == size.model
