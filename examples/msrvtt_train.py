"""MSR-VTT text-video retrieval with the Collaborative Experts features, end to end.

    python examples/msrvtt_train.py --data CE_ROOT --out RUN [any umilayers fit option]

``CE_ROOT`` is the ``MSRVTT`` folder of the CE release (or its
``high-quality/structured-symlinks`` feature root); the MMT-style ``mmt_feats/`` layout is
detected too. The features are written to ``RUN/store`` (or ``--store``; an existing store is
reused) with the splits of Zhang et al.'s Table 1: training videos in a {rgb, audio, ocr,
speech} group and a {rgb, object, scene, face} group by which modalities each video has,
val/test with every modality. Then ``umilayers.train.fit`` trains with the triplet loss and
writes ``RUN/metrics.json`` (R@1/5/10, median and mean rank, both directions) as
``umilayers fit`` does. ``--extract-only`` stops after the store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from umilayers.cli import HelpFormatter, add_fit_arguments, parse_fit_args
from umilayers.datasets import msrvtt
from umilayers.train import FitConfig, fit, process_group


def _modality_file(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and extraction")
    data.add_argument("--data", required=True, help="CE MSRVTT folder (or its feature root)")
    data.add_argument("--store", default=None, help="FeatureStore to write or reuse (default RUN/store)")
    data.add_argument("--extract-only", action="store_true", help="stop after writing the store")
    data.add_argument("--skip-missing", action="store_true",
                      help="drop listed videos without captions or without any modality (and report)")
    data.add_argument("--split", choices=["jsfusion", "full"], default="jsfusion",
                      help="1k-A (jsfusion, default) or the full split")
    data.add_argument("--layout", choices=["auto", "ce", "mmt"], default="auto",
                      help="feature layout: the CE release, MMT's mmt_feats/, or detected")
    data.add_argument("--text-feat", default="w2v", help="CE text features: w2v (default), openai, ...")
    data.add_argument("--text-file", default=None, help="text-feature pickle relative to the root")
    data.add_argument("--modality-file", type=_modality_file, action="append", default=[],
                      metavar="NAME=PATH", help="override a modality's pickle (relative to the root)")
    data.add_argument("--embed-dim", type=int, default=256, help="joint embedding size (store num_outputs)")
    data.add_argument("--val-size", type=int, default=500,
                      help="training videos held out for val when the split has no val list")
    data.add_argument("--train-captions", type=int, default=1, help="rows (captions) per training video")
    data.add_argument("--min-fraction", type=float, default=0.75,
                      help="coverage of a group's modalities a video needs to join it (default 3 of 4)")
    data.add_argument("--missing", choices=["lengths0", "complete"], default="lengths0",
                      help="rows lacking a modality of their split: length 0 (default) or left out")
    add_fit_arguments(parser)
    return parser


def _train(args, config: FitConfig, store: Path, run: Path, rank: int) -> None:
    metrics = fit(str(store), out=run, config=config, resume=args.resume, overwrite=args.overwrite)
    if rank == 0:
        print(json.dumps(metrics.get("test", metrics), indent=2))


def main(argv=None) -> int:
    args, config = parse_fit_args(build_parser(), argv)
    run = Path(args.out)
    store = Path(args.store) if args.store else run / "store"
    rank = int(os.environ.get("RANK", "0"))
    done_marker = store / "msrvtt_rows.json"
    try:
        if not done_marker.is_file():
            if rank == 0:
                run.mkdir(parents=True, exist_ok=True)
                msrvtt.build_msrvtt_store(
                    args.data, store, split=args.split, layout=args.layout,
                    text_feat=args.text_feat, text_file=args.text_file,
                    modality_files=dict(args.modality_file), embed_dim=args.embed_dim,
                    seed=config.train.seed, val_size=args.val_size, train_captions=args.train_captions,
                    min_fraction=args.min_fraction, missing=args.missing,
                    skip_missing=args.skip_missing,
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
    except (msrvtt.MSRVTTDataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
