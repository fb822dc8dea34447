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

import numpy as np
import pytest
import torch

from umilayers._threads import THREAD_ENV_VARS
from umilayers.cli import (
    HelpFormatter,
    add_fit_arguments,
    build_parser,
    describe_run,
    fit_config,
    flag,
    main,
    parse_fit_args,
    synth_next_steps,
)
from umilayers.data.synthetic import make_synthetic_store
from umilayers.train import FitConfig, fit
from umilayers.train.run import RUN_FILES

ROOT = Path(__file__).resolve().parents[1]

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
    (["--pseudo-window", "30"], "--pseudo-window: expected 1 <= --pseudo-window <= min(--unimodal-epochs=20, 63), "
                                "got 30"),
    # the bank's limit, refused before stage 1 rather than by the bank once the models are trained
    (["--unimodal-epochs", "100", "--pseudo-window", "64"],
     "--pseudo-window: expected 1 <= --pseudo-window <= min(--unimodal-epochs=100, 63), got 64"),
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


# ------------------------------------------------------------------ a new user's first hour

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder holding a store and a finished umi run on it."""
    root = tmp_path_factory.mktemp("finished")
    make_synthetic_store("classification", root / "store", num_train=16, num_eval=10, tokens=4, dim=12)
    assert main(["fit", str(root / "store"), "--out", str(root / "run"), *TINY]) == 0
    return root


def _bad_npy_store(root: Path, content: bytes) -> Path:
    import shutil

    bad = root / "bad"
    if not bad.exists():
        shutil.copytree(root / "store", bad)
    (bad / "train_rgb" / "rgb.npy").write_bytes(content)
    return bad


@pytest.mark.parametrize("case", ["device", "batch-size", "split", "exists", "different", "both", "text-npy",
                                  "object-npy", "fit-on-text-npy", "synth-exists"])
def test_refusals_are_one_line_naming_the_flag_and_write_nothing(finished, refused, case, tmp_path):
    store, run, new = str(finished / "store"), str(finished / "run"), str(finished / "new")
    if case in ("text-npy", "fit-on-text-npy"):
        _bad_npy_store(finished, b"rgb features, one row a line\n0.1 0.2\n")
    if case == "object-npy":
        with open(_bad_npy_store(finished, b"") / "train_rgb" / "rgb.npy", "wb") as handle:
            np.save(handle, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    argv, expected = {
        "device": (["fit", store, "--out", new, *TINY, "--device", "banana"],
                   "umilayers fit: error: --device: expected auto, cpu, cuda, cuda:N, mps, ... (a torch device), "
                   "got 'banana'"),
        "batch-size": (["evaluate", run, "--batch-size", "0"],
                       "umilayers evaluate: error: --batch-size: expected an int >= 1, got 0"),
        "split": (["evaluate", run, "--split", "nosuch"],
                  "--split: 'nosuch' is neither a split nor a role of the store"),
        "exists": (["fit", store, "--out", run, *TINY],
                   "umilayers fit: error: --out: " + run + " already holds a finished run (metrics.json); "
                   "pass --resume to continue it or --overwrite to start again"),
        "different": (["fit", store, "--out", run, "--resume", *TINY, "--epochs", "2"],
                      "--resume: " + run + ": cannot resume with different options (--epochs: run has 1, given 2)"),
        "both": (["fit", store, "--out", run, "--resume", "--overwrite", *TINY],
                 "--resume: pass at most one of --resume and --overwrite"),
        "text-npy": (["check", str(finished / "bad")],
                     "rgb.npy: not a numeric .npy array: the file does not start with the .npy signature "
                     "(it starts with b'rgb fe'); write arrays with numpy.save"),
        "object-npy": (["check", str(finished / "bad")],
                       "rgb.npy: not a numeric .npy array: it holds Python objects (dtype object), not numbers"),
        "fit-on-text-npy": (["fit", str(finished / "bad"), "--out", new, *TINY], "not a numeric .npy array"),
        "synth-exists": (["synth", "classification", store, "--size", "8"],
                         f"umilayers synth: error: STORE: {store} exists and is not empty; pass --overwrite"),
    }[case]
    line = refused(main, argv, finished, expected)
    assert "allow_pickle" not in line and "=True" not in line
    assert not Path(new).exists()
    if case == "split":  # the store's split names, to choose from
        assert "(splits: train_rgb, train_audio, val, test; roles: train, val, test)" in line


def test_check_accepts_the_store_json_file(finished, capsys):
    assert main(["check", str(finished / "store" / "store.json"), "--shallow"]) == 0
    assert "OK: 4 splits valid" in capsys.readouterr().out


def test_check_of_another_file_says_to_pass_the_folder(finished, refused):
    refused(main, ["check", str(finished / "run" / "metrics.json")], finished,
            "metrics.json: a file, not a FeatureStore; pass the folder that holds store.json")


def test_fit_says_where_the_run_is_and_what_it_holds(finished, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(finished / "store"), "--out", str(run), "--method", "late-fusion", *TINY]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)  # stdout stays the metrics, for scripts
    assert captured.err == describe_run(run, metrics) + "\n"
    lines = captured.err.splitlines()
    assert lines[0] == f"run folder: {run} (best epoch: {metrics['best_epoch']}, chosen on val)"
    listed = [line.split()[0].rstrip("/") for line in lines[1:-1]]
    assert listed == [name for name in RUN_FILES if (run / name).exists()]  # every file there, nothing else
    assert {"metrics.json", "model.pt", "config.json", "checkpoint.pt", "log.jsonl"} <= set(listed)
    assert lines[-1].startswith(f"evaluate with some of its modalities: umilayers evaluate {run}")


def _tiny(method: str) -> FitConfig:
    return fit_config(build_parser().parse_args(["fit", "s", "--out", "o", "--method", method, *TINY]))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_run_files_follow_the_umask(finished, tmp_path):
    previous = os.umask(0o027)
    try:
        fit(finished / "store", out=tmp_path / "run", config=_tiny("umi"))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"config.json", "metrics.json", "model.pt", "checkpoint.pt", "log.jsonl"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes  # as log.jsonl, written with open(): the user's umask


def test_synth_writes_the_demo_store_and_says_what_next(tmp_path, capsys):
    store = tmp_path / "cls"
    assert main(["synth", "classification", str(store), "--size", "24", "--eval-size", "12", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    from umilayers.data import FeatureStore

    opened = FeatureStore(store, deep=True)
    assert [(s.name, s.size) for s in opened.splits.values()] == [
        ("train_rgb", 24), ("train_audio", 24), ("val", 12), ("test", 12)]
    assert out.endswith(synth_next_steps(store, "classification") + "\n")
    same = make_synthetic_store("classification", tmp_path / "again", num_train=24, num_eval=12, seed=3)
    np.testing.assert_array_equal(np.load(store / "test" / "rgb.npy"), np.load(same.path / "test" / "rgb.npy"))
    assert main(["synth", "regression", str(store), "--size", "8", "--eval-size", "4", "--overwrite"]) == 0
    assert FeatureStore(store).task == "regression"


def test_synth_next_steps_is_the_quickstart_command():
    """The Quickstart gives the command `umilayers synth` prints; the README names `synth`."""
    assert "umilayers synth classification data/cls" in (ROOT / "README.md").read_text()
    quickstart = (ROOT / "docs" / "quickstart.rst").read_text().replace("\\\n", " ")
    steps = synth_next_steps("data/cls", "classification").splitlines()
    assert steps[1].strip() in " ".join(quickstart.split())
    args = build_parser().parse_args(steps[1].split()[1:])  # a valid fit command
    assert fit_config(args).model.dim == 32


@pytest.fixture
def restore_threads(monkeypatch):
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_commands_apply_the_thread_rule_the_library_does_not(finished, tmp_path, restore_threads, capsys):
    torch.set_num_threads(2)
    fit(finished / "store", out=tmp_path / "lib", config=_tiny("late-fusion"))
    assert torch.get_num_threads() == 2  # the library leaves the process's count alone
    assert main(["evaluate", str(finished / "run"), "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3
    assert main(["fit", str(finished / "store"), "--out", str(tmp_path / "cli"), "--method", "late-fusion",
                 *TINY]) == 0
    assert torch.get_num_threads() == 1  # the CPU default
    logged = [json.loads(line) for line in (tmp_path / "cli" / "log.jsonl").read_text().splitlines()]
    assert {record["threads"] for record in logged} == {1}  # recorded with each epoch
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", str(finished / "store"), "--out", str(tmp_path / "x"), "--threads", "-1"])
    assert "--threads: expected an int >= 0 (0 = torch's own choice), got -1" in capsys.readouterr().err


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as ``--help`` prints it, joined into one line."""
    formatter = parser._get_formatter()
    return {action.option_strings[0]: " ".join(formatter._expand_help(action).split())
            for action in parser._actions if action.option_strings and action.help
            and action.dest not in ("help", "version")}


def _subparser(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["fit", "evaluate", "synth", "check"])
def test_every_help_shows_every_default(command):
    parser = _subparser(command)
    for option, text in _help_lines(parser).items():
        action = next(a for a in parser._actions if option in a.option_strings)
        if action.required:
            continue
        assert "default" in text.lower(), f"{command} {option}: {text}"
        if f"(default: {action.default})" not in text:  # said in words instead: never a wrong value
            assert "(default: " not in text or action.default is None, f"{command} {option}: {text}"
    assert "(default: 64)" in _help_lines(_subparser("fit"))["--batch-size"]


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(finished, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    # far more epochs than it can run before the signal
    argv = [sys.executable, "-m", "umilayers", "fit", str(finished / "store"), "--out", str(run), *TINY,
            "--epochs", "100000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # SIGINT's default for the child, as in a terminal: a shell's background job (CI started with
    # `&`) ignores SIGINT, the child inherits that, and Python then never raises KeyboardInterrupt
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").exists() or "multimodal" not in (run / "log.jsonl").read_text():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()  # no-op once it has exited
    assert child.returncode == 130 and out == ""
    assert err.strip().splitlines() == [
        "umilayers fit: interrupted; the last finished epoch is kept: add --resume to continue"]
    assert (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()  # resumable, unfinished


@pytest.mark.parametrize("argv", [
    ["fit", "STORE", "--out", "x", "--epochs", "0"],  # a config field's check
    ["fit", "STORE", "--out", "x", "--positions", "banana"],
    ["fit", "STORE"],  # a required option missing
    ["nosuch"],  # an unknown command
])
def test_parser_errors_are_one_line(argv, capsys):
    """argparse's own errors too: one stderr line, no usage block, exit status 2."""
    from umilayers.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "usage:" not in err


# ------------------------------------------------------------------ only the user's mistakes are one line

def test_a_bug_of_the_library_shows_its_traceback(finished, monkeypatch):
    import umilayers.cli as cli

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "check_store", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # not turned into "error: an internal bug"
        main(["check", str(finished / "store")])


def test_a_missing_extra_is_one_line(finished, monkeypatch, refused):
    import umilayers.cli as cli
    from umilayers._validation import MissingExtra

    def missing(*args, **kwargs):
        raise MissingExtra("h5py", "datasets", "reading the robot dataset")

    monkeypatch.setattr(cli, "check_store", missing)
    refused(main, ["check", str(finished / "store")], finished,
            'umilayers check: error: reading the robot dataset needs h5py: pip install "umilayers[datasets]"')


@pytest.mark.parametrize("where", ["store", "inside"])
def test_out_in_the_store_is_refused(finished, refused, where):
    store = finished / "store"
    out = store if where == "store" else store / "runs" / "a"
    refused(main, ["fit", str(store), "--out", str(out), *TINY], finished,
            f"umilayers fit: error: --out: the run would be written into the store {store.resolve()}; write it "
            f"to a folder outside the store")


def test_a_store_elsewhere_in_out_is_left_alone(finished, tmp_path):
    """A project folder holding the store may be the run folder: the run writes only its own files."""
    import shutil

    shutil.copytree(finished / "store", tmp_path / "data")
    assert main(["fit", str(tmp_path / "data"), "--out", str(tmp_path), "--method", "late-fusion", *TINY]) == 0
    assert main(["check", str(tmp_path / "data")]) == 0


def test_resume_without_a_run_is_refused(finished, refused, tmp_path):
    refused(main, ["fit", str(finished / "store"), "--out", str(tmp_path / "none"), "--resume", *TINY], tmp_path,
            f"umilayers fit: error: --resume: {tmp_path / 'none'} holds no run to continue (no config.json); "
            f"leave out --resume to start one")


def test_fewer_unimodal_epochs_bring_a_smaller_default_window(refused, tmp_path, finished):
    def config(*argv):
        return fit_config(build_parser().parse_args(["fit", "s", "--out", "o", *argv]))

    assert config("--unimodal-epochs", "3").train.window() == 3
    assert config().train.window() == 10 and config("--pseudo-window", "4").train.window() == 4
    # A run written with the window spelled out resumes with the default, and the other way round.
    assert FitConfig.from_options(pseudo_window=10).result_options() == FitConfig().result_options()
    # A refusal names the flags the user typed, not a default.
    refused(main, ["fit", str(finished / "store"), "--out", str(tmp_path / "x"), "--unimodal-epochs", "0"],
            tmp_path, "umilayers fit: error: --unimodal-epochs: pseudo-labels need at least one unimodal epoch")


def test_epochs_are_numbered_from_1_everywhere_and_one_line_each(finished, tmp_path, capsys):
    """The best epoch reads the same on stderr, in metrics.json, model.pt and log.jsonl; without
    --quiet every epoch leaves one line on stderr (not a terminal here: a log file)."""
    run = tmp_path / "run"
    tiny = [a for a in TINY if a != "--quiet"]
    argv = ["fit", str(finished / "store"), "--out", str(run), *tiny, "--epochs", "3", "--unimodal-epochs", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    metrics = json.loads((run / "metrics.json").read_text())
    best = metrics["best_epoch"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    multimodal = [r for r in log if r.get("stage") == "multimodal"]
    assert [r["epoch"] for r in multimodal] == [1, 2, 3]
    assert [r["epoch"] for r in log if r.get("stage") == "unimodal" and "epoch" in r] == [1, 2, 1, 2]
    assert multimodal[-1]["best_epoch"] == best and log[-1]["best_epoch"] == best
    assert torch.load(run / "model.pt", weights_only=False)["epoch"] == best
    assert max(multimodal, key=lambda r: r["score"])["epoch"] == best  # the first of equal scores
    assert f"run folder: {run} (best epoch: {best}, chosen on val)" in err
    progress = [line for line in err if line.startswith("[")]
    assert len(progress) == 7, err  # 2 modalities x 2 unimodal epochs + 3 epochs
    assert progress[0].startswith("[1/7] unimodal audio epoch 1/2: loss ")
    assert progress[4].startswith("[5/7] umi epoch 1/3: loss ") and ", val top1 " in progress[4]
    assert all(" elapsed" in line for line in progress) and progress[-1].endswith(", done")
    assert ("(best)" in progress[3 + best]) and sum("(best)" in line for line in progress) >= 1
    assert err[0].startswith("fit umi on ") and "one line per epoch" in err[0]


def test_synth_where_no_folder_can_be_made_names_the_argument(tmp_path, refused):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    refused(main, ["synth", "classification", str(blocker / "store"), "--size", "8"], tmp_path,
            f"umilayers synth: error: STORE: cannot create {blocker / 'store'}: ")
