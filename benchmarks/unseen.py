"""Accuracy on unseen modality combinations: every method and ablation of the paper, synthetic tasks.

On the embedded synthetic benchmark (:mod:`umilayers.data.synthetic`), over ``--seeds`` seeds
(mean ± sample std), with one shared training setting for every method (the demo's
:meth:`umilayers.demo.DemoSize.default`, chosen on the val split only):

- **Table 4 layout**: umi, late fusion, vanilla transformer, pooled projection on the three tasks
  (classification top-1, regression MAE, retrieval mean rank).
- **Tables 2-3 layout**: the ablations on classification (feature vs pooled projection;
  + alignment loss; + pseudo-label branch; one vs two branches).
- **Three training splits**: classification with three unimodal training splits (rgb, audio,
  flow; tested on all three). :mod:`umilayers.data.synthetic` has two classification
  modalities, so this store is built here from the generator's pieces (same token model; the
  third modality ``flow`` encodes ``c = (y // 2 + 2 (y mod 2)) mod C/2``, so any two of the three
  modalities determine the class and one alone reaches at most 50%).
- **Figure 3 layout**: modality-incomplete testing: every method's regression models evaluated
  with every non-empty subset of the four modalities
  (:func:`umilayers.train.evaluate` with ``modalities=subset``).
- **Noise**: Gaussian noise ``N(0, sigma^2)`` added to the valid tokens of one modality of the
  classification test split (a noisy copy of the store), for each modality and sigma.

Writes ``results/unseen.json`` and ``results/unseen.png`` (Table 4, ablations, three splits,
Figure 3 and noise panels).

Usage::

    python benchmarks/unseen.py                 # 3 seeds, default sizes (about 30 min, 2 cores)
    python benchmarks/unseen.py --quick         # CI smoke test (< 60 s)
    python benchmarks/unseen.py --seeds 5 --keep runs/   # keep the run directories
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import numpy as np

from umilayers.demo import (
    ABLATION_ROWS,
    METHOD_ROWS,
    TASK_COLUMNS,
    DemoSize,
    format_table,
    headline_metric,
    run_dir,
    run_grid,
)
from umilayers.train import evaluate, fit

REGRESSION_MODALITIES = ("depth", "force", "image", "proprio")
NOISE_SIGMAS = (1.0, 2.0)


def quick_size() -> DemoSize:
    """CI smoke size: a few seconds per grid."""
    return DemoSize(num_train=64, num_eval=32, epochs=1, unimodal_epochs=1, pseudo_window=1,
                    model=dict(dim=8, num_tokens=2, projection_depth=1, fusion_depth=1, heads=2,
                               batch_size=32))


# ----------------------------------------------------------------------------- 3-split store


def make_three_split_store(path: Path, num_train: int, num_eval: int, seed: int):
    """Classification with three unimodal training splits (rgb, audio, flow); val/test have all three.

    Built from the generator's own pieces (:class:`umilayers.data.synthetic.SyntheticConfig`,
    its token model and code vectors), so the data follow the documented model; ``flow`` is a
    third "small" modality (half tokens, half dim) encoding ``c = (a + 2 (y mod 2)) mod C/2``.
    """
    from umilayers.data import FeatureStore
    from umilayers.data.synthetic import SyntheticConfig, _Modality, _shape, _unit_codes

    cfg = SyntheticConfig(num_train=num_train, num_eval=num_eval, seed=seed)
    rng = np.random.default_rng([seed, 3])
    half = cfg.num_classes // 2
    geometry = {
        "audio": _Modality(rng, *_shape("classification", "audio", cfg), rank=half, noise=cfg.noise_weak),
        "flow": _Modality(rng, *_shape("classification", "flow", cfg), rank=half, noise=cfg.noise),
        "rgb": _Modality(rng, *_shape("classification", "rgb", cfg), rank=half, noise=cfg.noise),
    }
    codes = {m: _unit_codes(g.basis, half) for m, g in geometry.items()}
    padded = {"audio"}
    store = FeatureStore.create(path, "classification", cfg.num_classes,
                                {m: (g.tokens, g.dim) for m, g in geometry.items()}, overwrite=True)
    splits = [("train_rgb", "train", ("rgb",), num_train), ("train_audio", "train", ("audio",), num_train),
              ("train_flow", "train", ("flow",), num_train),
              ("val", "val", tuple(sorted(geometry)), num_eval), ("test", "test", tuple(sorted(geometry)), num_eval)]
    for name, role, mods, size in splits:
        y = rng.integers(0, cfg.num_classes, size=size)
        a, parity = y // 2, y % 2
        code = {"rgb": a, "audio": (a + parity) % half, "flow": (a + 2 * parity) % half}
        features, lengths = {}, {}
        for m in mods:
            lens = geometry[m].lengths(rng, size, m in padded)
            features[m] = geometry[m].tokens_for(rng, cfg.amplitude * codes[m][code[m]], lens, cfg)
            if m in padded:
                lengths[m] = lens
        store.write_split(name, role, features, y.astype(np.int64), lengths or None)
    return FeatureStore(path)


def run_three_split(root: Path, seeds: Sequence[int], size: DemoSize, log=print) -> dict:
    results: dict = {row: {"classification": []} for row in METHOD_ROWS}
    for seed in seeds:
        store = root / f"store-3split-seed{seed}"
        make_three_split_store(store, size.num_train, size.num_eval, seed)
        for number, (row, options) in enumerate(METHOD_ROWS.items()):
            start = time.perf_counter()
            metrics = fit(store, out=run_dir(root, "3split", number, options, seed), seed=seed, epochs=size.epochs,
                          unimodal_epochs=size.unimodal_epochs, pseudo_window=size.pseudo_window,
                          overwrite=True, quiet=True, **size.model, **options)
            value = headline_metric("classification", metrics["test"])
            results[row]["classification"].append(value)
            log(f"  3-split        seed {seed}  {row:<45} {value:8.4f}  ({time.perf_counter() - start:.1f}s)")
    return results


# ----------------------------------------------------------------------------- evaluations


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, by size then name."""
    return [c for k in range(1, len(modalities) + 1) for c in itertools.combinations(sorted(modalities), k)]


def run_subsets(root: Path, seeds: Sequence[int], log=print) -> dict:
    """``{method row: {"+".join(subset): [test MAE per seed]}}`` for the regression runs of Table 4."""
    out: dict = {row: {} for row in METHOD_ROWS}
    for number, (row, options) in enumerate(METHOD_ROWS.items()):
        for seed in seeds:
            run = run_dir(root, "regression", number, options, seed)
            for subset in subsets(REGRESSION_MODALITIES):
                value = evaluate(run, split="test", modalities=list(subset), device="cpu")["mae"]
                out[row].setdefault("+".join(subset), []).append(value)
        log(f"  subsets        {row:<45} all four: {statistics.fmean(out[row]['+'.join(REGRESSION_MODALITIES)]):.4f}")
    return out


def noisy_copy(store: Path, dest: Path, modality: str, sigma: float, seed: int) -> Path:
    """A copy of ``store`` whose test split has ``N(0, sigma^2)`` added to ``modality``'s valid tokens."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(store, dest)
    path = dest / "test" / f"{modality}.npy"
    x = np.load(path).astype(np.float32)
    lengths_file = dest / "test" / f"{modality}.lengths.npy"
    lengths = np.load(lengths_file) if lengths_file.exists() else np.full(len(x), x.shape[1])
    valid = (np.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
    rng = np.random.default_rng([seed, 17])
    x = x + sigma * rng.standard_normal(x.shape).astype(np.float32) * valid
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, x)
    os.replace(tmp, path)
    return dest


def run_noise(root: Path, seeds: Sequence[int], log=print) -> dict:
    """``{method row: {"clean" | "rgb σ=1" ...: [test top-1 per seed]}}`` on classification."""
    out: dict = {row: {"clean": []} for row in METHOD_ROWS}
    for seed in seeds:
        store = root / f"store-classification-seed{seed}"
        runs = {row: run_dir(root, "classification", n, o, seed) for n, (row, o) in enumerate(METHOD_ROWS.items())}
        for row, run in runs.items():
            out[row]["clean"].append(evaluate(run, store=store, split="test", device="cpu")["top1"])
        for modality in ("rgb", "audio"):
            for sigma in NOISE_SIGMAS:
                noisy = noisy_copy(store, root / "noisy" / f"seed{seed}", modality, sigma, seed)
                for row, run in runs.items():
                    value = evaluate(run, store=noisy, split="test", device="cpu")["top1"]
                    out[row].setdefault(f"{modality} σ={sigma:g}", []).append(value)
    for row in out:
        log(f"  noise          {row:<45} " + "  ".join(f"{k}: {statistics.fmean(v):.3f}" for k, v in out[row].items()))
    return out


# ----------------------------------------------------------------------------- tables and plots


def _cell(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def column_table(results: Mapping, title: str, scale: float = 1.0, digits: int = 2) -> str:
    """Rows = methods, columns = the keys of each row's dict, cells mean ± std."""
    columns = list(next(iter(results.values())))
    header = [title] + columns
    body = [[row] + [_cell(results[row][c], scale, digits) for c in columns] for row in results]
    return _render(header, body)


def subset_table(results: Mapping) -> str:
    """Figure 3 as a table: rows = modality subsets, columns = methods (test MAE, mean ± std)."""
    rows = list(next(iter(results.values())))
    header = ["test modalities (Figure 3 layout, MAE down)"] + list(results)
    body = [[subset.replace("+", ", ")] + [_cell(results[m][subset], 1.0, 3) for m in results] for subset in rows]
    return _render(header, body)


def _render(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body])


def _bars(ax, labels, values, title, scale=1.0, highlight=None):
    means = [statistics.fmean(v) * scale for v in values]
    errs = [statistics.stdev(v) * scale if len(v) > 1 else 0.0 for v in values]
    colors = ["#d62728" if highlight and highlight in lab else "#999999" for lab in labels]
    ax.bar(range(len(labels)), means, yerr=errs, color=colors)
    ax.set_xticks(range(len(labels)), [lab.replace(", ", ",\n") if len(lab) > 14 else lab for lab in labels],
                  fontsize=6, rotation=30, ha="right")
    ax.set_title(title, fontsize=8)


def plot(record: Mapping, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    t4 = record["table4"]
    for ax, task in zip(axes[0], TASK_COLUMNS):
        scale = 100.0 if TASK_COLUMNS[task][1] == "top1" else 1.0
        _bars(ax, list(t4), [t4[r][task] for r in t4], f"Table 4: {TASK_COLUMNS[task][0]}", scale, "umi")
    ab = record["ablation"]
    _bars(axes[1][0], list(ab), [ab[r]["classification"] for r in ab], "Tables 2-3: classification top-1", 100.0,
          "L_align + pseudo")
    ax = axes[1][1]
    subsets_ = record["subsets"]
    names = list(next(iter(subsets_.values())))
    for row, per in subsets_.items():
        ax.plot(range(len(names)), [statistics.fmean(per[s]) for s in names], marker="o", ms=3, label=row)
    ax.set_xticks(range(len(names)), [s.replace("+", ",") for s in names], fontsize=5, rotation=60, ha="right")
    ax.set_title("Figure 3: regression MAE per test subset (down)", fontsize=8)
    ax.legend(fontsize=6)
    ax = axes[1][2]
    noise = record["noise"]
    conditions = list(next(iter(noise.values())))
    width = 0.8 / len(noise)
    for i, (row, per) in enumerate(noise.items()):
        ax.bar([j + i * width for j in range(len(conditions))], [statistics.fmean(per[c]) * 100 for c in conditions],
               width, label=row)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(conditions))], conditions, fontsize=6)
    ax.set_title("classification top-1 with test-time noise on one modality", fontsize=8)
    ax.legend(fontsize=6)
    fig.suptitle(f"umilayers benchmarks/unseen.py ({len(record['seeds'])} seeds, mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed (CI smoke test, < 60 s)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for unseen.json/unseen.png")
    parser.add_argument("--keep", type=Path, default=None, help="keep stores and runs in this folder")
    _common.add_threads_option(parser)
    args = parser.parse_args(argv)
    seeds_n = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds_n < 1:
        parser.error(f"--seeds: expected a positive int, got {seeds_n}")
    threads = _common.set_threads(args.threads)
    size = quick_size() if args.quick else DemoSize.default()
    seeds = list(range(seeds_n))
    start = time.perf_counter()
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="umilayers-unseen-")
        root = Path(tmp.name)
    else:
        root = args.keep
        root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"Table 4: {len(METHOD_ROWS)} methods x {len(TASK_COLUMNS)} tasks x {len(seeds)} seed(s)", flush=True)
        table4 = run_grid(root / "main", list(TASK_COLUMNS), METHOD_ROWS, seeds, size)
        print("Tables 2-3: ablations on classification", flush=True)
        ablation = run_grid(root / "ablation", ["classification"], ABLATION_ROWS, seeds, size)
        print("Three training splits (classification: rgb, audio, flow)", flush=True)
        three = run_three_split(root / "three", seeds, size)
        print("Figure 3: every modality subset at test time (regression)", flush=True)
        subset_results = run_subsets(root / "main", seeds)
        print("Noise on one modality at test time (classification)", flush=True)
        noise = run_noise(root / "main", seeds)
    finally:
        if tmp is not None:
            tmp.cleanup()
    elapsed = time.perf_counter() - start
    tables = {
        "table4": format_table(table4, list(TASK_COLUMNS), "method (Table 4 layout)"),
        "ablation": format_table(ablation, ["classification"], "ablation (Tables 2-3 layout)"),
        "three_splits": column_table({r: {"3 train splits, top-1 (up)": v["classification"]} for r, v in three.items()},
                                     "method (rgb / audio / flow training splits)", 100.0),
        "subsets": subset_table(subset_results),
        "noise": column_table(noise, "method (classification top-1, noise on one test modality)", 100.0),
    }
    for text in tables.values():
        print()
        print(text)
    record = {
        "size": "quick" if args.quick else "default",
        "settings": {"num_train": size.num_train, "num_eval": size.num_eval, "epochs": size.epochs,
                     "unimodal_epochs": size.unimodal_epochs, "pseudo_window": size.pseudo_window, **size.model},
        "seeds": seeds, "seconds": round(elapsed, 1),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": threads},
        "date": time.strftime("%Y-%m-%d"),
        "table4": table4, "ablation": ablation, "three_splits": three, "subsets": subset_results, "noise": noise,
        "noise_sigmas": list(NOISE_SIGMAS), "tables": tables,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "unseen-quick" if args.quick else "unseen"
    tmp_json = args.out / f"{name}.json.tmp"
    tmp_json.write_text(json.dumps(record, indent=2))
    os.replace(tmp_json, args.out / f"{name}.json")
    png = plot(record, args.out / f"{name}.png")
    print(f"\nwrote {args.out / (name + '.json')}" + (f" and {png}" if png else "") + f" in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
