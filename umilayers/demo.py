"""``umilayers demo``: the paper's comparison on the embedded synthetic benchmark, no data needed.

Generates the three synthetic FeatureStores (classification with two unimodal training splits,
regression with four modalities split 2 + 2, retrieval with seven modalities split 4 + 4) in a
temporary folder, trains umi, late fusion, vanilla and pooled on each with :func:`umilayers.train.fit`,
and prints

- a table in the layout of the paper's Table 4 (methods x tasks: top-1 up, MAE down, MnR down),
- an ablation table in the layout of Tables 2-3 on the classification task (feature projection
  versus pooled; with and without the alignment loss and the pseudo-label branch),

then saves both as ``demo.json`` and a PNG bar chart (``demo.png``) in ``--out``.

Every method and ablation is trained with one shared setting: :meth:`DemoSize.default` sets
the data, model size and training length; everything else (learning rate, warm-up, the
transformer unimodal predictor of stage 1 and the late-fusion members) is
:class:`~umilayers.train.FitConfig`'s defaults, which were chosen on val splits only.
Results and what they show: ``docs/accuracy.rst``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from umilayers._io import atomic_write, atomic_write_json
from umilayers.data.synthetic import make_synthetic_store
from umilayers.train import fit

__all__ = [
    "TASK_COLUMNS",
    "METHOD_ROWS",
    "ABLATION_ROWS",
    "DemoSize",
    "headline_metric",
    "run_dir",
    "run_grid",
    "format_table",
    "main",
]

#: task -> (column title in the Table-4 layout, metric key, higher is better)
TASK_COLUMNS: dict[str, tuple[str, str, bool]] = {
    "classification": ("video cls. top-1 (up)", "top1", True),
    "regression": ("robot MAE (down)", "mae", False),
    "retrieval": ("retrieval MnR (down)", "mean_rank", False),
}

#: Table-4 rows: method label -> fit options
METHOD_ROWS: dict[str, dict] = {
    "late fusion": {"method": "late-fusion"},
    "vanilla transformer": {"method": "vanilla"},
    "pooled projection": {"method": "pooled"},
    "ours (umi)": {"method": "umi"},
}

#: Tables 2-3 rows (on the classification task): label -> fit options
ABLATION_ROWS: dict[str, dict] = {
    "pooled projection, no L_align, no pseudo": {"method": "pooled", "use_alignment": False, "use_pseudo": False},
    "feature projection, no L_align, no pseudo": {"method": "umi", "use_alignment": False, "use_pseudo": False},
    "feature projection + L_align": {"method": "umi", "use_pseudo": False},
    "feature projection + pseudo": {"method": "umi", "use_alignment": False},
    "feature projection + L_align + pseudo": {"method": "umi"},
    "... one branch": {"method": "umi", "branches": 1},
}


@dataclass(frozen=True)
class DemoSize:
    """Sizes of one demo run (data and model); ``quick`` is the CI smoke size.

    Example::

        >>> DemoSize.quick().epochs < DemoSize.default().epochs
        True
    """

    num_train: int
    num_eval: int
    epochs: int
    unimodal_epochs: int
    pseudo_window: int
    model: dict = field(default_factory=dict)

    @classmethod
    def default(cls) -> "DemoSize":
        return cls(num_train=1200, num_eval=400, epochs=12, unimodal_epochs=8, pseudo_window=4,
                   model=dict(dim=32, num_tokens=8, projection_depth=1, fusion_depth=1, heads=4,
                              batch_size=64))

    @classmethod
    def quick(cls) -> "DemoSize":
        return cls(num_train=320, num_eval=128, epochs=3, unimodal_epochs=3, pseudo_window=2,
                   model=dict(dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2,
                              batch_size=64))


def headline_metric(task: str, metrics: Mapping) -> float:
    """The one number reported for a task from a ``metrics.json`` split dict."""
    return float(metrics[TASK_COLUMNS[task][1]])


def run_dir(root: Path, task: str, row_number: int, options: Mapping, seed: int) -> Path:
    """The run directory :func:`run_grid` uses for one row, task and seed."""
    return Path(root) / "runs" / task / f"{row_number:02d}-{options['method']}-seed{seed}"


def run_grid(
    root: Path,
    tasks: Sequence[str],
    rows: Mapping[str, dict],
    seeds: Sequence[int],
    size: DemoSize,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every row on every task and seed; returns ``{row: {task: [test metric per seed]}}``."""
    results: dict = {row: {task: [] for task in tasks} for row in rows}
    for task in tasks:
        for seed in seeds:
            store = root / f"store-{task}-seed{seed}"
            if not (store / "store.json").exists():
                make_synthetic_store(task, store, num_train=size.num_train, num_eval=size.num_eval, seed=seed)
            for row_number, (row, options) in enumerate(rows.items()):
                start = time.perf_counter()
                out = run_dir(root, task, row_number, options, seed)
                metrics = fit(
                    store, out=out, seed=seed, epochs=size.epochs, unimodal_epochs=size.unimodal_epochs,
                    pseudo_window=size.pseudo_window, overwrite=True, quiet=True,
                    **size.model, **options,
                )
                value = headline_metric(task, metrics["test"])
                results[row][task].append(value)
                log(f"  {task:<14} seed {seed}  {row:<45} {value:8.4f}  ({time.perf_counter() - start:.1f}s)")
    return results


def _cell(values: Sequence[float], task: str) -> str:
    scale = 100.0 if TASK_COLUMNS[task][1] == "top1" else 1.0
    digits = 3 if TASK_COLUMNS[task][1] == "mae" else 2  # MAE differences live in the third decimal
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def format_table(results: Mapping, tasks: Sequence[str], title: str) -> str:
    """A plain-text table: one row per method, one column per task, mean ± std over seeds."""
    header = [title] + [TASK_COLUMNS[t][0] for t in tasks]
    body = [[row] + [_cell(results[row][t], t) for t in tasks] for row in results]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body])


def _plot(results: Mapping, tasks: Sequence[str], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = list(results)
        scale = 100.0 if TASK_COLUMNS[task][1] == "top1" else 1.0
        means = [statistics.fmean(results[r][task]) * scale for r in rows]
        errs = [statistics.stdev(results[r][task]) * scale if len(results[r][task]) > 1 else 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, color=["#999999"] * (len(rows) - 1) + ["#d62728"])
        ax.set_xticks(range(len(rows)), [r.replace(" ", "\n", 1) for r in rows], fontsize=7)
        ax.set_title(TASK_COLUMNS[task][0], fontsize=9)
    fig.suptitle("umilayers demo: synthetic unseen-modality benchmark (test split)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="umilayers demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke test, < 2 minutes)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (mean ± std over them)")
    parser.add_argument("--out", type=Path, default=None, help="folder for demo.json/demo.png (default: ./umilayers-demo)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the Tables 2-3 ablation grid")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds: expected a positive int, got {args.seeds}")
    size = DemoSize.quick() if args.quick else DemoSize.default()
    out = args.out or Path("umilayers-demo")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="umilayers-demo-") as tmp:
        root = Path(tmp)
        print(f"Table 4 layout: {len(METHOD_ROWS)} methods x {len(TASK_COLUMNS)} tasks x {len(seeds)} seed(s)")
        main_results = run_grid(root, list(TASK_COLUMNS), METHOD_ROWS, seeds, size)
        ablation_results = None
        if not args.no_ablation:
            print("Tables 2-3 layout: ablations on the classification task")
            ablation_results = run_grid(root / "ablation", ["classification"], ABLATION_ROWS, seeds, size)
    print()
    print(format_table(main_results, list(TASK_COLUMNS), "method (Table 4 layout)"))
    if ablation_results is not None:
        print()
        print(format_table(ablation_results, ["classification"], "ablation (Tables 2-3 layout)"))
    elapsed = time.perf_counter() - start
    record = {"size": "quick" if args.quick else "default", "seeds": seeds, "seconds": round(elapsed, 1),
              "table4": main_results, "ablation": ablation_results, "cpu_count": os.cpu_count()}
    atomic_write_json(out / "demo.json", record)
    png = _plot(main_results, list(TASK_COLUMNS), out / "demo.png")
    print(f"\nwrote {out / 'demo.json'}" + (f" and {png}" if png else "") + f" in {elapsed:.0f}s")
    return 0
