"""Real data: umi against its baselines on Fashion-MNIST, images nobody here designed.

Two tasks built from Fashion-MNIST (``benchmarks/_real_data.py``; Debian package
``dataset-fashion-mnist``, nothing downloads), trained through :func:`umilayers.train.fit`
and scored with :func:`umilayers.train.evaluate`:

- **halves**: the left and right halves of an image as two modalities (a token is one pixel
  column); one training split has left halves only, the other right halves only; val and test
  have both (and are also scored with each half alone).
- **quadrants**: the four quadrants as four modalities, trained two + two along the diagonals
  (``tl + br`` / ``tr + bl``, the robot task's shape); val and test have all four (and are
  also scored with each quadrant alone and with each training pair).

No regression variant: Fashion-MNIST's only annotation is the class; any regression target
(ink, centre of mass, ...) would be a function of the pixels chosen here, which is what this
benchmark exists to avoid.

Methods (rows): umi, late fusion (transformer members), the vanilla transformer, late fusion
with per-modality MLP members (the plain baseline), and a ceiling trained on *whole* images
(28 column tokens, a transformer): what a model that sees both halves together in training
reaches. umi's own runs are also scored with ``subset_ensemble`` (an evaluation-only option, not
the paper; chosen on its own val score like any row).

Protocol. Every method runs at one model size (:data:`MODEL`: ``dim=64, num_tokens=16``, two
layers in every transformer, 4 heads) and training length (:data:`EPOCHS`), and

- **default**: :class:`umilayers.train.FitConfig`'s defaults for everything else (learning
  rate and its batch-size rule, warm-up, schedule, unimodal predictor), seeds 0, 1, 2;
- **tuned**: the same search for every method, :data:`SEARCH` (the learning rate at half, one
  and two times the default: 3 settings, seed 0), the setting with the best **val** top-1 kept (test
  is never looked at to choose), then seeds 0, 1, 2 of it.

Data (:meth:`Size.full`): :data:`FULL_DATA` images per training split, val (disjoint, from the
training set), and the first test images of the official test set. The sizes fit the project's
one-core budget for this benchmark (about an hour on a loaded 2-core machine).

Reported: test top-1, mean ± sample std over the seeds; test top-1 per test-time modality
subset; wall time per run (the machine and its load average are recorded).

Usage::

    python benchmarks/real.py                   # full (see docs/accuracy.rst for the time)
    python benchmarks/real.py --quick           # CI smoke test (< 60 s)
    python benchmarks/real.py --keep runs/real  # keep runs; a rerun resumes finished ones

When the data is missing the script prints how to install it and exits with status 77
(:data:`_real_data.SKIP_STATUS`), which CI treats as a skip.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import _real_data as data
from _common import add_threads_option, machine_info, pyplot, run_root, save_figure, set_threads, write_json

#: Model size shared by every method (the learning setting comes from FitConfig or the search).
MODEL = dict(dim=64, num_tokens=16, projection_depth=2, fusion_depth=2, heads=4)
#: Training length shared by every method (a benchmark size, like MODEL; FitConfig's is 30 / 20 / 10).
EPOCHS = dict(epochs=10, unimodal_epochs=6, pseudo_window=3)
#: Images per training split, val images, test images of the full size.
FULL_DATA = dict(num_train=2000, num_val=1000, num_test=2000)
#: The search (seed 0, chosen on val): multipliers of FitConfig's default learning rate.
SEARCH = {"lr": (0.5, 1.0, 2.0)}
#: Test-time modality subsets scored per task (beyond all modalities together).
SUBSETS = {
    "halves": [("left",), ("right",)],
    "quadrants": [("bl",), ("br",), ("tl",), ("tr",), ("br", "tl"), ("bl", "tr")],
}
TASKS = ("halves", "quadrants")


@dataclass(frozen=True)
class Row:
    """One method: ``fit`` options and the store it trains on."""

    options: Mapping[str, Any]
    store: str = "task"  # "task" = the task's store, "whole" = whole images (ceiling)


ROWS: dict[str, Row] = {
    "ours (umi)": Row({"method": "umi"}),
    "late fusion": Row({"method": "late-fusion"}),
    "vanilla transformer": Row({"method": "vanilla"}),
    "late fusion, MLP members (plain)": Row({"method": "late-fusion", "predictor": "mlp"}),
    "whole image, transformer (ceiling)": Row({"method": "unimodal", "modality": "image"}, "whole"),
}


#: umi's own runs evaluated with --subset-ensemble (not the paper; evaluation only).
ENSEMBLE_ROW = "ours (umi) + --subset-ensemble at test"


@dataclass(frozen=True)
class Size:
    num_train: int
    num_val: int
    num_test: int
    seeds: tuple[int, ...]
    model: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)  # fit options that override FitConfig (training length)
    search: bool = True

    @classmethod
    def full(cls) -> "Size":
        return cls(**FULL_DATA, seeds=(0, 1, 2), model=dict(MODEL), fixed=dict(EPOCHS))

    @classmethod
    def quick(cls) -> "Size":
        return cls(num_train=200, num_val=100, num_test=200, seeds=(0,),
                   model=dict(dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2),
                   fixed=dict(epochs=1, unimodal_epochs=1, pseudo_window=1), search=False)


# ----------------------------------------------------------------------------- runs


def say(text: str) -> None:
    """Print a progress line at once (the benchmark runs for hours, often into a file)."""
    print(text, flush=True)


def _tag(options: Mapping[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"


def run_one(store: Path, root: Path, label: str, row: Row, options: Mapping[str, Any], seed: int,
            size: Size, subsets: Sequence[tuple[str, ...]] = (), log=say) -> dict:
    """Fit one row at one setting and seed (resuming a finished run in ``root``); score subsets."""
    from umilayers.train import evaluate, fit

    name = f"{row.options['method']}-{_tag({**row.options, **options})}-seed{seed}".replace("/", "_")
    out = root / name
    timing = out / "timing.json"
    start = time.perf_counter()
    metrics = fit(store, out=out, seed=seed, resume=True, quiet=True, device="cpu", **size.model, **size.fixed,
                  **row.options, **options)
    if timing.is_file():
        seconds = json.loads(timing.read_text())["seconds"]
    else:
        seconds = round(time.perf_counter() - start, 1)
        write_json(timing, {"seconds": seconds, "load_average_1min": round(os.getloadavg()[0], 2)})
    result = {"val": metrics["val"]["top1"], "test": metrics["test"]["top1"], "best_epoch": metrics["best_epoch"],
              "seconds": seconds, "subsets": {}}
    for subset in subsets:
        result["subsets"]["+".join(subset)] = evaluate(out, split="test", modalities=list(subset), device="cpu")["top1"]
    if row.options["method"] == "umi":
        result["subset_ensemble"] = subset_ensemble_scores(out, store)
    log(f"    {label:<36} {_tag(options):<14} seed {seed}  val {result['val']:.4f}  test {result['test']:.4f}"
        f"  ({seconds:.0f}s)")
    return result


def subset_ensemble_scores(run: Path, store: Path) -> dict:
    """Val and test top-1 of a finished umi run evaluated with ``--subset-ensemble`` (an
    evaluation-only option: the same trained model, predictions averaged with those from the
    training splits' modality sets). A copy of the run's ``model.pt`` with the option set goes
    to ``run/subset-ensemble/``, scored by the public :func:`~umilayers.train.evaluate`."""
    import shutil

    import torch

    from umilayers.data import FeatureStore
    from umilayers.train import evaluate

    target = run / "subset-ensemble"
    if not (target / "model.pt").is_file():
        target.mkdir(exist_ok=True)
        fs = FeatureStore(store)
        seen = sorted({fs.splits[s].modalities for s in fs.splits_with_role("train")})
        checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
        checkpoint["spec"]["config"]["ensemble_subsets"] = [list(m) for m in seen]
        shutil.copy(run / "config.json", target / "config.json")
        from umilayers._io import atomic_torch_save

        atomic_torch_save(target / "model.pt", checkpoint)
    return {split: evaluate(target, split=split, device="cpu")["top1"] for split in ("val", "test")}


def candidates(size: Size, row: Row) -> list[dict]:
    """The search's settings for ``row`` (the same for every row): ``{}`` (FitConfig's defaults)
    first."""
    from umilayers.train import TrainConfig

    if not size.search:
        return [{}]
    base = TrainConfig(**{k: v for k, v in size.fixed.items() if k in ("batch_size",)})
    out = []
    for combo in itertools.product(*SEARCH.values()):
        options = {}
        for name, value in zip(SEARCH, combo):
            if name == "lr" and value != 1.0:
                options["lr"] = round(base.peak_lr() * value, 10)
            elif name != "lr":
                options[name] = value
        out.append(options)
    return sorted(out, key=lambda o: len(o))  # the defaults first


def run_row(stores: Mapping[str, Path], task: str, root: Path, label: str, row: Row, size: Size, log=say) -> dict:
    """Default (3 seeds), search (seed 0, val), tuned (3 seeds) of one row on one task."""
    store = stores[task] if row.store == "task" else stores["whole"]
    subsets = SUBSETS[task] if row.store == "task" else []
    runs = root / ("whole" if row.store == "whole" else task)
    search = {}
    for options in candidates(size, row):
        search[_tag(options)] = {"options": options,
                                 **run_one(store, runs, label, row, options, size.seeds[0], size, subsets, log)}
    best = max(search.values(), key=lambda r: r["val"])  # ties: the first (the default)
    out: dict = {"search": search, "chosen": best["options"]}
    for kind, options in (("default", {}), ("tuned", best["options"])):
        per_seed = [search[_tag(options)] if seed == size.seeds[0] else
                    run_one(store, runs, label, row, options, seed, size, subsets, log) for seed in size.seeds]
        out[kind] = {"test": [r["test"] for r in per_seed], "val": [r["val"] for r in per_seed],
                     "seconds": [r["seconds"] for r in per_seed], "best_epoch": [r["best_epoch"] for r in per_seed],
                     "subsets": {s: [r["subsets"][s] for r in per_seed] for s in per_seed[0]["subsets"]}}
    if "subset_ensemble" in best:
        out["subset_ensemble"] = ensemble_row(store, runs, label, row, search, size, log)
    return out


def ensemble_row(store: Path, runs: Path, label: str, row: Row, search: Mapping, size: Size, log=say) -> dict:
    """umi's runs scored with ``--subset-ensemble``, chosen on *its* val score like any row."""
    best = max(search.values(), key=lambda r: r["subset_ensemble"]["val"])
    out: dict = {"search": {k: {"options": r["options"], **r["subset_ensemble"]} for k, r in search.items()},
                 "chosen": best["options"]}
    for kind, options in (("default", {}), ("tuned", best["options"])):
        per_seed = [search[_tag(options)] if seed == size.seeds[0] else
                    run_one(store, runs, label, row, options, seed, size, (), log) for seed in size.seeds]
        out[kind] = {"test": [r["subset_ensemble"]["test"] for r in per_seed],
                     "val": [r["subset_ensemble"]["val"] for r in per_seed],
                     "seconds": [r["seconds"] for r in per_seed], "best_epoch": [r["best_epoch"] for r in per_seed],
                     "subsets": {}}
    return out


# ----------------------------------------------------------------------------- tables and plot


def cell(values: Sequence[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


def render(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body])


def main_table(results: Mapping, task: str) -> str:
    rows = results[task]
    body = []
    for label, r in rows.items():
        chosen = _tag(r["chosen"])
        seconds = statistics.fmean(r["default"]["seconds"])
        body.append([label, cell(r["default"]["test"]), cell(r["tuned"]["test"]), chosen, f"{seconds:.0f}"])
    return render([f"{task}: method (test top-1 %)", "default settings", "tuned (val)", "chosen", "s / run"], body)


def subset_table(results: Mapping, task: str, kind: str) -> str:
    rows = {label: r for label, r in results[task].items() if r[kind]["subsets"]}
    subsets = list(next(iter(rows.values()))[kind]["subsets"])
    header = [f"{task}, {kind}: test modalities"] + list(rows)
    body = [[s.replace("+", " + ")] + [cell(rows[label][kind]["subsets"][s]) for label in rows] for s in subsets]
    body.append(["all (as trained for)"] + [cell(rows[label][kind]["test"]) for label in rows])
    return render(header, body)


def plot(results: Mapping, path: Path) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
        return None
    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        labels = list(results[task])
        for offset, kind, color in ((-0.2, "default", "#999999"), (0.2, "tuned", "#d62728")):
            values = [results[task][label][kind]["test"] for label in labels]
            means = [statistics.fmean(v) * 100 for v in values]
            errs = [statistics.stdev(v) * 100 if len(v) > 1 else 0.0 for v in values]
            ax.bar([i + offset for i in range(len(labels))], means, 0.4, yerr=errs, color=color, label=kind)
        ax.set_xticks(range(len(labels)), [lab.replace(", ", ",\n").replace(" (", "\n(") for lab in labels],
                      fontsize=6)
        low = min(statistics.fmean(results[task][lab][k]["test"]) for lab in labels for k in ("default", "tuned"))
        ax.set_ylim(max(0.0, low * 100 - 5), 100)
        ax.set_title(f"Fashion-MNIST {task}: test top-1 % (mean ± std over seeds)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, no search (CI smoke test)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for real.json / real.png")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "umilayers-real-stores",
                        help="folder for the built FeatureStores (reused)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here (a rerun resumes them)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--data", type=Path, default=data.DATA_DIR, help="folder of the Fashion-MNIST IDX files")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        parser.error(f"--tasks: expected a non-empty subset of {list(TASKS)}, got {args.tasks!r}")
    missing = data.missing_files(args.data)
    if missing:
        print(f"real.py: Fashion-MNIST not found ({missing[0]} is missing); install it with:\n"
              f"    {data.INSTALL_HINT}\nskipping (exit status {data.SKIP_STATUS})", file=sys.stderr)
        return data.SKIP_STATUS
    threads = set_threads(args.threads)
    size = Size.quick() if args.quick else Size.full()
    start = time.perf_counter()
    stores = data.build_all(args.cache, size.num_train, size.num_val, size.num_test,
                            stores=tuple(tasks) + ("whole",), data_dir=args.data)
    results: dict = {}
    with run_root(args.keep, "umilayers-real-") as root:
        for task in tasks:
            print(f"{task}: {len(ROWS)} methods, search {len(candidates(size, ROWS['ours (umi)']))} setting(s), "
                  f"seeds {list(size.seeds)}",
                  flush=True)
            results[task] = {}
            for label, row in ROWS.items():
                result = run_row(stores, task, root, label, row, size)
                ensemble = result.pop("subset_ensemble", None)
                results[task][label] = result
                if ensemble is not None:
                    results[task][ENSEMBLE_ROW] = ensemble
    elapsed = time.perf_counter() - start
    tables = {}
    for task in tasks:
        tables[task] = main_table(results, task)
        for kind in ("default", "tuned"):
            tables[f"{task}_subsets_{kind}"] = subset_table(results, task, kind)
    for text in tables.values():
        print()
        print(text)
    from umilayers.train import FitConfig

    record = {
        "size": "quick" if args.quick else "full",
        "data": {"num_train_per_split": size.num_train, "num_val": size.num_val, "num_test": size.num_test},
        "model": size.model, "fixed": size.fixed, "search": SEARCH if size.search else None,
        "fit_defaults": FitConfig().to_dict(), "seeds": list(size.seeds), "seconds": round(elapsed, 1),
        "threads": threads, "machine": machine_info(), "results": results, "tables": tables,
    }
    name = "real-quick" if args.quick else "real"
    write_json(args.out / f"{name}.json", record)
    png = plot(results, args.out / f"{name}.png")
    print(f"\nwrote {args.out / (name + '.json')}" + (f" and {png}" if png else "") + f" in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
