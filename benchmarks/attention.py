"""Speed and memory of GroupMaskedTransformer's attention backends against the obvious ways.

Times forward + backward of one GroupMaskedTransformer layer (B=16, D=256, H=8 by default, the
paper's fusion size) for N in {64, 258, 514, 1026} tokens and G in {2, 4} groups (as equal as
possible: N=514, G=4 gives [129, 129, 128, 128]), with the layer's attention computed by:

- ``dense``: SDPA with a full ``(B, H, N, N)`` boolean block mask (the obvious way; the baseline
  every ratio is measured against, in the same run);
- ``loop``: a Python loop over the groups, attention on each slice, then concatenation (the
  authors' released code's way);
- ``auto``, ``fold`` (equal groups only), ``padded_fold``, ``sdpa`` and, on CUDA, ``xformers``:
  this library.

Reports the median of ``--repeats`` rounds (each round runs every method once, so a shared
machine's load hits all alike), the median per-round ratio against ``dense``, and peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above the baseline; on CPU the peak resident-set growth (the
kernel's VmHWM, reset through ``/proc/self/clear_refs``, with glibc's mmap threshold pinned so
freed tensors leave the resident set) together with the analytic size of the attention mask.
Prints a table and whether the goals of issues 2 and 5 are met; writes
``results/attention.json`` and ``results/attention.png``.

Run::

    python benchmarks/attention.py            # CPU float32, a few minutes on 2 cores
    python benchmarks/attention.py --quick    # smoke test, < 20 s
    python benchmarks/attention.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

# Pin glibc's mmap threshold (before torch allocates anything) so that large freed tensors are
# returned to the OS and resident-set peaks measure what the method needed, not stale heap.
if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ and "--no-reexec" not in sys.argv:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv, "--no-reexec"])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from umilayers.attention import (  # noqa: E402
    GroupMaskedTransformer,
    backend_support,
    block_mask,
    select_backend,
    split_groups,
)

GOAL_SPEED_G2 = 0.6  # issue 2: auto <= 0.6x dense-masked at N=514, G=2
GOAL_MEMORY = 0.6  # issue 5: peak memory <= 0.6x dense-masked
GOAL_N = 514


def equal_split(n: int, groups: int) -> list[int]:
    return [n // groups + (i < n % groups) for i in range(groups)]


def dense_attend(q, k, v, group_sizes, backend, padding_mask):
    """The obvious way: one boolean mask per batch row and head, (B, H, N, N)."""
    b, h, n, _ = q.shape
    mask = block_mask(group_sizes, q.device).expand(b, h, n, n).contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def loop_attend(q, k, v, group_sizes, backend, padding_mask):
    """The released code's way: attention over each group's slice, then concatenation."""
    outs = [
        F.scaled_dot_product_attention(qs, ks, vs)
        for qs, ks, vs in zip(*(split_groups(t, group_sizes, dim=2) for t in (q, k, v)))
    ]
    return torch.cat(outs, dim=2)


def make_layer(method: str, args, group_sizes: list[int]) -> GroupMaskedTransformer:
    layer = GroupMaskedTransformer(
        args.dim, args.depth, args.heads, group_sizes=group_sizes, device=args.device, dtype=args.param_dtype
    )
    if method in ("dense", "loop"):
        for block in layer.blocks:
            block.attend = dense_attend if method == "dense" else loop_attend
    else:
        layer.backend = method
    return layer


def step_fn(layer, x) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPE, enabled=AUTOCAST_DTYPE is not None):
            out = layer(x)
        out.float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak memory one step adds above what was allocated before it (None if not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _status_kib("VmRSS")
        step()
        return (_status_kib("VmHWM") - base) * 1024
    except OSError:
        return None


def mask_bytes(method: str, b: int, h: int, n: int) -> int:
    """Bytes of the boolean mask each method builds (analytic)."""
    return {"dense": b * h * n * n, "sdpa": n * n}.get(method, 0)


def methods_for(args, group_sizes: list[int]) -> list[str]:
    probe = torch.empty(1, args.heads, sum(group_sizes), args.dim // args.heads, device=args.device, dtype=AUTOCAST_DTYPE or args.param_dtype)
    methods = ["dense", "loop", "auto"]
    for backend in ("fold", "padded_fold", "sdpa", "xformers"):
        if backend == "xformers" and args.device.type != "cuda":
            continue
        reasons = backend_support(backend, probe, group_sizes)
        if reasons:
            SKIPPED.setdefault(backend, set()).add("; ".join(reasons))
        else:
            methods.append(backend)
    return methods


SKIPPED: dict[str, set] = {}
FAILED: dict[str, set] = {}
AUTOCAST_DTYPE: Optional[torch.dtype] = None


def run(args) -> dict:
    rows = []
    for groups in args.groups:
        for n in args.tokens:
            sizes = equal_split(n, groups)
            x = torch.randn(args.batch, n, args.dim, device=args.device, dtype=args.param_dtype, requires_grad=True)
            probe = torch.empty(1, args.heads, n, args.dim // args.heads, device=args.device, dtype=AUTOCAST_DTYPE or args.param_dtype)
            auto_is = select_backend("auto", probe, sizes)
            steps, failed = {}, {}
            for method in methods_for(args, sizes):
                torch.manual_seed(0)
                steps[method] = step_fn(make_layer(method, args, sizes), x)
            # Round-robin: every round runs each method once, so the load of a shared machine
            # hits all methods alike; ratios are taken within a round, then the median.
            times: dict[str, list[float]] = {m: [] for m in steps}
            for round_ in range(args.warmup + args.repeats):
                for method, step in list(steps.items()):
                    try:
                        start = time.perf_counter()
                        step()
                        elapsed = time.perf_counter() - start
                    except Exception as err:  # e.g. xformers kernels that fail to load: report, go on
                        failed[method] = f"{type(err).__name__}: {str(err)[:300]}"
                        print(f"  {method} failed at N={n}, G={groups}: {failed[method]}")
                        del steps[method], times[method]
                        continue
                    if round_ >= args.warmup:
                        times[method].append(elapsed)
            results = {}
            for method, step in steps.items():
                dense_times = times["dense"]
                results[method] = {
                    "median_s": statistics.median(times[method]),
                    "times_s": times[method],
                    "time_vs_dense": statistics.median(t / d for t, d in zip(times[method], dense_times)),
                    "peak_bytes": peak_bytes(step, args.device),
                    "mask_bytes": mask_bytes(method, args.batch, args.heads, n),
                }
            del steps
            dense = results["dense"]
            for r in results.values():
                r["peak_vs_dense"] = (
                    r["peak_bytes"] / dense["peak_bytes"] if r["peak_bytes"] and dense["peak_bytes"] else None
                )
            for method, reason in failed.items():
                FAILED.setdefault(method, set()).add(reason)
            rows.append({"N": n, "G": groups, "group_sizes": sizes, "auto_is": auto_is, "methods": results})
            print_row(rows[-1])
    return {"rows": rows}


def mib(b: Optional[int]) -> str:
    return "   n/a" if b is None else f"{b / 2**20:6.1f}"


def print_header() -> None:
    print(f"{'N':>5} {'G':>2} {'method':>9} {'median ms':>10} {'x dense':>8} {'peak MiB':>9} {'x dense':>8} {'mask MiB':>9}")


def print_row(row: dict) -> None:
    for method, r in row["methods"].items():
        label = f"auto={row['auto_is']}" if method == "auto" else method
        ratio_mem = "     n/a" if r["peak_vs_dense"] is None else f"{r['peak_vs_dense']:8.2f}"
        print(
            f"{row['N']:>5} {row['G']:>2} {label:>9} {r['median_s'] * 1e3:10.1f} {r['time_vs_dense']:8.2f} "
            f"{mib(r['peak_bytes']):>9} {ratio_mem} {mib(r['mask_bytes']):>9}"
        )
    sys.stdout.flush()


def goals(rows: list[dict]) -> list[dict]:
    found = []
    for row in rows:
        m = row["methods"]
        if "auto" not in m:
            continue
        auto = m["auto"]
        tag = f"N={row['N']}, G={row['G']} (auto={row['auto_is']})"
        if "loop" in m:
            ratio = auto["time_vs_dense"] / m["loop"]["time_vs_dense"]
            found.append({"goal": f"auto no slower than the Python loop, {tag}", "value": ratio, "limit": 1.0})
        if row["N"] != GOAL_N:
            continue
        if row["G"] == 2:
            found.append({"goal": f"auto <= {GOAL_SPEED_G2}x dense time (issue 2), {tag}", "value": auto["time_vs_dense"], "limit": GOAL_SPEED_G2})
        found.append({"goal": f"auto <= 1.1/G x dense time (issue 5), {tag}", "value": auto["time_vs_dense"], "limit": 1.1 / row["G"]})
        if auto["peak_vs_dense"] is not None:
            found.append({"goal": f"auto peak memory <= {GOAL_MEMORY}x dense (issue 5), {tag}", "value": auto["peak_vs_dense"], "limit": GOAL_MEMORY})
    for g in found:
        g["met"] = g["value"] <= g["limit"]
    return found


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def plot(path: Path, rows: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'umilayers[train]'): no plot")
        return
    groups = sorted({r["G"] for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, g in enumerate(groups):
        sub = [r for r in rows if r["G"] == g]
        methods = sorted({m for r in sub for m in r["methods"]})
        for method in methods:
            pts = [(r["N"], r["methods"][method]) for r in sub if method in r["methods"]]
            ns = [p[0] for p in pts]
            axes[0][col].plot(ns, [p[1]["time_vs_dense"] for p in pts], marker="o", label=method)
            mem = [(n, p["peak_vs_dense"]) for n, p in pts if p["peak_vs_dense"] is not None]
            if mem:
                axes[1][col].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=method)
        axes[0][col].axhline(1.1 / g, color="grey", linestyle="--", linewidth=0.8, label="1.1/G goal")
        axes[1][col].axhline(GOAL_MEMORY, color="grey", linestyle="--", linewidth=0.8, label="0.6 goal")
        axes[0][col].set_title(f"G={g}: time / dense-masked")
        axes[1][col].set_title(f"G={g}: peak memory / dense-masked")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N tokens")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    global AUTOCAST_DTYPE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype; bfloat16/float16 run under torch.autocast with float32 parameters")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 258, 514, 1026])
    p.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier on a shared machine; 0 = torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke size: B=2, N in {64, 130}, G=2, 3 repeats")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--name", default="attention", help="results/<name>.json and .png")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.tokens, args.groups, args.repeats = 2, [64, 130], [2], 3
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if args.threads and args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.param_dtype = torch.float32
    AUTOCAST_DTYPE = None if args.dtype == "float32" else getattr(torch, args.dtype)

    machine = (
        torch.cuda.get_device_name(args.device)
        if args.device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    title = (f"GroupMaskedTransformer fwd+bwd, B={args.batch}, D={args.dim}, H={args.heads}, depth={args.depth}, "
             f"{args.dtype}, {args.device.type} ({machine}), median of {args.repeats}")
    print(title)
    print_header()
    started = time.perf_counter()
    result = run(args)
    found = goals(result["rows"])
    print("\nGoals:")
    for g in found:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.2f} (limit {g['limit']:.2f})")
    for backend, reasons in FAILED.items():
        for reason in sorted(reasons):
            print(f"  FAILED: {backend}: {reason}")
    for backend, reasons in SKIPPED.items():
        for reason in sorted(reasons):
            print(f"  note: {backend} not run where unsupported: {reason}")
    payload = {
        "title": title,
        "config": {k: str(v) for k, v in vars(args).items() if k != "no_reexec"},
        "machine": machine,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        "rows": result["rows"],
        "goals": found,
        "skipped": {k: sorted(v) for k, v in SKIPPED.items()},
        "failed": {k: sorted(v) for k, v in FAILED.items()},
    }
    write_json(args.out / f"{args.name}.json", payload)
    plot(args.out / f"{args.name}.png", result["rows"], title)
    print(f"wrote {args.out / (args.name + '.json')} and .png in {payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
