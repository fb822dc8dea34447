"""Robot state regression (Lee et al., "Making Sense of Vision and Touch") end to end.

    python examples/robot_train.py --data H5_DIR --out RUN [any umilayers fit option]

1. Extraction (stage 1 of the paper's robot recipe): the episodes are split as Table 1 of
   Zhang et al. ({image, depth} and {proprio, force} training halves, val/test with all four,
   by episode), Lee et al.'s encoders are trained per modality on ``ee_yaw_next`` and their
   tokens are written to ``RUN/store`` (or ``--store``; an existing store is reused).
2. ``umilayers.train.fit`` on that store (unimodal stage, pseudo-labels, multimodal stage):
   writes ``RUN/metrics.json`` as ``umilayers fit`` does (MAE on val and test).
3. Every non-empty subset of the four modalities is evaluated on the test split with the best
   model (the paper's Figure 3): ``RUN/subsets.json``, ``RUN/subsets.md``, ``RUN/subsets.png``.

``--preset paper`` takes the paper's robot settings for step 2 (50 epochs, SGD at 1e-2, batch
128, k* = 16, n_u = 128, alpha = 1, e = 20; docs: Training, "The paper's settings"); other flags
override them. The episode split is the same with or without it: test = the dataset's standard
held-out 20 % of the episodes, val = 10 % from the rest (docs: Robot, "Splits").
``--extract-only`` stops after step 1. Under ``torchrun`` rank 0 extracts while the other ranks
wait for the store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from umilayers._io import atomic_write, atomic_write_text
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
from umilayers.datasets import robot
from umilayers.train import FitConfig, evaluate, fit, process_group


def build_parser(preset: Optional[dict] = None) -> argparse.ArgumentParser:
    """The parser; ``preset``: the options of ``--preset`` (:func:`umilayers.cli.preset_defaults`)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and extraction")
    data.add_argument("--data", required=True, help="folder of the dataset's .h5 episode files")
    data.add_argument("--store", default=None, help="FeatureStore to write or reuse (default RUN/store)")
    data.add_argument("--extract-only", action="store_true", help="stop after writing the store")
    data.add_argument("--skip-missing", action="store_true",
                      help="drop episodes lacking a needed key (and report how many)")
    data.add_argument("--z-dim", type=int, default=128, help="encoder width (Lee et al.: 128)")
    data.add_argument("--image-size", type=int, default=128, help="resize image/depth (default 128 = as stored)")
    data.add_argument("--force-window", type=int, default=32, help="force readings per step (default 32)")
    data.add_argument("--encoder-epochs", type=int, default=5, help="stage-1 epochs per encoder")
    data.add_argument("--encoder-lr", type=float, default=1e-3, help="learning rate of the stage-1 encoders")
    data.add_argument("--encoder-batch-size", type=int, default=64, help="batch size of the stage-1 encoders")
    data.add_argument("--val-fraction", type=float, default=robot.SPLIT_FRACTIONS["val"],
                      help="episodes held out for val, from the standard split's training 80 %% (the "
                           "standard split has no val; this library's choice, also under --preset paper)")
    data.add_argument("--test-fraction", type=float, default=robot.SPLIT_FRACTIONS["test"],
                      help="episodes held out for test: the dataset's standard held-out share (Lee et "
                           "al.'s and MultiBench's val_ratio 0.20, where they report; also --preset paper's)")
    data.add_argument("--encoder-device", default="cpu", help="device of the stage-1 encoders")
    add_fit_arguments(parser, defaults=preset)
    add_preset_argument(parser)
    return parser


def _wait_for(path: Path, timeout_s: float = 24 * 3600) -> None:
    start = time.time()
    while not path.is_file():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"{path} did not appear (rank 0 extraction failed?)")
        time.sleep(2.0)


def evaluate_subsets(run: Path, store: Path, device: str = "auto", rank: int = 0, log=print) -> dict:
    """MAE of the run's best model on the test split with each non-empty modality subset.

    Under torchrun every rank calls this (evaluation is collective); only rank 0 writes.
    """
    rows = []
    for subset in robot.subsets():
        result = evaluate(run, store, split="test", modalities=list(subset), device=device)
        rows.append({"modalities": list(subset), "mae": float(result["mae"])})
        if rank == 0:
            log(f"test MAE with {'+'.join(subset):28s} {rows[-1]['mae']:.4f}")
    summary = {"split": "test", "metric": "mae", "rows": rows}
    if rank != 0:
        return summary
    atomic_write_text(run / "subsets.json", json.dumps(summary, indent=2) + "\n")
    lines = ["| modalities | test MAE |", "|---|---|"]
    lines += [f"| {' + '.join(r['modalities'])} | {r['mae']:.4f} |" for r in rows]
    atomic_write_text(run / "subsets.md", "\n".join(lines) + "\n")
    _plot_subsets(rows, run / "subsets.png")
    return summary


def _plot_subsets(rows, path: Path) -> None:
    """The bar chart, when matplotlib (umilayers[train]) is installed: the numbers are in the .md."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    labels = ["+".join(r["modalities"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["mae"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("test MAE (lower is better)")
    ax.set_title("Robot state regression: test modalities (Zhang et al., Fig. 3)")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)


def _train(args, config: FitConfig, store: Path, run: Path, rank: int) -> None:
    metrics = fit(str(store), out=run, config=config, resume=args.resume, overwrite=args.overwrite)
    if rank == 0:
        print(json.dumps(metrics.get("test", metrics), indent=2))
    evaluate_subsets(run, store, device=config.runtime.device, rank=rank)
    if rank == 0:
        print(describe_run(run, metrics) + "\n  subsets.json, .md, .png  test MAE with each subset of the "
              "modalities", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser(preset_defaults(argv, "robot"))
    args, config = parse_fit_args(parser, argv)
    apply_thread_policy(args.threads, config.runtime.device)
    run = Path(args.out)
    store = Path(args.store) if args.store else run / "store"
    rank = int(os.environ.get("RANK", "0"))
    done_marker = store / "robot_extraction.json"
    try:
        if not done_marker.is_file():
            if rank == 0:
                robot.build_robot_store(
                    args.data, store, z_dim=args.z_dim, image_size=args.image_size,
                    force_window=args.force_window, epochs=args.encoder_epochs,
                    batch_size=args.encoder_batch_size, lr=args.encoder_lr, seed=config.train.seed,
                    val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                    skip_missing=args.skip_missing, device=args.encoder_device,
                )
            else:
                _wait_for(done_marker)
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
