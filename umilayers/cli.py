"""The ``umilayers`` command line: ``fit``, ``evaluate``, ``check`` (and ``demo`` when installed).

``umilayers fit STORE --method umi --out RUN`` is :func:`umilayers.recipes.fit` with the same
options; ``python -m umilayers ...`` is the same program. Multi-process training::

    torchrun --nproc_per_node=2 -m umilayers fit STORE --method umi --out RUN

Scripts that train on their own data (``examples/*.py``) reuse the options with
:func:`add_fit_arguments` and :func:`fit_options`.

Example::

    >>> parser = build_parser()
    >>> args = parser.parse_args(["fit", "store", "--method", "vanilla", "--out", "run", "--dim", "16"])
    >>> fit_options(args)["dim"], args.method
    (16, 'vanilla')
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from typing import Any, Optional, Sequence

from umilayers.recipes import METHODS, FitConfig

__all__ = ["add_fit_arguments", "fit_options", "build_parser", "main"]

_DEFAULTS = FitConfig()


def add_fit_arguments(parser: argparse.ArgumentParser, *, method: bool = True) -> argparse.ArgumentParser:
    """Add every :class:`~umilayers.recipes.FitConfig` option (and ``--out``, ``--resume``,
    ``--overwrite``) to ``parser``; ``method=False`` leaves out ``--method`` (a script that
    fixes it)."""
    d = _DEFAULTS
    run = parser.add_argument_group("run")
    if method:
        run.add_argument("--method", choices=METHODS, default="umi", help="what to train (default: umi)")
    run.add_argument("--out", required=True, help="run directory (created)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete a previous run in --out first")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    run.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers")
    run.add_argument("--amp", action="store_true", help="bf16 autocast")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--modality", default=None, help="the modality of --method unimodal")
    run.add_argument("--unimodal-predictor", choices=("linear", "transformer"), default=d.unimodal_predictor,
                     help="predictor of the unimodal models (stage 1, late fusion, --method unimodal): "
                          "linear on mean-pooled tokens (the paper's, default) or a transformer over the tokens")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=d.epochs, help=f"multimodal epochs (default {d.epochs})")
    train.add_argument("--unimodal-epochs", type=int, default=d.unimodal_epochs,
                       help=f"epochs of each unimodal model, stage 1 (default {d.unimodal_epochs})")
    train.add_argument("--pseudo-window", type=int, default=d.pseudo_window,
                       help=f"last unimodal epochs averaged into pseudo-labels (default {d.pseudo_window})")
    train.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    train.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    train.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 = off")

    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=d.dim, help=f"common width D (default {d.dim})")
    model.add_argument("--tokens", type=int, default=d.tokens, help=f"common slots k* (default {d.tokens})")
    model.add_argument("--depth", type=int, default=d.depth, help=f"layers of both transformers (default {d.depth})")
    model.add_argument("--projection-depth", type=int, default=None, help="override --depth for the projections")
    model.add_argument("--fusion-depth", type=int, default=None, help="override --depth for the fusion")
    model.add_argument("--heads", type=int, default=d.heads)
    model.add_argument("--branches", type=int, default=d.branches)
    model.add_argument("--align-weight", type=float, default=d.align_weight, help="lambda of Eq. 3")
    model.add_argument("--pseudo-weight", type=float, default=d.pseudo_weight, help="alpha of Eq. 3")
    model.add_argument("--align-tokens", type=int, default=None, help="alignment tokens n_u")
    model.add_argument("--no-align", action="store_true", help="ablation: no alignment loss")
    model.add_argument("--no-pseudo", action="store_true", help="ablation: no pseudo-label branch")
    return parser


def fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~umilayers.recipes.FitConfig` fields found in parsed ``args``."""
    names = {f for f in FitConfig().to_dict()} - {"method"}
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def build_parser() -> argparse.ArgumentParser:
    """The ``umilayers`` parser with its sub-commands."""
    from umilayers import __version__

    parser = argparse.ArgumentParser(
        prog="umilayers",
        description="Learning Unseen Modality Interaction: train and evaluate on FeatureStores.",
    )
    parser.add_argument("--version", action="version", version=f"umilayers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    fit = sub.add_parser("fit", help="train a method on a FeatureStore (two stages)",
                         description="Train a method on a FeatureStore; writes RUN/metrics.json.")
    fit.add_argument("store", help="FeatureStore directory")
    add_fit_arguments(fit)

    ev = sub.add_parser("evaluate", help="score a run's best model on a split",
                        description="Score the best model of a finished run, with all or some modalities.")
    ev.add_argument("run", help="run directory written by umilayers fit")
    ev.add_argument("--store", default=None, help="store (default: the run's)")
    ev.add_argument("--split", default="test", help="split name or role (default: test)")
    ev.add_argument("--modalities", default=None, help="comma-separated subset, e.g. rgb,audio")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=None)

    check = sub.add_parser("check", help="validate a FeatureStore and print its summary")
    check.add_argument("path", help="FeatureStore directory")
    check.add_argument("--shallow", action="store_true", help="skip the NaN/inf scan of every feature")

    if importlib.util.find_spec("umilayers.demo") is not None:
        demo = sub.add_parser("demo", help="the embedded synthetic benchmark (see umilayers.demo)",
                              add_help=False)
        demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    return parser


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``umilayers`` and ``python -m umilayers``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo" and importlib.util.find_spec("umilayers.demo") is not None:
        demo = importlib.import_module("umilayers.demo")
        return int(demo.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from umilayers.data import StoreError
    from umilayers.recipes import RunExistsError

    try:
        if args.command == "check":
            from umilayers.data import check_store

            print(check_store(args.path, deep=not args.shallow))
            return 0
        if args.command == "fit":
            from umilayers.recipes import fit

            metrics = fit(args.store, args.method, args.out, resume=args.resume,
                          overwrite=args.overwrite, **fit_options(args))
            if _is_main_process():
                _print_json(metrics)
            return 0
        if args.command == "evaluate":
            from umilayers.recipes import evaluate

            subset = [m for m in args.modalities.split(",") if m] if args.modalities else None
            _print_json(evaluate(args.run, store=args.store, split=args.split, modalities=subset,
                                 device=args.device, batch_size=args.batch_size))
            return 0
    except (StoreError, RunExistsError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"umilayers {args.command}: error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)  # pragma: no cover


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
