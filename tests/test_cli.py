"""``umilayers`` / ``python -m umilayers``: fit, evaluate, check, errors and exit codes, and the
fit options generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umilayers.cli import HelpFormatter, add_fit_arguments, build_parser, fit_config, flag, main, parse_fit_args
from umilayers.data.synthetic import make_synthetic_store
from umilayers.train import FitConfig

TINY = ["--dim", "16", "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2", "--num-tokens", "4",
        "--epochs", "1", "--unimodal-epochs", "1", "--pseudo-window", "1", "--batch-size", "8", "--lr", "1e-3",
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
    assert main(["fit", store, "--method", "unimodal", "--modality", "smell", "--out", str(tmp_path / "u"), *TINY]) == 2
    assert "umilayers fit: error: --modality: 'smell' is not a modality of the store" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nothing")]) == 2
    assert "store.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", store, "--method", "nonsense", "--out", run])


def _fit_parser() -> argparse.ArgumentParser:
    return add_fit_arguments(argparse.ArgumentParser(prog="fit", formatter_class=HelpFormatter))


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: expected an int >= 1, got 0"),
    (["--epochs=0"], "--epochs: expected an int >= 1, got 0"),
    (["--epochs", "two"], "--epochs: expected an int, got 'two'"),
    (["--lr", "0"], "--lr: expected a number > 0, got 0.0"),
    (["--lr", "nan"], "--lr: expected a number > 0, got nan"),
    (["--normalize", "rows"], "--normalize: expected one of ['inputs', 'slots'], got 'rows'"),
    (["--heads", "3"], "--heads: must divide --dim=256, got --heads=3"),
    (["--branches", "3"], "--branches must divide --num-tokens"),
    (["--pseudo-window", "30"], "--pseudo-window: expected 1 <= --pseudo-window <= --unimodal-epochs=20, got 30"),
    (["--method", "unimodal"], "--modality: method 'unimodal' needs the modality to train on"),
])
def test_bad_options_name_the_flag_as_typed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_fit_args(_fit_parser(), ["--out", "x", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_python_callers_get_the_field_name():
    with pytest.raises(ValueError, match=r"^epochs: expected an int >= 1, got 0$"):
        FitConfig.from_options(epochs=0)
    with pytest.raises(ValueError, match=r"^heads: must divide dim=256, got heads=3$"):
        FitConfig.from_options(heads=3)


def test_every_option_of_every_concern_is_a_flag_with_its_default():
    parser = _fit_parser()
    specs = [spec for group in FitConfig.specs().values() for spec in group]
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names))  # one spelling per name, unique across the concerns
    by_dest = {action.dest: action for action in parser._actions}
    for spec in specs:
        action = by_dest[spec.name]
        assert flag(spec.name) in action.option_strings
        if spec.kind is bool:
            assert "--no-" + spec.name.replace("_", "-") in action.option_strings
        assert action.default == spec.default and action.help.startswith(spec.help)
    assert fit_config(parser.parse_args(["--out", "x"])) == FitConfig()  # CLI defaults are the configs'
    help_text = parser.format_help()
    for spec in specs:
        assert f"(default: {spec.default})" in " ".join(help_text.split())


def test_flags_reach_their_fields():
    args = _fit_parser().parse_args([
        "--out", "x", "--no-use-alignment", "--no-use-pseudo", "--amp", "--compile", "--projection-depth", "2",
        "--branches", "1", "--align-weight", "0.5", "--num-align-tokens", "7", "--normalize", "slots",
        "--predictor", "transformer", "--no-quiet",
    ])
    cfg = fit_config(args)
    assert not cfg.model.use_alignment and not cfg.model.use_pseudo and cfg.train.amp and cfg.train.compile
    assert (cfg.model.projection_depth, cfg.model.fusion_depth) == (2, FitConfig().model.fusion_depth)
    assert cfg.model.branches == 1 and cfg.model.align_weight == 0.5 and cfg.model.num_align_tokens == 7
    assert cfg.model.normalize == "slots" and cfg.predictor == "transformer" and not cfg.runtime.quiet
    none = _fit_parser().parse_args(["--out", "x", "--num-align-tokens", "none"])
    assert fit_config(none).model.num_align_tokens is None


def test_a_new_field_is_a_new_flag():
    # Adding an option is adding a field: the parser is generated from the config classes.
    from umilayers._config import option
    from umilayers.train import config as train_config

    @dataclasses.dataclass(frozen=True)
    class Runtime(train_config.RuntimeConfig):
        prefetch: int = option(1, "batches each loader prefetches", minimum=1)

    original = train_config.CONCERNS["runtime"]
    train_config.CONCERNS["runtime"] = Runtime
    try:
        parser = _fit_parser()
        assert "--prefetch" in parser.format_help() and "(default: 1)" in parser.format_help()
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", "--prefetch", "0"])
    finally:
        train_config.CONCERNS["runtime"] = original


def test_script_defaults_and_exclusions():
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser, exclude=["method"], defaults={"num_tokens": 512, "pseudo_weight": 3000.0})
    args = parser.parse_args(["--out", "x"])
    assert not hasattr(args, "method") and (args.num_tokens, args.pseudo_weight) == (512, 3000.0)
    assert fit_config(args, method="vanilla").method == "vanilla"
    with pytest.raises(ValueError, match="unknown options"):
        add_fit_arguments(argparse.ArgumentParser(), defaults={"tokens": 512})


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "umilayers", "fit", "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--method", "--resume", "--overwrite", "--pseudo-window", "--amp", "--no-amp", "--compile",
                   "--num-tokens", "--projection-depth", "--fusion-depth", "--use-alignment"):
        assert option in result.stdout


def test_subcommands():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"fit", "evaluate", "check", "demo"} <= set(commands)
