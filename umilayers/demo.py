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

One line per finished run says how long it took, the time elapsed and an estimate of what
remains. Torch runs one thread on the CPU unless ``--threads`` says otherwise (the measurements
behind that: the docs page "Benchmarks", section "Threads"). ``--quick`` is a smoke test
(tiny data and model, a minute or two): its tables are labelled as such and go to their own
folder, ``./umilayers-demo-quick``. A finished demo in ``--out`` is never replaced without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from umilayers._io import atomic_write, atomic_write_json, read_json
from umilayers._progress import Heartbeat, format_duration
from umilayers._threads import add_threads_argument, apply_thread_policy, choose_threads
from umilayers.data.synthetic import make_synthetic_store
from umilayers.train import fit

__all__ = [
    "TASK_COLUMNS",
    "METHOD_ROWS",
    "ABLATION_ROWS",
    "DemoSize",
    "SMOKE_TEST",
    "default_out",
    "grid_plan",
    "headline_metric",
    "run_dir",
    "run_grid",
    "format_table",
    "build_parser",
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

    def fit_options(self) -> dict:
        """The options of :func:`~umilayers.train.fit` every run of this size shares (the rows add
        their method and ablation switches).

        Example::

            >>> DemoSize.default().fit_options()["epochs"]
            12
        """
        return {"epochs": self.epochs, "unimodal_epochs": self.unimodal_epochs,
                "pseudo_window": self.pseudo_window, **self.model}


#: The banner of ``--quick`` output: its numbers come from a tiny model trained for 3 epochs.
SMOKE_TEST = ("SMOKE TEST (--quick): tiny data, a tiny model, 3 epochs. These numbers only show that "
              "everything runs; they are not results (`umilayers demo` gives those).")


def default_out(quick: bool) -> Path:
    """Where the demo writes without ``--out``: the smoke test has its own folder."""
    return Path("umilayers-demo-quick" if quick else "umilayers-demo")


def grid_plan(tasks: Sequence[str], rows: Mapping[str, dict], seeds: Sequence[int]) -> list[str]:
    """The task of every run :func:`run_grid` makes, in its order."""
    return [task for task in tasks for _ in seeds for _ in rows]


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
    heartbeat: Optional[Heartbeat] = None,
) -> dict:
    """Train every row on every task and seed; returns ``{row: {task: [test metric per seed]}}``.

    Logs one line per run: its result, its time and the ``heartbeat`` (default: one over this
    grid's runs).
    """
    heartbeat = heartbeat or Heartbeat(grid_plan(tasks, rows, seeds))
    results: dict = {row: {task: [] for task in tasks} for row in rows}
    for task in tasks:
        for seed in seeds:
            store = root / f"store-{task}-seed{seed}"
            if not (store / "store.json").exists():
                make_synthetic_store(task, store, num_train=size.num_train, num_eval=size.num_eval, seed=seed)
            for row_number, (row, options) in enumerate(rows.items()):
                start = time.perf_counter()
                out = run_dir(root, task, row_number, options, seed)
                metrics = fit(store, out=out, seed=seed, overwrite=True, quiet=True, **size.fit_options(), **options)
                value = headline_metric(task, metrics["test"])
                results[row][task].append(value)
                seconds = time.perf_counter() - start
                log(f"  {task:<14} seed {seed}  {row:<41} {value:8.4f} {seconds:6.1f}s  "
                    f"{heartbeat.tick(task, seconds)}")
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


def _plot(results: Mapping, tasks: Sequence[str], path: Path, smoke_test: bool) -> Optional[Path]:
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
    title = "umilayers demo: synthetic unseen-modality benchmark (test split)"
    if smoke_test:
        title = "SMOKE TEST (--quick), not results: " + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
    return path


def _plain(rst: str) -> str:
    """``rst`` without its inline markup, for ``--help``: ``x`` -> x, :func:`~a.b` -> b."""
    text = re.sub(r":[a-z]+:`~([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1], rst)
    return re.sub(r":[a-z]+:`([^`]*)`", r"\1", text).replace("``", "")


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this system
        return None


def _finished(path: Path) -> str:
    """What the ``demo.json`` at ``path`` holds, in a few words."""
    try:
        record = read_json(path)
        return f"{record['size']} size, {len(record['seeds'])} seed(s), {record['seconds']:.0f} s"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


def _say(text: str = "") -> None:
    """Print a line now, also into a pipe or a log file (the heartbeat is no use buffered)."""
    print(text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``umilayers demo`` options."""
    parser = argparse.ArgumentParser(prog="umilayers demo", description=_plain(__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny sizes, a minute or two; its numbers are not results")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds, mean ± std over them (default: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for demo.json and demo.png (default: ./{default_out(False)}; "
                             f"with --quick ./{default_out(True)})")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    parser.add_argument("--no-ablation", action="store_true", help="skip the Tables 2-3 ablation grid")
    add_threads_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds: expected an int >= 1, got {args.seeds}")
    size = DemoSize.quick() if args.quick else DemoSize.default()
    out = args.out or default_out(args.quick)
    record_path = out / "demo.json"
    if record_path.exists() and not args.overwrite:
        print(f"umilayers demo: error: {record_path}: a finished demo is there ({_finished(record_path)}); "
              f"pass --overwrite to replace it, or --out DIR", file=sys.stderr)
        return 2
    threads = apply_thread_policy(args.threads, "auto")
    why = choose_threads(args.threads, "auto")[1]
    seeds = list(range(args.seeds))
    tasks = list(TASK_COLUMNS)
    plan = grid_plan(tasks, METHOD_ROWS, seeds)
    if not args.no_ablation:
        plan += grid_plan(["classification"], ABLATION_ROWS, seeds)
    heartbeat = Heartbeat(plan)
    load_start, cpu_start, start = _load_average(), time.process_time(), time.perf_counter()
    if args.quick:
        _say(SMOKE_TEST)
    _say(f"{len(plan)} runs, torch threads: {threads} ({why}); one line per run, "
          f"the estimate of what remains from the first on")
    with tempfile.TemporaryDirectory(prefix="umilayers-demo-") as tmp:
        root = Path(tmp)
        _say(f"Table 4 layout: {len(METHOD_ROWS)} methods x {len(tasks)} tasks x {len(seeds)} seed(s)")
        main_results = run_grid(root, tasks, METHOD_ROWS, seeds, size, log=_say, heartbeat=heartbeat)
        ablation_results = None
        if not args.no_ablation:
            _say("Tables 2-3 layout: ablations on the classification task")
            ablation_results = run_grid(root / "ablation", ["classification"], ABLATION_ROWS, seeds, size,
                                        log=_say, heartbeat=heartbeat)
    _say()
    if args.quick:
        _say(SMOKE_TEST + "\n")
    _say(format_table(main_results, tasks, "method (Table 4 layout)"))
    if ablation_results is not None:
        _say()
        _say(format_table(ablation_results, ["classification"], "ablation (Tables 2-3 layout)"))
    elapsed = time.perf_counter() - start
    record = {"size": "quick" if args.quick else "default", "smoke_test": args.quick, "seeds": seeds,
              "seconds": round(elapsed, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
              "threads": threads, "threads_reason": why,
              "load_average": {"start": load_start, "end": _load_average()},
              "table4": main_results, "ablation": ablation_results, "cpu_count": os.cpu_count()}
    if args.quick:
        record["note"] = SMOKE_TEST
    atomic_write_json(record_path, record)
    png = _plot(main_results, tasks, out / "demo.png", args.quick)
    _say(f"\nwrote {record_path}" + (f" and {png}" if png else "") + f" in {format_duration(elapsed)} "
          f"({time.process_time() - cpu_start:.0f} s of CPU time, {threads} thread(s))")
    if args.quick:
        _say("(a smoke test: its numbers are not results)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
