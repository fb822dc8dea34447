"""Train on an EPIC-Kitchens-100 FeatureStore (written by epic_extract.py); adds verb/noun top-1.

    python examples/epic_train.py STORE --out RUN [any umilayers fit option]

Every option of ``umilayers fit`` is accepted (``--method``, ``--epochs``, ``--resume``,
``--amp``, ...); the defaults are the paper's EPIC-Kitchens model settings (k* = 512 tokens,
D = 256, 6 layers, 8 heads, lambda = 0.001, alpha = 3000 on the released code's scale of the KL
term, pseudo-labels averaged over the last 10 unimodal epochs; one alignment token per action
class) with this library's optimisation. ``--preset paper`` adds the paper's schedule (120
epochs, a ten-fold drop for the last 50, batch 96), the released code's SGD at 1e-1 (the
paper's 1e-4 with SGD learns nothing: docs, Training) and its
64-wide heads (``--head-dim 64``; docs: Training, "The paper's settings"). Runs under
``torchrun --nproc_per_node=N`` as ``umilayers fit`` does.

The preprocessing is the store's: ``--preset paper`` here trains as the paper does but cannot
change the tokens, so it prints a note when STORE was not extracted with ``epic_extract.py
--preset paper`` (the released code's preprocessing, recorded in STORE/epic_extraction.json).

After training, RUN/metrics.json's ``test`` entry gains ``action_top1``, ``verb_top1`` and
``noun_top1``: the predicted action (argmax of RUN/test_predictions.npy) mapped back to its
(verb, noun) classes with STORE/epic_actions.json, which is checked before any training (a store
not written by epic_extract.py is refused; train it with ``umilayers fit``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from umilayers._io import atomic_write_json
from umilayers._threads import apply_thread_policy
from umilayers.cli import (
    USER_ERRORS,
    ArgumentParser,
    HelpFormatter,
    add_fit_arguments,
    add_preset_argument,
    describe_run,
    parse_fit_args,
    preset_defaults,
    report_error,
)
from umilayers.data.store import FeatureStore, StoreError
from umilayers.datasets import epic
from umilayers.train import fit

# The paper's EPIC-Kitchens hyper-parameters (Sec. 5), where `umilayers fit` has the option;
# alpha = 3000 is on the released code's scale of the KL term (its mean over batch x classes).
EPIC_DEFAULTS = {
    "num_tokens": 512, "dim": 256, "projection_depth": 6, "fusion_depth": 6, "heads": 8,
    "align_weight": 0.001, "pseudo_weight": 3000.0, "pseudo_reduction": "elementwise_mean", "pseudo_window": 10,
}


def build_parser(preset: Optional[dict[str, Any]] = None) -> argparse.ArgumentParser:
    """The parser; ``preset``: the options of ``--preset`` (:func:`umilayers.cli.preset_defaults`)."""
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("store", help="FeatureStore written by examples/epic_extract.py")
    add_fit_arguments(parser, defaults={**EPIC_DEFAULTS, **(preset or {})})
    add_preset_argument(parser)
    return parser


def add_verb_noun_metrics(store: Path, run: Path) -> Optional[dict[str, float]]:
    """Score RUN/test_predictions.npy per action, verb and noun; update RUN/metrics.json.

    Returns the scores, or None when the run wrote no predictions (nothing is changed then).
    """
    predictions_path, metrics_path = run / "test_predictions.npy", run / "metrics.json"
    if not predictions_path.is_file() or not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    opened = FeatureStore(store)
    splits = metrics.get("test_splits") or opened.splits_with_role("test")
    targets = np.concatenate([opened.targets(name) for name in splits])
    predictions = np.load(predictions_path)
    if predictions.shape != (len(targets), opened.num_outputs):
        raise StoreError(f"{predictions_path}: expected shape ({len(targets)}, {opened.num_outputs}) "
                         f"for test splits {splits}, found {predictions.shape}")
    vocab = epic.ActionVocabulary.load(store / epic.ACTIONS_FILE)
    scores = epic.verb_noun_accuracy(predictions.argmax(axis=1), targets, vocab)
    metrics.setdefault("test", {}).update(scores)
    atomic_write_json(metrics_path, metrics)
    return scores


def check_epic_store(store: Path) -> epic.ActionVocabulary:
    """Open ``store`` (shallow) and its action table, before any training.

    Raises:
        StoreError: not a FeatureStore; no ``epic_actions.json`` (not written by
            ``epic_extract.py``), or one that does not fit the store.
    """
    opened = FeatureStore(store)
    path = opened.path / epic.ACTIONS_FILE
    if not path.is_file():
        raise StoreError(f"{path}: missing; epic_train.py trains on stores written by "
                         f"examples/epic_extract.py (it scores verbs and nouns with this action table); "
                         f"train any other store with umilayers fit")
    vocab = epic.ActionVocabulary.load(path)
    if vocab.num_actions != opened.num_outputs:
        raise StoreError(f"{path}: {vocab.num_actions} actions, but the store has {opened.num_outputs} classes")
    return vocab


def preprocessing_note(store: Path) -> Optional[str]:
    """A note when ``store`` was not extracted with the released code's preprocessing
    (:data:`~umilayers.datasets.epic.RELEASED_PREPROCESSING`); None when it was."""
    path = store / epic.EXTRACTION_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    differ = {k: recorded.get(k, "not recorded")
              for k, v in epic.RELEASED_PREPROCESSING.items() if recorded.get(k) != v}
    if not differ:
        return None
    return (f"note: --preset paper trains as the paper does, but {store} was not extracted with the released "
            f"code's preprocessing (" + ", ".join(f"{k} {v}" for k, v in differ.items())
            + "); extract it with epic_extract.py --preset paper for that")


def main(argv: Optional[Sequence[str]] = None) -> int:
    preset = preset_defaults(argv, "epic")
    parser = build_parser(preset)
    args, config = parse_fit_args(parser, argv)
    apply_thread_policy(args.threads, config.runtime.device)
    try:
        check_epic_store(Path(args.store))
        note = preprocessing_note(Path(args.store)) if preset else None
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(note, file=sys.stderr)
        metrics: dict[str, Any] = fit(args.store, out=args.out, config=config, resume=args.resume,
                                      overwrite=args.overwrite)
    except USER_ERRORS as err:
        return report_error(parser.prog, err)
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes, as `umilayers fit`
        return 0
    scores = add_verb_noun_metrics(Path(args.store), Path(args.out))
    if scores is None:
        print(f"note: {args.out}/test_predictions.npy not written; verb/noun top-1 not computed",
              file=sys.stderr)
    else:
        metrics.setdefault("test", {}).update(scores)
    print(json.dumps(metrics, indent=2))
    print(describe_run(args.out, metrics), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
