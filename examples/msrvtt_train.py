"""MSR-VTT text-video retrieval with the Collaborative Experts features, end to end.

    python examples/msrvtt_train.py --data data/MSRVTT --out RUN [any umilayers fit option]

``--data`` is the ``data/MSRVTT`` folder of the CE feature release (``structured-symlinks/``)
or of the later high-quality release (``high-quality/structured-symlinks/``), or a feature root
itself; the MMT-style ``mmt_feats/`` layout is detected too. The features are written to
``RUN/store`` (or ``--store``; an existing store is reused) with the paper's protocol
(``--protocol paper``, on the full split): split A = the training videos with audio, OCR and
speech ({rgb, audio, ocr, speech}), split B = the rest ({rgb, object, scene, face}), val / test
= the videos of the full val / test lists that have audio, OCR and speech too (``--eval-requires``;
the kept counts are printed next to the paper's 127 of 497 and 765 of 2,990); every caption of a
video is kept. Then ``umilayers.train.fit`` trains and writes ``RUN/metrics.json`` as ``umilayers fit``
does; this script adds the split sizes it used there (``msrvtt_splits``, next to the paper's).
``--extract-only`` stops after the store (the sizes are in ``STORE/msrvtt_rows.json``).
``--preset paper`` trains with the paper's MSR-VTT settings (50 epochs, SGD at 1e-2, batch 128,
k* = 16, n_u = 128, alpha = 1, e = 20, the retrieval pseudo-labels of Sec. 3.3; docs: Training,
"The paper's settings"); other flags override them. That pseudo-label rule was unstable in our
own val study (docs: MSR-VTT, "Command"); ``--retrieval-pseudo relational`` keeps the rest of the
preset with this library's default rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

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
from umilayers.datasets import msrvtt
from umilayers.train import FitConfig, fit, process_group


def _modality_file(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    return name, path


def _eval_requires(text: str) -> tuple[str, ...]:
    names = msrvtt.MSRVTT_MODALITIES if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in msrvtt.MSRVTT_MODALITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected 'all' or some of {','.join(msrvtt.MSRVTT_MODALITIES)} "
                                         f"separated by commas, got {text!r}")
    return names


def build_parser(preset: Optional[dict] = None) -> argparse.ArgumentParser:
    """The parser; ``preset``: the options of ``--preset`` (:func:`umilayers.cli.preset_defaults`)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and extraction")
    data.add_argument("--data", required=True,
                      help="data/MSRVTT of the CE or high-quality feature release (or a feature root)")
    data.add_argument("--store", default=None, help="FeatureStore to write or reuse (default RUN/store)")
    data.add_argument("--extract-only", action="store_true", help="stop after writing the store")
    data.add_argument("--skip-missing", action="store_true",
                      help="drop listed videos without captions or without any modality (and report)")
    data.add_argument("--protocol", choices=list(msrvtt.PROTOCOLS), default="paper",
                      help="paper (default): splits A/B by audio+OCR+speech, val/test videos with "
                           "--eval-requires; balanced: groups by coverage in equal halves")
    data.add_argument("--split", choices=["jsfusion", "full"], default=None,
                      help="the full split (default; the only one of --protocol paper) or 1k-A")
    data.add_argument("--release", choices=["auto", *msrvtt.RELEASES], default="auto",
                      help="feature release under --data (default: the one found, CE first)")
    data.add_argument("--layout", choices=["auto", "ce", "mmt"], default="auto",
                      help="feature layout: the CE release, MMT's mmt_feats/, or detected")
    data.add_argument("--text-feat", default="w2v",
                      help="text features by the release's names: w2v (default), openai, gpt2-xl, ...")
    data.add_argument("--text-file", default=None, help="text-feature pickle relative to the root")
    data.add_argument("--modality-file", type=_modality_file, action="append", default=[],
                      metavar="NAME=PATH", help="override a modality's pickle (relative to the root)")
    data.add_argument("--embed-dim", type=int, default=256, help="joint embedding size (store num_outputs)")
    data.add_argument("--val-size", type=int, default=500,
                      help="balanced, 1k-A: training videos held out for val (1k-A has no val list)")
    data.add_argument("--max-train-captions", type=int, default=None,
                      help="captions kept per training video, its first ones (default: all)")
    data.add_argument("--min-fraction", type=float, default=0.75,
                      help="balanced: coverage of a group's modalities a video needs to join it")
    data.add_argument("--eval-requires", type=_eval_requires, default=msrvtt.SPLIT_A_REQUIRES,
                      metavar="M1,M2,...|all",
                      help="paper: modalities a val/test video must have (default: audio,ocr,speech, split "
                           "A's rule, which keeps the paper's share, 127 of 497 val and 765 of 2,990 test "
                           "videos; 'all' = all seven, which keeps fewer)")
    data.add_argument("--missing", choices=["lengths0", "complete"], default="lengths0",
                      help="rows lacking a modality of their split: length 0 (default) or left out")
    add_fit_arguments(parser, defaults=preset)
    add_preset_argument(parser)
    return parser


def record_split_sizes(store: Path, run: Path) -> Optional[dict]:
    """Add the store's MSR-VTT split sizes (and the paper's) to ``RUN/metrics.json`` as
    ``msrvtt_splits``; returns them, or None when there is no metrics.json yet."""
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        return None
    summary = json.loads((store / "msrvtt_rows.json").read_text())
    sizes = {"protocol": summary.get("protocol"), "videos": summary.get("split_sizes"),
             "paper": summary.get("paper_split_sizes"),
             "captions": {n: s["captions"] for n, s in summary["splits"].items()}}
    metrics = json.loads(metrics_path.read_text())
    metrics["msrvtt_splits"] = sizes
    atomic_write_json(metrics_path, metrics)
    return sizes


def _train(args, config: FitConfig, store: Path, run: Path, rank: int) -> None:
    metrics = fit(str(store), out=run, config=config, resume=args.resume, overwrite=args.overwrite)
    if rank == 0:
        record_split_sizes(store, run)
        print(json.dumps(metrics.get("test", metrics), indent=2))
        print(describe_run(run, metrics), file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser(preset_defaults(argv, "msrvtt"))
    args, config = parse_fit_args(parser, argv)
    apply_thread_policy(args.threads, config.runtime.device)
    run = Path(args.out)
    store = Path(args.store) if args.store else run / "store"
    rank = int(os.environ.get("RANK", "0"))
    done_marker = store / "msrvtt_rows.json"
    try:
        if not done_marker.is_file():
            if rank == 0:
                msrvtt.build_msrvtt_store(
                    args.data, store, protocol=args.protocol, split=args.split,
                    release=args.release, layout=args.layout,
                    text_feat=args.text_feat, text_file=args.text_file,
                    modality_files=dict(args.modality_file), embed_dim=args.embed_dim,
                    seed=config.train.seed, val_size=args.val_size,
                    max_train_captions=args.max_train_captions, min_fraction=args.min_fraction,
                    eval_requires=args.eval_requires,
                    missing=args.missing, skip_missing=args.skip_missing,
                )
            else:
                while not done_marker.is_file():
                    time.sleep(2.0)
        elif rank == 0:
            print(f"reusing the store in {store}")
        if args.extract_only:
            return 0
        with process_group(config.runtime.device):
            _train(args, config, store, run, rank)
    except USER_ERRORS as err:
        return report_error(parser.prog, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
