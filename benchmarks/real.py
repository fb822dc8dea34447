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

Methods: :data:`umilayers.train.compare.DEFAULT_METHODS` (umi, late fusion with transformer
members, late fusion with MLP members, the vanilla transformer), compared by
:func:`umilayers.train.compare` (the script has no training code of its own): every method at
one model size (:data:`MODEL`: ``dim=64, num_tokens=16``, two layers in every transformer, 4
heads) and training length (:data:`EPOCHS`), the same learning-rate search (half, one and two
times the default, seed 0, chosen on val top-1; test is never looked at to choose), then seeds
1 and 2 at the chosen rate. The runs are ordinary ``umilayers fit`` run folders under
``--keep``/``<task>`` (a rerun reuses finished ones and resumes an interrupted one).

Data (:data:`FULL_DATA`): images per training split, val (disjoint, from the training set), and
the first test images of the official test set.

Reported (``results/real.json``, ``results/real.png``): per task, ``compare``'s result (every
run's val and test top-1 per test-time modality subset, mean ± std per method, the per-seed
paired differences with umi, their exact bootstrap 95% interval and the verdict) and its table;
wall time, the machine and its load average.

Usage::

    python benchmarks/real.py                   # full (see docs/compare.rst for the time)
    python benchmarks/real.py --quick           # CI smoke test (< 60 s)
    python benchmarks/real.py --keep runs/real  # keep the runs; a rerun resumes them

When the data is missing the script prints how to install it and exits with status 77
(:data:`_real_data.SKIP_STATUS`), which CI treats as a skip.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import _real_data as data
from _common import add_threads_option, machine_info, pyplot, run_root, save_figure, set_threads, write_json

#: Model size shared by every method (the learning rate comes from the search).
MODEL = dict(dim=64, num_tokens=16, projection_depth=2, fusion_depth=2, heads=4)
#: Training length shared by every method (a benchmark size, like MODEL; FitConfig's is 30 / 20 / 10).
EPOCHS = dict(epochs=10, unimodal_epochs=6, pseudo_window=3)
#: Images per training split, val images, test images of the full size.
FULL_DATA = dict(num_train=2000, num_val=1000, num_test=2000)
TASKS = ("halves", "quadrants")


@dataclass(frozen=True)
class Size:
    num_train: int
    num_val: int
    num_test: int
    seeds: int
    lr_grid: tuple[float, ...]
    model: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)  # fit options that override FitConfig (training length)

    @classmethod
    def full(cls) -> "Size":
        return cls(**FULL_DATA, seeds=3, lr_grid=(0.5, 1.0, 2.0), model=dict(MODEL), fixed=dict(EPOCHS))

    @classmethod
    def quick(cls) -> "Size":
        return cls(num_train=200, num_val=100, num_test=200, seeds=1, lr_grid=(1.0,),
                   model=dict(dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2),
                   fixed=dict(epochs=1, unimodal_epochs=1, pseudo_window=1))


def compare_task(store: Path, out: Path, size: Size) -> dict:
    """:func:`umilayers.train.compare` on one task's store (progress lines on stdout)."""
    from umilayers.train import compare

    return compare(store, out, seeds=size.seeds, lr_grid=size.lr_grid, device="cpu", quiet=True,
                   log=lambda line: print(line, flush=True), **size.model, **size.fixed)


def plot(pngs: dict[str, bytes], path: Path) -> Optional[Path]:
    """The tasks' ``compare.png`` side by side."""
    plt = pyplot()
    if plt is None or not pngs:
        return None
    images = {task: plt.imread(io.BytesIO(png)) for task, png in pngs.items()}
    width = sum(im.shape[1] for im in images.values()) / 110
    height = max(im.shape[0] for im in images.values()) / 110 + 0.4
    fig, axes = plt.subplots(1, len(images), figsize=(width, height), squeeze=False)
    for ax, (task, image) in zip(axes[0], images.items()):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(f"Fashion-MNIST {task}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


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
    stores = data.build_all(args.cache, size.num_train, size.num_val, size.num_test, stores=tuple(tasks),
                            data_dir=args.data)
    results, tables, pngs, loads = {}, {}, {}, []
    with run_root(args.keep, "umilayers-real-") as root:
        for task in tasks:
            print(f"{task}: umilayers compare {stores[task]} --out {root / task}", flush=True)
            results[task] = compare_task(stores[task], root / task, size)
            loads.append(round(os.getloadavg()[0], 2))
            tables[task] = (root / task / "compare.md").read_text()
            if (root / task / "compare.png").is_file():
                pngs[task] = (root / task / "compare.png").read_bytes()
    elapsed = time.perf_counter() - start
    for task in tasks:
        print()
        print(tables[task], end="")
    record = {
        "quick": args.quick,
        "data": {"num_train_per_split": size.num_train, "num_val": size.num_val, "num_test": size.num_test},
        "model": size.model, "fixed": size.fixed, "seeds": size.seeds, "lr_grid": list(size.lr_grid),
        "seconds": round(elapsed, 1),  # this call's: finished runs found in --keep are reused, not re-timed
        "run_seconds": {task: round(sum(r["seconds"] for r in results[task]["runs"]), 1) for task in tasks},
        "threads": threads, "machine": machine_info(),
        "load_average_1min_after_each_task": loads, "results": results, "tables": tables,
    }
    name = "real-quick" if args.quick else "real"
    write_json(args.out / f"{name}.json", record)
    png = plot(pngs, args.out / f"{name}.png")
    print(f"\nwrote {args.out / (name + '.json')}" + (f" and {png}" if png else "") + f" in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
