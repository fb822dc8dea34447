"""What ``umilayers compare`` costs on top of the same runs done by hand with ``fit``.

The same runs twice in one process, on the demo's classification store (``umilayers synth
classification``): **by hand**, a loop that calls :func:`umilayers.train.fit` for every method,
learning rate and seed that :func:`umilayers.train.compare` trains, then
:func:`umilayers.train.evaluate` for every test-time modality subset it scores (val and test);
and :func:`~umilayers.train.compare` itself, which adds its bookkeeping (settings, one record
per run, the summary, the exact bootstrap, ``compare.md`` and ``compare.png``). A warm-up
``fit`` runs first, untimed, so neither pays the process's first-call costs. Goal: compare's
wall time at most 5% above the by-hand loop.

Reported: both times and the ratio ``compare / by hand``, in wall time and in the process's CPU
time (``time.process_time``; on a loaded machine the steadier one). One measurement, printed;
``results/compare_overhead.json`` (the full size only).

Run::

    python benchmarks/compare_overhead.py            # 4 methods x (2 lr + 1 seed), ~2 min on a quiet core
    python benchmarks/compare_overhead.py --quick    # smoke test, < 1 min
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

import _common  # noqa: E402

sys.path.insert(0, str(_common.ROOT))
from umilayers.data import FeatureStore  # noqa: E402
from umilayers.data.synthetic import make_synthetic_store  # noqa: E402
from umilayers.train import FitConfig, compare, evaluate, fit  # noqa: E402
from umilayers.train.compare import parse_methods, scored_subsets  # noqa: E402
from umilayers.train.loop import metric_score  # noqa: E402

FULL = dict(methods="umi,late-fusion,late-fusion:mlp,vanilla", seeds=2, lr_grid=(1.0, 2.0), num_train=600,
            options=dict(dim=32, num_tokens=8, projection_depth=1, fusion_depth=1, heads=4, epochs=4,
                         unimodal_epochs=2, pseudo_window=1))
QUICK = dict(methods="umi,vanilla", seeds=2, lr_grid=(1.0,), num_train=48,
             options=dict(dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2, epochs=1,
                          unimodal_epochs=1, pseudo_window=1, batch_size=16))


def by_hand(store: FeatureStore, out: Path, methods: str, seeds: int, lr_grid: Sequence[float],
            options: dict[str, Any]) -> None:
    """What compare trains and scores, with fit and evaluate only: the search on seed 0, the
    other seeds at the best lr on val, every subset scored on val and test."""
    subsets = scored_subsets(store)[1:]  # fit already scores every modality
    for name in parse_methods(methods):
        method, _, predictor = name.partition(":")
        extra = {"predictor": predictor} if predictor else {}
        base = FitConfig.from_options(**options, **extra).train.peak_lr()

        def run(lr: float, seed: int, name: str = name, method: str = method, extra: dict = extra) -> dict:
            folder = out / f"{name}-{lr:g}-{seed}"
            metrics = fit(store, method, folder, seed=seed, lr=lr, **options, **extra)
            for subset in subsets:
                for split in ("val", "test"):
                    evaluate(folder, store, split, list(subset), device=options["device"])
            return metrics

        first = [run(round(base * f, 12), 0) for f in lr_grid]
        best = max(range(len(first)), key=lambda i: metric_score(store.task, first[i]["val"]))
        for seed in range(1, seeds):
            run(round(base * lr_grid[best], 12), seed)


def measure(size: dict, root: Path) -> dict[str, Any]:
    store = make_synthetic_store("classification", root / "store", num_train=size["num_train"],
                                 num_eval=size["num_train"] // 3)
    options = dict(size["options"], device="cpu", quiet=True)
    fit(store, "late-fusion", root / "warmup", **options)  # first-call costs, untimed
    times: dict[str, dict[str, float]] = {}
    for name, call in (("by_hand", lambda: by_hand(store, root / "hand", size["methods"], size["seeds"],
                                                    size["lr_grid"], options)),
                       ("compare", lambda: compare(store, root / "compare", methods=size["methods"],
                                                   seeds=size["seeds"], lr_grid=size["lr_grid"],
                                                   log=lambda line: None, **options))):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        times[name] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}
    ratio = {kind: round(times["compare"][kind] / times["by_hand"][kind], 4) for kind in ("wall_s", "cpu_s")}
    return {"times": times, "ratio_compare_over_by_hand": ratio}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=_common.ROOT / "results", help="folder of the JSON result")
    _common.add_threads_option(parser)
    args = parser.parse_args(argv)
    threads = _common.set_threads(args.threads)
    size = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="umilayers-compare-overhead-") as tmp:
        result = measure(size, Path(tmp))
    t, r = result["times"], result["ratio_compare_over_by_hand"]
    print(f"by hand (fit + evaluate): {t['by_hand']['wall_s']:.1f} s wall, {t['by_hand']['cpu_s']:.1f} s CPU")
    print(f"compare:                  {t['compare']['wall_s']:.1f} s wall, {t['compare']['cpu_s']:.1f} s CPU")
    print(f"compare / by hand: {r['wall_s']:.3f} wall, {r['cpu_s']:.3f} CPU (goal: wall <= 1.05)"
          + ("  [--quick: tiny runs, the fixed costs dominate]" if args.quick else ""))
    if not args.quick:
        _common.write_json(args.out / "compare_overhead.json",
                           {**result, "size": {k: v for k, v in size.items()}, "threads": threads,
                            "machine": _common.machine_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
