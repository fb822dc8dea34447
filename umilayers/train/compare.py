"""Is the method worth it on *this* store? umi against its baselines, at the same budget.

:func:`compare` trains every method of ``methods`` on one store with the same options (model
size, epochs, batch size, ...), the same learning-rate search and the same seeds, each run an
ordinary run folder made by :func:`~umilayers.train.fit`, and writes what the runs say:

- ``compare.json``: every run (method, seed, learning rate, whether it was chosen, val and test
  metrics per test-time modality subset) and the paired comparison of each method with umi;
- ``compare.md``: mean ± std per method and subset, then for each method the per-seed paired
  difference with umi, its bootstrap 95% interval and the verdict;
- ``compare.png``: the metrics by method and test-time subset, with the seeds' spread.

The budget. Every method gets the options given (``epochs``, ``dim``, ...) and the same
learning-rate search: on the first seed, each factor of ``lr_grid`` times the method's default
learning rate (``lr``, or :meth:`~umilayers.train.TrainConfig.peak_lr`'s rule), the one with the
best val score kept (test is never looked at); the other seeds run at the chosen rate. umi also
trains its unimodal models (stage 1, ``unimodal_epochs``): that is part of the method.

The verdict. For seed ``s`` the paired difference is ``d_s = umi_s - X_s`` on the test metric
with every modality (the unseen combination), signed so that ``d > 0`` means umi is better
(``X_s - umi_s`` for a lower-is-better metric: MAE, ranks). The interval is the exact percentile
bootstrap of the mean of the ``d_s`` (every resample of the seeds with its probability):
"umi beats X" when the interval lies above 0, "loses to" when it lies below, "is level with"
when it holds 0. With one seed there is no interval and no verdict. Few seeds give a wide
interval only when the seeds disagree: three seeds that agree in sign already exclude 0, so
read the differences, not only the verdict.

Resume. The settings go to ``settings.json`` first; a folder holding a comparison of other
settings is refused. Rerunning the same call continues: finished runs are reused (their
metrics are read back), an interrupted one continues from its checkpoint (fit's resume).

Example::

    >>> from umilayers.train.compare import paired_interval, verdict
    >>> paired_interval([1.0, 2.0, 3.0])
    (1.0, 3.0)
    >>> verdict((1.0, 3.0), "late-fusion")
    'umi beats late-fusion on this store'
"""

from __future__ import annotations

import io
import itertools
import math
import os
import statistics
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from umilayers._io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, remove_entries
from umilayers._validation import InvalidArgument, check_choice, check_int, check_number
from umilayers.baselines import PREDICTORS
from umilayers.data import FeatureStore
from umilayers.train.config import FitConfig
from umilayers.train.loop import Callback, metric_score
from umilayers.train.run import evaluate, fit

__all__ = ["compare", "DEFAULT_METHODS", "DEFAULT_LR_GRID", "METRICS", "COMPARE_FILES", "parse_methods",
           "parse_lr_grid", "paired_interval", "verdict", "scored_subsets", "summarize"]

#: The methods compared by default: ``METHOD[:PREDICTOR]`` (the predictor of its unimodal models).
DEFAULT_METHODS = ("umi", "late-fusion", "late-fusion:mlp", "vanilla")
#: Factors of each method's default learning rate tried on the first seed.
DEFAULT_LR_GRID = (0.5, 1.0, 2.0)
#: Methods that can be compared (``unimodal`` sees one modality: not a fusion method).
COMPARABLE = ("umi", "late-fusion", "vanilla", "pooled")
#: Metrics reported per task: (key in the metrics, with ``.`` for nesting; label; higher is
#: better). The first is the verdict's: the one fit selects epochs and learning rates by.
METRICS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "classification": (("top1", "top-1 %", True),),
    "regression": (("mae", "MAE", False),),
    "retrieval": (("mean_rank", "mean rank", False), ("t2v.r1", "text-to-video R@1 %", True),
                  ("t2v.median_rank", "text-to-video median rank", False)),
}
#: What a comparison folder holds: name -> what it is.
COMPARE_FILES = {
    "settings.json": "the comparison's settings (a rerun must match them)",
    "runs": "one fit run folder per method, learning rate and seed, and its record <run>.json",
    "compare.json": "every run's val and test metrics per test-time subset, the paired comparison",
    "compare.md": "the table and the verdicts",
    "compare.png": "the metrics by method and test-time subset (the seeds' spread)",
}
PathLike = Union[str, "os.PathLike[str]"]
_LEVEL = 0.95  # the interval's coverage


# ============================================================================ arguments


def parse_methods(methods: Union[str, Sequence[str]]) -> list[str]:
    """``"umi,late-fusion:mlp"`` (or a list) -> ``["umi", "late-fusion:mlp"]``, checked: each a
    comparable method with an optional ``:PREDICTOR``, umi among them, no repeats.

    Example::

        >>> parse_methods("umi, vanilla")
        ['umi', 'vanilla']
    """
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    for name in names:
        method, _, predictor = str(name).partition(":")
        check_choice("methods", method, COMPARABLE)
        if predictor:
            check_choice("methods", predictor, PREDICTORS)
    if "umi" not in names:
        raise InvalidArgument("methods", f"the comparison is against umi: include 'umi', got {names}")
    if len(set(names)) != len(names):
        raise InvalidArgument("methods", f"expected each method once, got {names}")
    return names


def parse_lr_grid(grid: Union[str, Sequence[float]]) -> list[float]:
    """``"0.5,1,2"`` (or a list) -> ``[0.5, 1.0, 2.0]``: factors > 0, each once.

    Example::

        >>> parse_lr_grid("1, 2")
        [1.0, 2.0]
    """
    if isinstance(grid, str):
        try:
            factors = [float(f) for f in grid.split(",")]
        except ValueError:
            raise InvalidArgument("lr_grid", f"expected comma-separated numbers > 0, got {grid!r}") from None
    else:
        factors = list(grid)
    for factor in factors:
        check_number("lr_grid", factor, strict=True)
    if not factors or len(set(factors)) != len(factors):
        raise InvalidArgument("lr_grid", f"expected distinct factors > 0, got {grid!r}")
    return [float(f) for f in factors]


def _method_options(name: str) -> dict[str, Any]:
    method, _, predictor = name.partition(":")
    return {"method": method, **({"predictor": predictor} if predictor else {})}


# ============================================================================ statistics


def _value(metrics: Mapping[str, Any], key: str) -> float:
    for part in key.split("."):
        metrics = metrics[part]
    return float(metrics)  # type: ignore[arg-type]


def paired_interval(differences: Sequence[float], level: float = _LEVEL) -> Optional[tuple[float, float]]:
    """The exact percentile bootstrap interval of the mean of paired ``differences`` (None
    for fewer than two).

    Every resample of the ``n`` differences (``n`` draws with replacement) is weighed by its
    exact probability; the bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    of the resampled means (the smallest mean whose cumulative probability reaches each).
    Exact, hence the same on every machine; ``O(C(2n - 1, n))`` resamples (92,378 at n = 10).

    Example::

        >>> paired_interval([-1.0, 2.0, 3.0])  # P(mean = -1) = 1/27 > 2.5 %
        (-1.0, 3.0)
    """
    n = len(differences)
    if n < 2:
        return None
    weights: dict[float, Fraction] = {}
    total = math.factorial(n)
    for combo in itertools.combinations_with_replacement(range(n), n):
        ways = total
        for count in Counter(combo).values():
            ways //= math.factorial(count)
        mean = math.fsum(differences[i] for i in combo) / n
        weights[mean] = weights.get(mean, Fraction(0)) + Fraction(ways, n**n)
    coverage = Fraction(level).limit_denominator(10**6)
    targets = [(1 - coverage) / 2, (1 + coverage) / 2]
    bounds: list[float] = []
    cumulative = Fraction(0)
    for mean in sorted(weights):
        cumulative += weights[mean]
        while targets and cumulative >= targets[0]:
            bounds.append(mean)
            targets.pop(0)
    return bounds[0], bounds[1]


def verdict(interval: Optional[tuple[float, float]], method: str) -> str:
    """The sentence for an interval of ``umi - method`` (positive: umi better).

    Example::

        >>> verdict((-2.0, 0.5), "vanilla")
        'umi is level with vanilla on this store'
    """
    if interval is None:
        return f"no verdict on umi against {method}: one seed gives no interval"
    low, high = interval
    if low > 0:
        return f"umi beats {method} on this store"
    if high < 0:
        return f"umi loses to {method} on this store"
    return f"umi is level with {method} on this store"


# ============================================================================ the comparison


def scored_subsets(store: FeatureStore) -> list[tuple[str, ...]]:
    """The test-time modality subsets scored: all modalities, each training split's set, each
    modality alone (in that order, each once)."""
    everything = tuple(sorted(store.modalities))
    seen = [tuple(sorted(store.splits[s].modalities)) for s in store.splits_with_role("train")]
    out: list[tuple[str, ...]] = []
    for subset in [everything, *seen, *((m,) for m in everything)]:
        if subset not in out:
            out.append(subset)
    return out


def _settings(store: FeatureStore, methods: list[str], seeds: int, lr_grid: list[float], cfg: FitConfig) -> dict:
    options = {k: v for k, v in cfg.result_options().items() if k not in ("method", "modality", "predictor", "seed")}
    return {"store": str(Path(store.path).resolve()), "task": store.task, "methods": methods, "seeds": seeds,
            "lr_grid": lr_grid, "predictor": cfg.predictor, "options": options}


def _prepare(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse a folder holding another comparison (or another thing); write ``settings.json``."""
    saved_path = out / "settings.json"
    if overwrite:
        remove_entries(out, COMPARE_FILES)
    if saved_path.is_file():
        saved = read_json(saved_path)
        if saved != settings:
            keys = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if "options" in keys:
                keys.remove("options")
                old, new = saved.get("options", {}), settings["options"]
                keys += sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            first = keys[0]
            was = saved.get(first, saved.get("options", {}).get(first))
            now = settings.get(first, settings["options"].get(first))
            named = first if first in ("store", "task") else "{" + first + "}"
            raise InvalidArgument("out", f"{out} holds a comparison of other settings ({named}: it has {was!r}, "
                                         f"given {now!r}); choose another folder or pass {{overwrite}}",
                                  refs=(first, "overwrite"))
        return
    if out.exists() and any(out.iterdir()):
        raise InvalidArgument("out", f"{out} is not empty and holds no comparison (no settings.json); "
                                     f"choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved_path, settings)


def _run_name(method: str, lr: float, seed: int) -> str:
    return f"{method.replace(':', '-')}-lr{lr:g}-seed{seed}"


class _Comparison:
    """The runs of one comparison, in order, with their records and the progress lines."""

    def __init__(self, store: FeatureStore, out: Path, cfg: FitConfig, methods: list[str], seeds: list[int],
                 lr_grid: list[float], callback: Optional[Callback], log: Callable[[str], None]) -> None:
        self.store, self.out, self.cfg, self.methods = store, out, cfg, methods
        self.seeds, self.lr_grid, self.callback, self.log = seeds, lr_grid, callback, log
        self.subsets = scored_subsets(store)
        self.total = len(methods) * (len(lr_grid) + len(seeds) - 1)
        self.done = 0
        self.durations: list[float] = []

    def base_lr(self, method: str) -> float:
        """The method's default learning rate (the same rule for every method)."""
        return self.cfg.replace(**_method_options(method)).train.peak_lr()

    def run(self, method: str, lr: float, seed: int) -> dict:
        """One run (reused when finished), its subsets scored; its record."""
        name = _run_name(method, lr, seed)
        record_path = self.out / "runs" / f"{name}.json"
        start = time.perf_counter()
        if record_path.is_file():
            record = read_json(record_path)
            self._progress(name, record, None)
            return record
        folder = self.out / "runs" / name
        # fit refuses resume where no run was started: resume only a run that wrote its config
        started = (folder / "config.json").is_file()
        metrics = fit(self.store, out=folder, config=self.cfg, resume=started, callback=self.callback, seed=seed,
                      lr=lr, **_method_options(method))
        scores: dict[str, dict] = {"val": {}, "test": {}}
        for subset in self.subsets:
            key = "+".join(subset)
            for split in ("val", "test"):
                if len(subset) == len(self.store.modalities):
                    scores[split][key] = metrics[split]  # fit scored every modality already
                else:
                    result = evaluate(folder, self.store, split, list(subset), device=self.cfg.runtime.device)
                    scores[split][key] = {k: v for k, v in result.items() if k not in ("split", "splits", "modalities")}
        record = {"method": method, "seed": seed, "lr": lr, "run": str(Path("runs") / name),
                  "best_epoch": metrics["best_epoch"], "val": scores["val"], "test": scores["test"],
                  "seconds": round(time.perf_counter() - start, 2)}
        atomic_write_json(record_path, record)
        self._progress(name, record, record["seconds"])
        return record

    def _progress(self, name: str, record: dict, seconds: Optional[float]) -> None:
        self.done += 1
        if seconds is not None:
            self.durations.append(seconds)
        left = self.total - self.done
        metric = METRICS[self.store.task][0]
        every = "+".join(self.subsets[0])
        scores = (f"val {_value(record['val'][every], metric[0]):.4g} "
                  f"test {_value(record['test'][every], metric[0]):.4g} ({metric[1].split(' ')[0]})")
        took = "finished before: reused" if seconds is None else f"{seconds:.0f} s"
        eta = ""
        if left and self.durations:
            eta = f", about {_duration(statistics.fmean(self.durations) * left)}"
        self.log(f"compare: [{self.done}/{self.total}] {name}: {scores}; {took}; {left} run(s) left{eta}")

    def method_runs(self, method: str) -> list[dict]:
        """The search on the first seed, then the other seeds at the chosen learning rate."""
        base = self.base_lr(method)
        first = [self.run(method, round(base * f, 12), self.seeds[0]) for f in self.lr_grid]
        task = self.store.task
        every = "+".join(self.subsets[0])
        best = max(first, key=lambda r: metric_score(task, r["val"][every]))  # ties: the first in the grid
        for record in first:
            record["chosen"] = record is best
        rest = [{**self.run(method, best["lr"], seed), "chosen": True} for seed in self.seeds[1:]]
        return first + rest


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def compare(store: Union[PathLike, FeatureStore], out: PathLike, *,
            methods: Union[str, Sequence[str]] = DEFAULT_METHODS, seeds: int = 3,
            lr_grid: Union[str, Sequence[float]] = DEFAULT_LR_GRID, config: Optional[FitConfig] = None,
            overwrite: bool = False, callback: Optional[Callback] = None,
            log: Optional[Callable[[str], None]] = None, **options: Any) -> dict[str, Any]:
    """Train every method of ``methods`` on ``store`` at the same budget and compare them with umi.

    Args:
        store: a store directory or an open :class:`~umilayers.data.FeatureStore` (it needs
            train, val and test splits).
        out: the comparison folder (created; a rerun with the same settings continues in it).
        methods: ``METHOD[:PREDICTOR]`` names, comma-separated or a list (default
            :data:`DEFAULT_METHODS`); must include ``umi``.
        seeds: seeds ``0 .. seeds - 1``.
        lr_grid: factors of each method's default learning rate tried on the first seed
            (comma-separated or a list).
        config: a :class:`~umilayers.train.FitConfig` to start from (``options`` override it).
        overwrite: delete a previous comparison in ``out`` first.
        callback: passed to every :func:`~umilayers.train.fit`.
        log: where the progress lines go (default: stderr, one line per run).
        **options: options of :func:`~umilayers.train.fit` shared by every run (``epochs=5,
            dim=64, device="cpu"``...); not ``method``, ``modality`` nor ``seed``.

    Returns:
        What ``compare.json`` holds: ``{"settings", "runs", "summary", "paired", "verdicts"}``.

    Raises:
        InvalidArgument: a bad argument (naming it), or ``out`` holds other settings.
        StoreError: the store is invalid.
    """
    for name in ("method", "modality", "seed"):
        if name in options:
            raise InvalidArgument(name, "set by the comparison (see {methods} and {seeds})", refs=("methods", "seeds"))
    names = parse_methods(methods)
    check_int("seeds", seeds, 1)
    grid = parse_lr_grid(lr_grid)
    cfg = FitConfig.from_options(config, **options)
    for name in names:  # every method's config is valid before any work
        FitConfig.from_options(cfg, **_method_options(name))
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    out_path = Path(out)
    _prepare(out_path, _settings(fs, names, seeds, grid, cfg), overwrite)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    start = time.perf_counter()
    comparison = _Comparison(fs, out_path, cfg, names, list(range(seeds)), grid, callback, log)
    runs = [record for name in names for record in comparison.method_runs(name)]
    result = summarize(read_json(out_path / "settings.json"), runs, comparison.subsets)
    result["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out_path / "compare.json", result)
    atomic_write_text(out_path / "compare.md", render(result))
    png = plot(result)
    if png is not None:
        atomic_write_bytes(out_path / "compare.png", png)
    return result


# ============================================================================ results


def summarize(settings: Mapping[str, Any], runs: list[dict], subsets: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """Mean and std per method, subset and metric (the chosen runs), the paired differences with
    umi and the verdicts."""
    task = settings["task"]
    keys = ["+".join(s) for s in subsets]
    chosen = {m: sorted((r for r in runs if r["method"] == m and r["chosen"]), key=lambda r: r["seed"])
              for m in settings["methods"]}
    summary: dict[str, Any] = {}
    for method, records in chosen.items():
        summary[method] = {"lr": records[0]["lr"], "test": {}}
        for key in keys:
            summary[method]["test"][key] = {}
            for metric, _, _ in METRICS[task]:
                values = [_value(r["test"][key], metric) for r in records]
                summary[method]["test"][key][metric] = {
                    "values": values, "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    metric, _, higher = METRICS[task][0]
    paired, verdicts = {}, {}
    umi = [_value(r["test"][keys[0]], metric) for r in chosen["umi"]]
    for method in settings["methods"]:
        if method == "umi":
            continue
        other = [_value(r["test"][keys[0]], metric) for r in chosen[method]]
        diffs = [(u - o) if higher else (o - u) for u, o in zip(umi, other)]
        interval = paired_interval(diffs)
        paired[method] = {"metric": metric, "subset": keys[0], "differences": diffs,
                          "mean": statistics.fmean(diffs), "interval": list(interval) if interval else None}
        verdicts[method] = verdict(interval, method)
    return {"settings": dict(settings), "subsets": keys, "runs": runs, "summary": summary, "paired": paired,
            "verdicts": verdicts}


def _scale(metric: str) -> float:
    """Fractions shown as percentages (top-1, recall); the others as they are."""
    return 100.0 if metric.split(".")[-1] in ("top1", "r1", "r5", "r10") else 1.0


def _fmt(value: float, metric: str, sign: str = "") -> str:
    """Percentages with 2 decimals, ranks with 1, other metrics (MAE) with 3."""
    scale = _scale(metric)
    decimals = 2 if scale != 1 else 1 if metric.endswith("rank") else 3
    return f"{value * scale:{sign}.{decimals}f}"


def _cell(stats: Mapping[str, Any], metric: str) -> str:
    if len(stats["values"]) < 2:
        return _fmt(stats["mean"], metric)
    return f"{_fmt(stats['mean'], metric)} ± {_fmt(stats['std'], metric)}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def render(result: Mapping[str, Any]) -> str:
    """``compare.md``: a table per metric (mean ± std over the seeds, per test-time subset), the
    paired differences with umi and the verdicts."""
    settings, summary = result["settings"], result["summary"]
    task, methods, keys = settings["task"], settings["methods"], result["subsets"]
    options = settings["options"]
    seeds = settings["seeds"]
    lines = [f"# umi against {', '.join(m for m in methods if m != 'umi')} on {settings['store']}", "",
             f"{task}; every method: {options['epochs']} epochs (umi also {options['unimodal_epochs']} unimodal), "
             f"dim {options['dim']}, batch {options['batch_size']}; learning rate chosen on val among "
             f"{', '.join(f'{f:g}' for f in settings['lr_grid'])} x the default (seed 0); "
             f"{seeds} seed(s); test metrics, mean ± std over the seeds.", ""]
    for metric, label, higher in METRICS[task]:
        better = "higher" if higher else "lower"
        header = [f"test {label} ({better} is better)", *methods]
        body = [[key.replace("+", " + ") + (" (all)" if i == 0 else "")] +
                [_cell(summary[m]["test"][key][metric], metric) for m in methods] for i, key in enumerate(keys)]
        body.append(["learning rate chosen"] + [f"{summary[m]['lr']:.3g}" for m in methods])
        lines += [_table(header, body), ""]
    metric, label, higher = METRICS[task][0]
    lines += [f"umi against each method: test {label} with every modality, per seed "
              f"({'umi - X' if higher else 'X - umi: lower is better'}; > 0: umi better), exact bootstrap "
              f"{_LEVEL:.0%} interval of the mean", ""]
    body = []
    for method, p in result["paired"].items():
        low_high = p["interval"]
        interval = ("n/a" if low_high is None
                    else f"[{_fmt(low_high[0], metric, '+')}, {_fmt(low_high[1], metric, '+')}]")
        body.append([method, ", ".join(_fmt(d, metric, "+") for d in p["differences"]), _fmt(p["mean"], metric, "+"),
                     interval, result["verdicts"][method]])
    lines += [_table(["method X", "per seed", "mean", "95% interval", "verdict"], body), ""]
    lines += [f"- {result['verdicts'][m]}." for m in result["paired"]]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any]) -> Optional[bytes]:
    """``compare.png`` as PNG bytes (None without matplotlib): one panel per metric, the mean per
    method and test-time subset as bars, each seed as a dot."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, summary, keys = result["settings"], result["summary"], result["subsets"]
    methods, metrics = settings["methods"], METRICS[settings["task"]]
    panel = max(5.0, 0.45 * len(keys) * len(methods))
    fig, axes = plt.subplots(1, len(metrics), figsize=(panel * len(metrics), 4.0), squeeze=False)
    width = 0.8 / len(methods)
    for ax, (metric, label, higher) in zip(axes[0], metrics):
        scale = _scale(metric)
        for j, method in enumerate(methods):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(keys))]
            stats = [summary[method]["test"][k][metric] for k in keys]
            ax.bar(xs, [s["mean"] * scale for s in stats], width, yerr=[s["std"] * scale for s in stats],
                   label=method if ax is axes[0][0] else None, capsize=2)
            for x, s in zip(xs, stats):
                ax.plot([x] * len(s["values"]), [v * scale for v in s["values"]], "k.", markersize=3)
        ax.set_xticks(range(len(keys)), [k.replace("+", "+\n") for k in keys], fontsize=7)
        ax.set_title(f"test {label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("test-time modalities", fontsize=8)
    fig.legend(loc="upper center", ncol=len(methods), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
