"""How the cost of UnseenModalityModel grows: tokens in (k_m), slots (K), modalities present.

Three sweeps, each timing forward + backward (sum of the outputs as the loss) at the paper's
widths (d_m = 768, D = 256, 8 heads, projection and fusion depth 6, two branches) with a small
batch (``--batch``, default 2):

1. ``k_m`` in {49, 98, 196, 392, 784} tokens in, K = 512: one ``FeatureProjection``. Its
   transformer's linear layers grow linearly with k_m, its attention quadratically, so the
   log-log slope lies between 1 and 2 and rises with k_m.
2. ``K`` in {16, 64, 128, 256, 512} slots, one modality of k_m = 196 tokens: the whole model
   (projection + fusion + head), and the fusion transformer alone (G + K tokens; linear layers
   linear in K, group attention quadratic in K / G).
3. modalities present per sample p in {1, 2, 3, 4}, a 4-modality model (k_m = 196 each, K = 512):
   every sample has the first p modalities. Each present modality runs its projection once and
   absent ones are skipped, so the time should be linear in p: ``t = a + b p`` with ``b`` the
   cost of one projection and ``a`` the fusion + head. A least-squares line and its R^2 are
   reported.

Each sweep is timed round-robin (every round runs every point once, so a shared machine's load
hits all points alike); the figure per point is the median of ``--repeats`` rounds after
``--warmup``. Fits: least-squares slope of log time against log size (sweeps 1-2), straight line
(sweep 3). Writes ``results/scaling.json`` and ``results/scaling.png``.

Run::

    python benchmarks/scaling.py            # paper widths, B=2, CPU float32, a few minutes on 2 cores
    python benchmarks/scaling.py --quick    # smoke test, small sizes, < 20 s
    python benchmarks/scaling.py --device cuda --batch 16
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import _common  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(_common.ROOT))
from umilayers.model import UnseenModalityModel  # noqa: E402
from umilayers.projection import FeatureProjection  # noqa: E402

PAPER = {"feature_dim": 768, "dim": 256, "heads": 8, "depth": 6, "branches": 2, "classes": 100,
         "tokens": [49, 98, 196, 392, 784], "slots": [16, 64, 128, 256, 512], "modalities": [1, 2, 3, 4],
         "fixed_tokens": 196, "fixed_slots": 512}
QUICK = {"feature_dim": 64, "dim": 32, "heads": 4, "depth": 1, "branches": 2, "classes": 10,
         "tokens": [16, 32, 64, 128], "slots": [8, 16, 32, 64], "modalities": [1, 2, 3, 4],
         "fixed_tokens": 32, "fixed_slots": 32}


def fwd_bwd(fn: Callable[[], torch.Tensor], params) -> Callable[[], None]:
    """A closure: run ``fn``, backpropagate the sum of its output, drop the gradients."""
    params = list(params)

    def step() -> None:
        out = fn()
        out.float().sum().backward()
        for p in params:
            p.grad = None

    return step


def model_for(s: dict, modalities: int, slots: int, device) -> UnseenModalityModel:
    torch.manual_seed(0)
    return UnseenModalityModel(
        {f"m{i}": s["feature_dim"] for i in range(modalities)}, num_outputs=s["classes"], dim=s["dim"],
        num_tokens=slots, projection_depth=s["depth"], fusion_depth=s["depth"], heads=s["heads"],
        branches=s["branches"], use_alignment=False, device=device,
    )


def sweep_tokens(s: dict, batch: int, device) -> dict[int, Callable[[], None]]:
    torch.manual_seed(0)
    proj = FeatureProjection(s["feature_dim"], s["dim"], s["fixed_slots"], s["depth"], s["heads"], device=device)
    steps = {}
    for k in s["tokens"]:
        x = torch.randn(batch, k, s["feature_dim"], device=device)
        steps[k] = fwd_bwd(lambda x=x: proj(x), proj.parameters())
    return steps


def sweep_slots(s: dict, batch: int, device) -> tuple[dict, dict]:
    x = {"m0": torch.randn(batch, s["fixed_tokens"], s["feature_dim"], device=device)}
    whole, fusion = {}, {}
    for k in s["slots"]:
        model = model_for(s, 1, k, device)
        tokens = torch.randn(batch, k + s["branches"], s["dim"], device=device)
        whole[k] = fwd_bwd(lambda m=model: m(x).branch_outputs, model.parameters())
        fusion[k] = fwd_bwd(lambda m=model, t=tokens: m.transformer(t), model.transformer.parameters())
    return whole, fusion


def sweep_modalities(s: dict, batch: int, device) -> dict[int, Callable[[], None]]:
    total = max(s["modalities"])
    model = model_for(s, total, s["fixed_slots"], device)
    steps = {}
    for p in s["modalities"]:
        x = {f"m{i}": torch.randn(batch, s["fixed_tokens"], s["feature_dim"], device=device) for i in range(p)}
        steps[p] = fwd_bwd(lambda x=x: model(x).branch_outputs, model.parameters())
    return steps


def timed(steps: dict, args, sync) -> dict:
    times = _common.interleaved_times(steps, args.warmup, args.repeats, sync)
    return {k: {"median_s": statistics.median(v), "times_s": v} for k, v in times.items()}


def plot(path: Path, result: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "tokens", "k_m tokens in"), (axes[1], "slots", "K slots")):
        for series, sweep in result["sweeps"][key]["series"].items():
            xs = [int(x) for x in sweep["points"]]
            ax.plot(xs, [sweep["points"][str(x)]["median_s"] for x in xs], marker="o",
                    label=f"{series} (slope {sweep['loglog_slope']:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("forward+backward (s)")
        ax.legend(fontsize=7)
    sweep = result["sweeps"]["modalities"]["series"]["model"]
    xs = [int(x) for x in sweep["points"]]
    ys = [sweep["points"][str(x)]["median_s"] for x in xs]
    fit = sweep["linear_fit"]
    axes[2].plot(xs, ys, marker="o", label="measured")
    axes[2].plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], linestyle="--",
                 label=f"{fit['intercept']:.3f} + {fit['slope']:.3f} p (R^2 {fit['r2']:.3f})")
    axes[2].set_xlabel("modalities present per sample (p)")
    axes[2].set_ylabel("forward+backward (s)")
    axes[2].set_xticks(xs)
    axes[2].set_ylim(bottom=0)
    axes[2].legend(fontsize=7)
    fig.suptitle(result["title"], fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    _common.add_threads_option(p)
    p.add_argument("--quick", action="store_true", help="smoke size (small widths, depth 1), < 20 s")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default scaling)")
    args = p.parse_args(argv)
    s = QUICK if args.quick else PAPER
    name = args.name or ("scaling_quick" if args.quick else "scaling")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    threads = _common.set_threads(args.threads, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    info = _common.machine_info(device)
    title = (f"UnseenModalityModel scaling, fwd+bwd, B={args.batch}, d_m={s['feature_dim']}, D={s['dim']}, "
             f"H={s['heads']}, depth {s['depth']}, G={s['branches']}, float32, "
             f"{_common.describe_machine(info)}, median of {args.repeats}")
    print(title)
    started = time.perf_counter()

    series = {
        "tokens": {"projection": timed(sweep_tokens(s, args.batch, device), args, sync)},
    }
    whole, fusion = sweep_slots(s, args.batch, device)
    series["slots"] = {"model": timed(whole, args, sync), "fusion": timed(fusion, args, sync)}
    series["modalities"] = {"model": timed(sweep_modalities(s, args.batch, device), args, sync)}

    sweeps = {}
    fixed = {"tokens": f"FeatureProjection, K={s['fixed_slots']}",
             "slots": f"one modality of k_m={s['fixed_tokens']}; fusion alone on G+K tokens",
             "modalities": f"4-modality model, k_m={s['fixed_tokens']} each, K={s['fixed_slots']}"}
    for key, by_series in series.items():
        out = {}
        for label, points in by_series.items():
            xs = sorted(points)
            ys = [points[x]["median_s"] for x in xs]
            entry = {"points": {str(x): points[x] for x in xs}, "loglog_slope": _common.loglog_slope(xs, ys)}
            if len(xs) >= 3:  # local slopes: how the exponent changes along the sweep
                entry["local_slopes"] = [_common.loglog_slope(xs[i:i + 2], ys[i:i + 2]) for i in range(len(xs) - 1)]
            if key == "modalities":
                entry["linear_fit"] = _common.linear_fit(xs, ys)
            out[label] = entry
        sweeps[key] = {"fixed": fixed[key], "series": out}

    for key, sweep in sweeps.items():
        print(f"\n{key} ({sweep['fixed']})")
        labels = list(sweep["series"])
        xs = list(sweep["series"][labels[0]]["points"])
        rows = [[key] + [f"{lab} median (s)" for lab in labels] + [f"{lab} / first" for lab in labels]]
        for x in xs:
            meds = [sweep["series"][lab]["points"][x]["median_s"] for lab in labels]
            firsts = [sweep["series"][lab]["points"][xs[0]]["median_s"] for lab in labels]
            rows.append([x] + [f"{m:.4f}" for m in meds] + [f"{m / f:.2f}" for m, f in zip(meds, firsts)])
        print(_common.table(rows))
        for lab in labels:
            entry = sweep["series"][lab]
            local = ", ".join(f"{v:.2f}" for v in entry.get("local_slopes", []))
            print(f"  {lab}: log-log slope {entry['loglog_slope']:.2f} (between neighbours: {local})")
            if "linear_fit" in entry:
                fit = entry["linear_fit"]
                print(f"  {lab}: t = {fit['intercept']:.4f} + {fit['slope']:.4f} * p s, R^2 = {fit['r2']:.4f} "
                      f"(intercept = fusion + head, slope = one projection)")

    result = {
        "title": title,
        "command": " ".join(["python", "benchmarks/scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {"batch": args.batch, "sizes": s, "device": str(device), "repeats": args.repeats,
                   "warmup": args.warmup, "threads": threads, "quick": args.quick},
        "machine": info,
        "load_average_1min_after": _common.machine_info(device).get("load_average_1min"),
        "sweeps": sweeps,
        "seconds": time.perf_counter() - started,
    }
    print()
    _common.write_results(args.out, name, result, plot, seconds=result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
