"""Val-only comparisons of the recipe's switchable choices, where a default must be earned.

Three comparisons on the embedded synthetic tasks (:mod:`umilayers.data.synthetic`), method
``umi``, the demo's training setting (:meth:`umilayers.demo.DemoSize.default`) unless a row
changes it, seeds 0-2 by default. Only the **val** split is read (the metric of the best epoch,
which is how :func:`umilayers.train.fit` selects its model): these numbers choose defaults, so
the test split stays unseen.

- ``--compare retrieval-pseudo``: ``retrieval_pseudo="relational"`` (distillation of the
  unimodal teachers' caption similarities) against ``"paper"`` (the closest modality's averaged
  video embedding, triplet loss; Sec. 3.3), retrieval val mean rank.
- ``--compare reductions``: the scale of the loss terms of Eq. 3 at the default weights
  (``lambda = 1e-3``, ``alpha = 1``). ``pseudo_reduction`` {batchmean, elementwise_mean} on
  classification (the KL term is the only one it changes; ``elementwise_mean``, the released
  code's, is ``batchmean`` divided by the number of classes) and ``align_reduction``
  {elementwise_mean (the released code's), modality_sum (Eq. 1 as written), modality_mean} on
  the three tasks; val metric per seed.
- ``--compare optimizer``: ``optimizer`` {adamw, sgd} x ``schedule`` {cosine, step}, each
  combination with the same budget: three learning rates (a factor of 3 apart around the usual
  value of the optimiser: AdamW 6.7e-4, 2e-3, 6e-3; SGD 1e-2, 3e-2, 1e-1), every seed, every
  task; each optimiser with its own usual weight decay (AdamW 0.01, the library's; SGD 5e-4
  and momentum 0.9, the released code's). ``step`` drops the learning rate ten-fold at 58% of
  each stage (epoch 7 of 12; the paper's EPIC schedule drops at epoch 70 of 120); it runs with
  the same drop epoch in stage 1 (8 epochs). For each combination and task the learning rate
  with the best mean val metric over the seeds is reported with its per-seed values.

Writes ``results/choices.json`` (every comparison; a run of one keeps the others' entries).

Usage::

    python benchmarks/choices.py                          # all three, 3 seeds (about 2 h, 1 core)
    python benchmarks/choices.py --compare retrieval-pseudo
    python benchmarks/choices.py --quick                  # CI smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from umilayers.data.synthetic import make_synthetic_store
from umilayers.demo import TASK_COLUMNS, DemoSize, headline_metric
from umilayers.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import ROOT, describe_machine, machine_info, table, write_json  # noqa: E402

COMPARISONS = ("retrieval-pseudo", "reductions", "optimizer")
PSEUDO_REDUCTIONS = ("batchmean", "elementwise_mean")
ALIGN_REDUCTIONS = ("elementwise_mean", "modality_sum", "modality_mean")
LEARNING_RATES = {"adamw": (6.7e-4, 2e-3, 6e-3), "sgd": (1e-2, 3e-2, 1e-1)}
OPTIMIZER_OPTIONS = {"adamw": {"optimizer": "adamw", "weight_decay": 0.01},
                     "sgd": {"optimizer": "sgd", "weight_decay": 5e-4, "momentum": 0.9}}
TASKS = ("classification", "regression", "retrieval")


def quick_size() -> DemoSize:
    """CI smoke size: seconds per run."""
    return DemoSize(num_train=64, num_eval=32, epochs=2, unimodal_epochs=2, pseudo_window=1,
                    model=dict(dim=8, num_tokens=2, projection_depth=1, fusion_depth=1, heads=2, batch_size=32,
                               lr=3e-3, predictor="transformer"))


def lower_is_better(task: str) -> bool:
    return task != "classification"


def val_metric(root: Path, task: str, seed: int, size: DemoSize, run: str, log=print, **options: Any) -> float:
    """Train ``umi`` on the task's synthetic store of ``seed``; return the best epoch's val metric."""
    store = root / f"store-{task}-seed{seed}"
    if not (store / "store.json").exists():
        make_synthetic_store(task, store, num_train=size.num_train, num_eval=size.num_eval, seed=seed)
    start = time.perf_counter()
    settings = {**size.model, **options}
    metrics = fit(store, "umi", root / "runs" / task / f"{run}-seed{seed}", seed=seed, epochs=size.epochs,
                  unimodal_epochs=size.unimodal_epochs, pseudo_window=size.pseudo_window, overwrite=True,
                  quiet=True, device="cpu", **settings)
    value = headline_metric(task, metrics["val"])
    log(f"  {task:<14} {run:<32} seed {seed}  val {value:8.4f}  ({time.perf_counter() - start:.1f}s)")
    return value


def compare_retrieval_pseudo(root: Path, seeds: Sequence[int], size: DemoSize, log=print) -> dict:
    """``{choice: [val mean rank per seed]}``."""
    return {choice: [val_metric(root, "retrieval", seed, size, f"pseudo-{choice}", log, retrieval_pseudo=choice)
                     for seed in seeds]
            for choice in ("relational", "paper")}


def compare_reductions(root: Path, seeds: Sequence[int], size: DemoSize, tasks: Sequence[str], log=print) -> dict:
    """``{"pseudo_reduction": {choice: {"classification": [...]}}, "align_reduction": {choice: {task: [...]}}}``."""
    pseudo = {choice: {"classification": [val_metric(root, "classification", seed, size, f"pseudo-{choice}", log,
                                                     pseudo_reduction=choice) for seed in seeds]}
              for choice in PSEUDO_REDUCTIONS}
    align = {choice: {task: [val_metric(root, task, seed, size, f"align-{choice}", log, align_reduction=choice)
                             for seed in seeds] for task in tasks}
             for choice in ALIGN_REDUCTIONS}
    return {"pseudo_reduction": pseudo, "align_reduction": align}


def drop_epoch(epochs: int) -> int:
    """The step schedule's drop epoch: 58% of the stage (the paper's 70 of 120)."""
    return max(1, round(epochs * 70 / 120))


def compare_optimizers(root: Path, seeds: Sequence[int], size: DemoSize, tasks: Sequence[str], log=print,
                       learning_rates: Mapping[str, Sequence[float]] = LEARNING_RATES) -> dict:
    """``{"adamw+cosine": {task: {"lr": best, "val": [per seed], "grid": {lr: mean}}}, ...}``."""
    out: dict = {}
    for optimizer, lrs in learning_rates.items():
        for schedule in ("cosine", "step"):
            name = f"{optimizer}+{schedule}"
            extra = {"schedule": schedule}
            if schedule == "step":
                extra["lr_drop_epochs"] = str(drop_epoch(size.epochs))
            out[name] = {}
            for task in tasks:
                grid = {lr: [val_metric(root, task, seed, size, f"{name}-lr{lr:g}", log, lr=lr,
                                        **OPTIMIZER_OPTIONS[optimizer], **extra) for seed in seeds]
                        for lr in lrs}
                pick = min if lower_is_better(task) else max
                best = pick(grid, key=lambda lr: statistics.fmean(grid[lr]))
                out[name][task] = {"lr": best, "val": grid[best],
                                   "grid": {f"{lr:g}": statistics.fmean(v) for lr, v in grid.items()}}
    return out


def _cell(values: Sequence[float], scale: float = 1.0) -> str:
    mean = statistics.fmean(values) * scale
    spread = f" ± {statistics.stdev(values) * scale:.3f}" if len(values) > 1 else ""
    return f"{mean:.3f}{spread}"


def report(results: Mapping[str, Any]) -> str:
    lines = []
    if "retrieval-pseudo" in results:
        rows = [("retrieval_pseudo", "val MnR (down), mean ± std", "per seed")]
        for choice, values in results["retrieval-pseudo"].items():
            rows.append((choice, _cell(values), " / ".join(f"{v:.2f}" for v in values)))
        lines += ["retrieval pseudo-labels (umi, val)", table(rows), ""]
    if "reductions" in results:
        for option, by_choice in results["reductions"].items():
            tasks = list(next(iter(by_choice.values())))
            rows = [tuple([option] + [f"{t} val {TASK_COLUMNS[t][1]}" for t in tasks])]
            for choice, by_task in by_choice.items():
                rows.append((choice, *[_cell(by_task[t], 100.0 if t == "classification" else 1.0) for t in tasks]))
            lines += [f"{option} (umi, val; classification top-1 in %)", table(rows), ""]
    if "optimizer" in results:
        tasks = list(next(iter(results["optimizer"].values())))
        header = ["optimizer+schedule"] + [f"{t} val {TASK_COLUMNS[t][1]} (best lr)" for t in tasks]
        rows = [tuple(header)]
        for name, by_task in results["optimizer"].items():
            scale = {t: 100.0 if t == "classification" else 1.0 for t in tasks}
            rows.append((name, *[f"{_cell(by_task[t]['val'], scale[t])} (lr {by_task[t]['lr']:g})" for t in tasks]))
        lines += ["optimizer and schedule (umi, val; classification top-1 in %)", table(rows)]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=COMPARISONS, action="append", default=None,
                        help="which comparison (repeatable; default: both)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--tasks", default=",".join(TASKS), help="tasks of the reductions and optimizer comparisons")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke size: one seed, classification only, the middle learning rate")
    parser.add_argument("--out", default=str(ROOT / "results"), help="folder of choices.json")
    parser.add_argument("--keep", default=None, help="keep the stores and runs in this folder")
    _common.add_threads_option(parser)
    args = parser.parse_args(argv)
    _common.set_threads(args.threads)
    compare = args.compare or list(COMPARISONS)
    size = quick_size() if args.quick else DemoSize.default()
    seeds = list(range(1 if args.quick else args.seeds))
    tasks = ["classification"] if args.quick else [t for t in args.tasks.split(",") if t]
    learning_rates = {k: v[1:2] for k, v in LEARNING_RATES.items()} if args.quick else LEARNING_RATES
    out_file = Path(args.out) / "choices.json"
    previous = json.loads(out_file.read_text()) if out_file.is_file() else {}
    results: dict = dict(previous.get("results", {}))
    runs: dict = dict(previous.get("runs", {}))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep) if args.keep else Path(scratch)
        for name in compare:
            start = time.perf_counter()
            if name == "retrieval-pseudo":
                results[name] = compare_retrieval_pseudo(root, seeds, size)
            elif name == "reductions":
                results[name] = compare_reductions(root, seeds, size, tasks)
            else:
                results[name] = compare_optimizers(root, seeds, size, tasks, learning_rates=learning_rates)
            runs[name] = {"command": " ".join(["python benchmarks/choices.py", *(argv or sys.argv[1:])]),
                          "seeds": seeds, "size": size.__dict__, "machine": machine_info(),
                          "wall_s": round(time.perf_counter() - start, 1)}
    print(report({k: v for k, v in results.items() if k in compare}))
    for name in compare:
        print(f"{name}: {describe_machine(runs[name]['machine'])}; {runs[name]['wall_s']} s")
    write_json(out_file, {"results": results, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
