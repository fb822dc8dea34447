"""The ``umilayers`` command line: ``synth``, ``check``, ``fit``, ``compare``, ``evaluate`` and ``demo``.

``umilayers fit STORE --method umi --out RUN`` is :func:`umilayers.train.fit` with the same
options; ``python -m umilayers ...`` is the same program. Multi-process training::

    torchrun --nproc_per_node=2 -m umilayers fit STORE --method umi --out RUN

The options of ``fit`` are generated from the fields of :class:`~umilayers.train.FitConfig` and
its concerns (:class:`~umilayers.model.ModelConfig`, :class:`~umilayers.train.TrainConfig`,
:class:`~umilayers.train.RuntimeConfig`): a field ``num_tokens`` is the flag ``--num-tokens``, a
``bool`` field ``use_alignment`` the pair ``--use-alignment`` / ``--no-use-alignment``, its help
is the field's, and every help line shows the default. Scripts that train on their own data
(``examples/*.py``) take the same options with :func:`add_fit_arguments` and
:func:`parse_fit_args`.

A bad value is one line naming the flag as it was typed, before any work:
``umilayers fit: error: --epochs: expected an int >= 1, got 0``. Python callers get the same
check with the field's name (:class:`~umilayers._validation.InvalidArgument`). The library's
other refusals of what a user gave (a bad store, a run that exists, a missing run file) are
``InvalidArgument`` s too, and a missing optional package is a
:class:`~umilayers._validation.MissingExtra`: each is one line on stderr and exit status 2, and
nothing is written (:data:`USER_ERRORS`, :func:`report_error`, which the examples use too). Any
other exception is a bug of the library and shows its traceback.

Every command that computes takes ``--threads N`` (:mod:`umilayers._threads`: one torch thread on
the CPU unless told otherwise), applied once when the command starts; the library never changes
the process's thread count.

Example::

    >>> parser = build_parser()
    >>> args = parser.parse_args(["fit", "store", "--method", "vanilla", "--out", "run", "--dim", "16"])
    >>> config = fit_config(args)
    >>> config.model.dim, config.method
    (16, 'vanilla')
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn, Optional, Sequence

from umilayers._config import OptionSpec
from umilayers._threads import add_threads_argument, apply_thread_policy
from umilayers._validation import InvalidArgument, MissingExtra
from umilayers._version import __version__
from umilayers.data import check_store
from umilayers.data.synthetic import LAYOUTS, make_synthetic_store
from umilayers.demo import DemoSize
from umilayers.demo import main as demo_main
from umilayers.train import FitConfig, compare, evaluate, fit
from umilayers.train.compare import DEFAULT_LR_GRID, DEFAULT_METHODS
from umilayers.train.presets import PRESETS, preset_options
from umilayers.train.run import RUN_FILES

__all__ = ["ArgumentParser", "HelpFormatter", "flag", "add_fit_arguments", "fit_config", "parse_fit_args",
           "add_preset_argument", "preset_defaults", "build_parser", "USER_ERRORS", "error_message", "report_error",
           "describe_run", "synth_next_steps", "main"]

#: Titles of the ``--help`` sections, one per concern of :class:`~umilayers.train.FitConfig`.
GROUPS = {"method": "method", "model": "model (ModelConfig)", "train": "training (TrainConfig)",
          "runtime": "runtime (RuntimeConfig: may differ on --resume)"}
_NONE = "none"
#: Arguments of the library whose command-line spelling is a positional argument's metavar.
POSITIONALS = {"path": "STORE", "store": "STORE", "run_dir": "RUN"}


def flag(name: str) -> str:
    """The command-line spelling of an option: ``num_tokens`` -> ``--num-tokens``; an argument
    that is positional on the command line is its metavar (``store`` -> ``STORE``)."""
    return POSITIONALS.get(name) or "--" + name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, as every other refusal of the
    command line: ``prog: error: <message>`` on stderr, exit status 2 (argparse prints its whole
    usage first; ``--help`` shows it). Sub-command parsers inherit the class.

    Example::

        >>> import contextlib, io
        >>> parser = ArgumentParser(prog="demo")
        >>> _ = parser.add_argument("--epochs", type=int)
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        ...     _ = parser.parse_args(["--epochs", "two"])
        >>> print(err.getvalue(), end="")
        demo: error: argument --epochs: invalid int value: 'two'
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default after its help (not for required
    ones, nor where the help says the default in words, nor an unset default (``None``, ``[]``)
    of an option that is not a config field).

    Example::

        >>> parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
        >>> _ = parser.add_argument("--seeds", type=int, default=3, help="seeds to run")
        >>> _ = parser.add_argument("--store", default=None, help="store (default: the run's)")
        >>> text = " ".join(parser.format_help().split())
        >>> "seeds to run (default: 3)" in text, "(default: None)" in text
        (True, False)
    """

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        unset = action.default in (None, []) and not isinstance(action, _Value)
        if action.required or unset or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class _Toggle(argparse.Action):
    """``--x`` / ``--no-x`` for a ``bool`` option."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, required: bool = False,
                 help: Optional[str] = None) -> None:
        strings = [s for name in option_strings for s in (name, "--no-" + name[2:])]
        super().__init__(strings, dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _Value(argparse.Action):
    """One option's value: converted by the option's kind and checked like the config field;
    a bad value is an error naming the flag as typed."""

    def __init__(self, option_strings: Sequence[str], dest: str, spec: OptionSpec, **kwargs: Any) -> None:
        self.spec = spec
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string: Optional[str] = None) -> None:
        typed = option_string or flag(self.spec.name)
        spell = lambda name: typed if name == self.spec.name else flag(name)  # noqa: E731
        try:
            value = _convert(self.spec, values)
            self.spec.check(value)
        except InvalidArgument as err:
            parser.error(err.message(spell))
        setattr(namespace, self.dest, value)


def _convert(spec: OptionSpec, text: str) -> Any:
    if spec.optional and text.lower() == _NONE:
        return None
    if spec.kind is str:
        return text
    try:
        return spec.kind(text)
    except ValueError:
        article = "an" if spec.kind is int else "a"
        raise InvalidArgument(spec.name, f"expected {article} {spec.kind.__name__}, got {text!r}") from None


def _add_option(group: Any, spec: OptionSpec, default: Any) -> None:
    if spec.kind is bool:
        group.add_argument(flag(spec.name), action=_Toggle, dest=spec.name, default=default, help=spec.help)
        return
    metavar = "{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else spec.name.upper()
    help_text = spec.help + (f"; '{_NONE}' for None" if spec.optional else "")
    group.add_argument(flag(spec.name), action=_Value, spec=spec, dest=spec.name, default=default,
                       metavar=metavar, help=help_text)


def add_fit_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = (),
                      defaults: Optional[Mapping[str, Any]] = None) -> argparse.ArgumentParser:
    """Add ``--out``, ``--resume``, ``--overwrite``, ``--threads`` and one option per field of
    :class:`~umilayers.train.FitConfig` and its concerns (sections "method", "model",
    "training", "runtime"). ``--threads`` is the command's, not the run's: apply it with
    :func:`~umilayers._threads.apply_thread_policy` when the command starts.

    Args:
        parser: the parser to extend (give it ``formatter_class=HelpFormatter`` to show the
            defaults in ``--help``).
        exclude: options to leave out (a script that fixes the method passes ``["method"]``).
        defaults: other defaults for some options (a dataset's paper settings), by field name;
            ``--help`` shows them.
    """
    defaults = dict(defaults or {})
    specs = FitConfig.specs()
    known = {spec.name for group in specs.values() for spec in group}
    unknown = sorted((set(defaults) | set(exclude)) - known)
    if unknown:
        raise ValueError(f"add_fit_arguments: unknown options {unknown}; expected some of {sorted(known)}")
    FitConfig.from_options(**defaults)  # the new defaults must be valid together
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory (created; required)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete a previous run in --out first")
    add_threads_argument(run)
    for concern, group_specs in specs.items():
        group = parser.add_argument_group(GROUPS[concern])
        for spec in group_specs:
            if spec.name not in exclude:
                _add_option(group, spec, defaults.get(spec.name, spec.default))
    return parser


def fit_config(args: argparse.Namespace, **fixed: Any) -> FitConfig:
    """The :class:`~umilayers.train.FitConfig` of parsed ``args`` (plus ``fixed`` options).

    Raises:
        InvalidArgument: options that are invalid together (naming one; render it with
            ``err.message(flag)``).
    """
    names = [spec.name for group in FitConfig.specs().values() for spec in group]
    options = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return FitConfig.from_options(**{**options, **fixed})


def parse_fit_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                   **fixed: Any) -> tuple[argparse.Namespace, FitConfig]:
    """Parse ``argv`` and build the :class:`~umilayers.train.FitConfig`; a bad value or
    combination exits with one line naming the flag (``parser.error``)."""
    args = parser.parse_args(argv)
    try:
        return args, fit_config(args, **fixed)
    except InvalidArgument as err:
        parser.error(err.message(flag))
        raise  # unreachable: parser.error exits


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME`` (:data:`~umilayers.train.presets.PRESETS`); a script reads it first
    with :func:`preset_defaults` and passes the preset's options to :func:`add_fit_arguments` as
    ``defaults``, so that flags given on the command line override them."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from named settings: paper = the paper's schedule and sizes for this benchmark "
                             "(docs: Training, 'The paper's settings'); other flags override them")


def preset_defaults(argv: Optional[Sequence[str]], benchmark: str) -> dict[str, Any]:
    """The options of the ``--preset`` named in ``argv`` for ``benchmark`` (``{}`` without one).

    Example::

        >>> preset_defaults(["STORE", "--preset", "paper", "--epochs", "2"], "robot")["epochs"]
        50
        >>> preset_defaults(["STORE"], "robot")
        {}
    """
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    known, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return preset_options(known.preset, benchmark) if known.preset else {}


def _int_option(parser: Any, name: str, default: int, help: str, minimum: int) -> None:
    """An int option checked like a config field (one line naming the flag as typed)."""
    _add_option(parser, OptionSpec(name, int, False, default, help, minimum=minimum), default)


def build_parser() -> argparse.ArgumentParser:
    """The ``umilayers`` parser with its sub-commands."""
    parser = ArgumentParser(
        prog="umilayers",
        description="Learning Unseen Modality Interaction: train and evaluate on FeatureStores.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"umilayers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo_size = DemoSize.default()
    synth = sub.add_parser(
        "synth", help="write a synthetic FeatureStore (the demo's data) to try fit on", formatter_class=HelpFormatter,
        description="Write the synthetic FeatureStore of a task (umilayers.data.synthetic): modality-incomplete "
                    "training splits, val and test with every modality, as in the paper's Table 1. The defaults "
                    "are the demo's sizes.")
    synth.add_argument("task", choices=list(LAYOUTS), help="classification (rgb | audio), regression (image+force "
                                                           "| depth+proprio) or retrieval (4 + 4 of 7 modalities)")
    synth.add_argument("store", metavar="STORE", help="FeatureStore folder to create")
    _int_option(synth, "size", demo_size.num_train, "samples in each training split", 1)
    _int_option(synth, "eval_size", demo_size.num_eval, "samples in val and in test", 1)
    _int_option(synth, "seed", 0, "seed of every random choice (a seed always gives the same store)", 0)
    synth.add_argument("--overwrite", action="store_true", help="replace a FeatureStore already in STORE")

    check = sub.add_parser("check", help="validate a FeatureStore and print its summary",
                           formatter_class=HelpFormatter)
    check.add_argument("path", metavar="STORE", help="FeatureStore directory (or its store.json)")
    check.add_argument("--shallow", action="store_true", help="skip the NaN/inf scan of every feature")

    fit_parser = sub.add_parser("fit", help="train a method on a FeatureStore (two stages)",
                                description="Train a method on a FeatureStore; writes the run folder --out "
                                            "(metrics.json, model.pt, ...).",
                                formatter_class=HelpFormatter)
    fit_parser.add_argument("store", metavar="STORE", help="FeatureStore directory")
    add_fit_arguments(fit_parser)

    cmp = sub.add_parser("compare", help="umi against its baselines on a FeatureStore, at the same budget",
                         formatter_class=HelpFormatter,
                         description="Train each method of --methods with the same options, learning-rate search "
                                     "(on val) and seeds; write --out/compare.json, compare.md (the table and "
                                     "the verdicts) and compare.png, every run a fit run folder under --out/runs. "
                                     "Rerunning the same command continues where it stopped (--resume is implied).")
    cmp.add_argument("store", help="FeatureStore directory")
    cmp.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help="comma-separated METHOD[:PREDICTOR] (the predictor of its unimodal models), umi included")
    _int_option(cmp, "seeds", 3, "seeds 0 .. SEEDS-1 of every method", 1)
    cmp.add_argument("--lr-grid", default=",".join(f"{f:g}" for f in DEFAULT_LR_GRID),
                     help="factors of each method's default --lr tried on seed 0, the best on val kept")
    add_fit_arguments(cmp, exclude=["method", "modality", "seed"])

    ev = sub.add_parser("evaluate", help="score a run's best model on a split", formatter_class=HelpFormatter,
                        description="Score the best model of a finished run, with all or some modalities.")
    ev.add_argument("run", metavar="RUN", help="run directory written by umilayers fit")
    ev.add_argument("--store", default=None, help="store (default: the run's)")
    ev.add_argument("--split", default="test", help="a split of the store, or a role: train, val, test")
    ev.add_argument("--modalities", default=None, help="comma-separated subset, e.g. rgb,audio (default: all)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    add_threads_argument(ev)

    demo = sub.add_parser("demo", help="the embedded synthetic benchmark (umilayers demo --help)", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    return parser


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _is_main_process() -> bool:
    """Whether this is rank 0 (or the only process): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


#: What a command refuses with one line on stderr and exit status 2 instead of a traceback: what
#: the user gave is wrong (:class:`~umilayers._validation.InvalidArgument`: bad options, stores
#: (``StoreError``), runs that exist (``RunExistsError``), ...) or an optional package is
#: missing (:class:`~umilayers._validation.MissingExtra`). Anything else is a bug: a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (InvalidArgument, MissingExtra)


def error_message(err: BaseException) -> str:
    """The one-line message of a refused command, options spelled as flags (``--epochs``).

    Example::

        >>> error_message(InvalidArgument("num_tokens", "must be even, got 3"))
        '--num-tokens: must be even, got 3'
        >>> error_message(MissingExtra("h5py", "datasets", "reading the robot dataset"))
        'reading the robot dataset needs h5py: pip install "umilayers[datasets]"'
    """
    text = err.message(flag) if isinstance(err, InvalidArgument) else str(err)
    return " ".join(text.split("\n"))


def report_error(prog: str, err: BaseException) -> int:
    """Print ``prog: error: <message>`` on stderr (one line); return the exit status, 2."""
    print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
    return 2


def describe_run(out: Any, metrics: Optional[Mapping[str, Any]] = None) -> str:
    """Where a finished run is and what its folder holds, for the end of a command.

    Example::

        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.json").write_text("{}")
        >>> print(describe_run(run, {"best_epoch": 2}).splitlines()[1])
          metrics.json  val and test metrics of the best model
    """
    out = Path(out)
    present = [name for name in RUN_FILES if (out / name).exists()]
    width = max((len(name) + 1 for name in present), default=0)
    best = f" (best epoch: {metrics['best_epoch']}, chosen on val)" if metrics and "best_epoch" in metrics else ""
    lines = [f"run folder: {out}{best}"]
    lines += [f"  {(name + ('/' if (out / name).is_dir() else '')).ljust(width)}  {RUN_FILES[name]}"
              for name in present]
    lines.append(f"evaluate with some of its modalities: umilayers evaluate {out} --modalities M1,M2")
    return "\n".join(lines)


def synth_next_steps(store: Any, task: str) -> str:
    """The commands to try next on a store made by ``umilayers synth``: the demo's setting,
    the options that differ from ``umilayers fit``'s defaults.

    Example::

        >>> print(synth_next_steps("data/cls", "classification").splitlines()[1])  # doctest: +ELLIPSIS
          umilayers fit data/cls --out runs/classification-umi --epochs 12 ...
    """
    defaults = FitConfig().options()
    options = {k: v for k, v in DemoSize.default().fit_options().items() if defaults[k] != v}
    flags = " ".join(f"{flag(k)} {v}" for k, v in options.items())
    run = f"runs/{task}-umi"
    return "\n".join([
        "next (the demo's setting, a minute or two on a CPU):",
        f"  umilayers fit {store} --out {run} {flags}",
        f"  umilayers fit {store} --out runs/{task}-late-fusion --method late-fusion {flags}",
        f"  umilayers evaluate {run} --modalities {LAYOUTS[task][next(iter(LAYOUTS[task]))][0]}",
    ])


def _synth(args: argparse.Namespace) -> int:
    store = Path(args.store)
    made = make_synthetic_store(args.task, store, num_train=args.size, num_eval=args.eval_size, seed=args.seed,
                                overwrite=args.overwrite)
    print(made.summary())
    print(synth_next_steps(store, args.task))
    return 0


def _check(args: argparse.Namespace) -> int:
    print(check_store(args.path, deep=not args.shallow))
    return 0


def _fit(args: argparse.Namespace) -> int:
    config = fit_config(args)
    apply_thread_policy(args.threads, config.runtime.device)
    metrics = fit(args.store, out=args.out, config=config, resume=args.resume, overwrite=args.overwrite)
    if _is_main_process():
        _print_json(metrics)
        print(describe_run(args.out, metrics), file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    config = fit_config(args)
    apply_thread_policy(args.threads, config.runtime.device)
    compare(args.store, args.out, methods=args.methods, seeds=args.seeds, lr_grid=args.lr_grid, config=config,
            overwrite=args.overwrite)
    print((Path(args.out) / "compare.md").read_text(), end="")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    apply_thread_policy(args.threads, args.device)
    subset = [m for m in args.modalities.split(",") if m] if args.modalities else None
    _print_json(evaluate(args.run, store=args.store, split=args.split, modalities=subset,
                         device=args.device, batch_size=args.batch_size))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``umilayers`` and ``python -m umilayers``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return int(demo_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"synth": _synth, "check": _check, "fit": _fit, "compare": _compare, "evaluate": _evaluate}
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        return report_error(f"umilayers {args.command}", err)
    except KeyboardInterrupt:
        hint = {"fit": "; the last finished epoch is kept: add --resume to continue",
                "compare": "; rerun the same command to continue"}.get(args.command, "")
        print(f"umilayers {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
