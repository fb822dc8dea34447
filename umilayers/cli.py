"""The ``umilayers`` command line: ``fit``, ``evaluate``, ``check`` and ``demo``.

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
check with the field's name (:class:`~umilayers._validation.InvalidArgument`).

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
from typing import Any, Mapping, Optional, Sequence

from umilayers._config import OptionSpec
from umilayers._validation import InvalidArgument
from umilayers._version import __version__
from umilayers.data import StoreError, check_store
from umilayers.demo import main as demo_main
from umilayers.train import FitConfig, RunExistsError, evaluate, fit
from umilayers.train.presets import PRESETS, preset_options

__all__ = ["HelpFormatter", "flag", "add_fit_arguments", "fit_config", "parse_fit_args", "add_preset_argument",
           "preset_defaults", "build_parser", "main"]

#: Titles of the ``--help`` sections, one per concern of :class:`~umilayers.train.FitConfig`.
GROUPS = {"method": "method", "model": "model (ModelConfig)", "train": "training (TrainConfig)",
          "runtime": "runtime (RuntimeConfig: may differ on --resume)"}
_NONE = "none"


def flag(name: str) -> str:
    """The command-line spelling of an option: ``num_tokens`` -> ``--num-tokens``."""
    return "--" + name.replace("_", "-")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default after its help (not for required ones).

    Example::

        >>> parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
        >>> _ = parser.add_argument("--seeds", type=int, default=3, help="seeds to run")
        >>> "seeds to run (default: 3)" in parser.format_help()
        True
    """

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.required:
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
    """Add ``--out``, ``--resume``, ``--overwrite`` and one option per field of
    :class:`~umilayers.train.FitConfig` and its concerns (sections "method", "model",
    "training", "runtime").

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
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    known, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return preset_options(known.preset, benchmark) if known.preset else {}


def build_parser() -> argparse.ArgumentParser:
    """The ``umilayers`` parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="umilayers",
        description="Learning Unseen Modality Interaction: train and evaluate on FeatureStores.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"umilayers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    fit_parser = sub.add_parser("fit", help="train a method on a FeatureStore (two stages)",
                                description="Train a method on a FeatureStore; writes RUN/metrics.json.",
                                formatter_class=HelpFormatter)
    fit_parser.add_argument("store", help="FeatureStore directory")
    add_fit_arguments(fit_parser)

    ev = sub.add_parser("evaluate", help="score a run's best model on a split", formatter_class=HelpFormatter,
                        description="Score the best model of a finished run, with all or some modalities.")
    ev.add_argument("run", help="run directory written by umilayers fit")
    ev.add_argument("--store", default=None, help="store (default: the run's)")
    ev.add_argument("--split", default="test", help="split name or role")
    ev.add_argument("--modalities", default=None, help="comma-separated subset, e.g. rgb,audio (default: all)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")

    check = sub.add_parser("check", help="validate a FeatureStore and print its summary",
                           formatter_class=HelpFormatter)
    check.add_argument("path", help="FeatureStore directory")
    check.add_argument("--shallow", action="store_true", help="skip the NaN/inf scan of every feature")

    demo = sub.add_parser("demo", help="the embedded synthetic benchmark (see umilayers.demo)", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    return parser


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _is_main_process() -> bool:
    """Whether this is rank 0 (or the only process): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``umilayers`` and ``python -m umilayers``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return int(demo_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            print(check_store(args.path, deep=not args.shallow))
            return 0
        if args.command == "fit":
            config = fit_config(args)
            metrics = fit(args.store, out=args.out, config=config, resume=args.resume, overwrite=args.overwrite)
            if _is_main_process():
                _print_json(metrics)
            return 0
        if args.command == "evaluate":
            subset = [m for m in args.modalities.split(",") if m] if args.modalities else None
            _print_json(evaluate(args.run, store=args.store, split=args.split, modalities=subset,
                                 device=args.device, batch_size=args.batch_size))
            return 0
    except InvalidArgument as err:
        print(f"umilayers {args.command}: error: {err.message(flag)}", file=sys.stderr)
        return 2
    except (StoreError, RunExistsError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"umilayers {args.command}: error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
