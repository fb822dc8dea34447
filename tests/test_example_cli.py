"""The example scripts' command lines: every ``--help`` shows every default (the paper's, where a
script sets its own), and bad input is refused in one line, exit status 2, with nothing written.

The scripts' end-to-end runs on data are in ``tests/datasets/`` (they need the fixtures there).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from umilayers.data.synthetic import make_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["epic_extract", "epic_train", "robot_train", "msrvtt_train"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _help_lines(parser) -> dict[str, str]:
    formatter = parser._get_formatter()
    return {action.option_strings[0]: " ".join(formatter._expand_help(action).split())
            for action in parser._actions if action.option_strings and action.help
            and action.dest not in ("help", "version")}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_shows_its_default(name):
    parser = _example(name).build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert action.help, f"{name} {action.option_strings[0]} has no help"
    for option, text in _help_lines(parser).items():
        action = next(a for a in parser._actions if option in a.option_strings)
        if action.required or action.default in (None, []):
            continue
        assert "default" in text.lower(), f"{name} {option}: {text}"
        for value in re.findall(r"default:? (-?[0-9][0-9.e+-]*)", text):  # a number it names is the real one
            assert float(value.rstrip(".")) == float(action.default), f"{name} {option}: {text}"


def test_epic_train_help_shows_the_papers_settings():
    lines = _help_lines(_example("epic_train").build_parser())
    assert lines["--num-tokens"].endswith("(default: 512)")
    assert lines["--pseudo-weight"].endswith("(default: 3000.0)")
    assert lines["--pseudo-window"].endswith("(default: 10)")
    assert lines["--dim"].endswith("(default: 256)") and lines["--heads"].endswith("(default: 8)")


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """A valid FeatureStore that epic_extract.py did not write (no epic_actions.json)."""
    path = tmp_path_factory.mktemp("synthetic") / "store"
    make_synthetic_store("classification", path, num_train=8, num_eval=4, tokens=4, dim=12)
    return path


TINY = ["--dim", "16", "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2", "--num-tokens", "4",
        "--epochs", "1", "--unimodal-epochs", "1", "--pseudo-window", "1", "--batch-size", "8", "--quiet",
        "--device", "cpu"]


@pytest.mark.parametrize("name, argv, expected", [
    ("epic_extract", ["--annotations", "{tmp}/nowhere", "--rgb", "r", "--audio", "a", "--out", "{tmp}/out",
                      "--setting", "rgb+audio", "--weights", "random"],
     "epic_extract.py: error: {tmp}/nowhere/EPIC_100_train.csv does not exist; --annotations must be a clone"),
    ("epic_train", ["{tmp}/nowhere", "--out", "{tmp}/out"],
     "epic_train.py: error: {tmp}/nowhere/store.json: missing file (not a FeatureStore directory?)"),
    ("epic_train", ["{store}", "--out", "{tmp}/out", *TINY],
     "epic_train.py: error: {store}/epic_actions.json: missing; epic_train.py trains on stores written by "
     "examples/epic_extract.py"),
    ("robot_train", ["--data", "{tmp}/nowhere", "--out", "{tmp}/out"],
     "robot_train.py: error: {tmp}/nowhere: not a directory (--data: the folder of the dataset's .h5 episode files)"),
    ("robot_train", ["--data", "{tmp}", "--out", "{tmp}/out"],
     "robot_train.py: error: {tmp}: no .h5 episode files"),
    ("msrvtt_train", ["--data", "{tmp}/nowhere", "--out", "{tmp}/out"],
     "msrvtt_train.py: error: --data {tmp}/nowhere: no split list"),
    ("msrvtt_train", ["--data", "{tmp}", "--out", "{tmp}/out", "--eval-requires", "audio,depth"],
     "msrvtt_train.py: error: argument --eval-requires: expected 'all' or some of "
     "rgb,audio,ocr,speech,object,scene,face separated by commas, got 'audio,depth'"),
], ids=["extract-annotations", "train-no-store", "train-not-epic", "robot-no-folder", "robot-no-h5",
        "msrvtt-no-release", "msrvtt-eval-requires"])
def test_bad_input_is_one_line_and_leaves_nothing(name, argv, expected, tmp_path, synthetic_store, refused):
    fill = lambda text: text.format(tmp=tmp_path, store=synthetic_store)  # noqa: E731
    main = _example(name).main
    original_argv0 = sys.argv[0]
    sys.argv[0] = f"{name}.py"  # argparse names the program after argv[0]
    try:
        refused(main, [fill(a) for a in argv], tmp_path, fill(expected))
    finally:
        sys.argv[0] = original_argv0
    assert not (tmp_path / "out").exists()  # no empty --out folder either


def test_a_script_run_ends_in_one_line_not_a_traceback(tmp_path, synthetic_store):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "epic_train.py"), str(synthetic_store),
                             "--out", str(tmp_path / "out"), *TINY], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"epic_train.py: error: {synthetic_store}/epic_actions.json: missing; epic_train.py trains on stores "
        f"written by examples/epic_extract.py (it scores verbs and nouns with this action table); train any other "
        f"store with umilayers fit"]
    assert not (tmp_path / "out").exists()
