"""``umilayers`` / ``python -m umilayers``: fit, evaluate, check, errors and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umilayers.cli import add_fit_arguments, build_parser, fit_options, main
from umilayers.data.synthetic import make_synthetic_store
from umilayers.recipes import FitConfig

TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--tokens", "4", "--epochs", "1",
        "--unimodal-epochs", "1", "--pseudo-window", "1", "--batch-size", "8", "--lr", "1e-3",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "store"
    return str(make_synthetic_store("classification", path, num_train=16, num_eval=10, tokens=4, dim=12).path)


def test_fit_evaluate_check_in_process(store, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["fit", store, "--method", "umi", "--out", run, *TINY]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(Path(run, "metrics.json").read_text())
    assert main(["evaluate", run, "--modalities", "rgb"]) == 0
    subset = json.loads(capsys.readouterr().out)
    assert subset["modalities"] == ["rgb"] and 0.0 <= subset["top1"] <= 1.0
    assert main(["check", store]) == 0
    out = capsys.readouterr().out
    assert "classification" in out and "train" in out


def test_refusal_and_errors_exit_2(store, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["fit", store, "--method", "late-fusion", "--out", run, *TINY]) == 0
    capsys.readouterr()
    assert main(["fit", store, "--method", "late-fusion", "--out", run, *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", store, "--method", "unimodal", "--out", str(tmp_path / "u"), *TINY]) == 2
    assert "--modality" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nothing")]) == 2
    assert "store.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", store, "--method", "nonsense", "--out", run])


def test_every_fit_option_maps_to_fitconfig():
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    args = parser.parse_args(["--out", "x", "--no-align", "--no-pseudo", "--amp", "--compile",
                              "--projection-depth", "2", "--branches", "1", "--align-weight", "0.5"])
    options = fit_options(args)
    assert set(options) == set(FitConfig().to_dict()) - {"method"}
    cfg = FitConfig(method=args.method, **options)
    assert cfg.no_align and cfg.no_pseudo and cfg.amp and cfg.compile
    assert cfg.model_depths() == (2, FitConfig().depth) and cfg.branches == 1 and cfg.align_weight == 0.5
    defaults = fit_options(parser.parse_args(["--out", "x"]))
    assert FitConfig(**defaults) == FitConfig()  # CLI defaults are the FitConfig defaults


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "umilayers", "fit", "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--method", "--resume", "--overwrite", "--pseudo-window", "--amp", "--compile"):
        assert option in result.stdout


def test_demo_hook_only_when_module_exists():
    import importlib.util

    has_demo = importlib.util.find_spec("umilayers.demo") is not None
    commands = build_parser()._subparsers._group_actions[0].choices
    assert ("demo" in commands) == has_demo
    assert {"fit", "evaluate", "check"} <= set(commands)
