"""PseudoLabelBank at EPIC-Kitchens size: peak memory of each row layout, update/lookup speed, disk.

The workload is the paper's modality-incomplete training: ``--modalities`` training splits of
equal size, each with one modality (EPIC: half the samples rgb only, half audio only), so each
sample has one (sample, modality) pair. Every epoch updates each modality with the predictions
of its split's samples (batches of ``--batch`` in a random order, softmax-like predictions);
then every sample's pseudo-label is looked up. ``--pairs all`` gives every sample every
modality instead (the workload of the first benchmark, with the cosine choice in lookups).

Variants, each in its own fresh subprocess so that its peak resident memory (``VmHWM`` of
``/proc/self/status``, reset after importing torch and building the inputs through
``/proc/self/clear_refs``; ``ru_maxrss`` elsewhere) is its own:

- ``full``: a row for every sample and modality, the layout of bank format version 1 (here
  ``present=`` with every pair, so the same code runs both layouts);
- ``learned``: the default constructor: a row is added when a pair is first recorded;
- ``told``: ``present=`` the pairs that exist, allocated at once;
- ``file-full`` and ``file``: file-backed (``storage=path``), every pair or learned;
- ``old-code`` (only with ``--old-code FILE``): another implementation of ``PseudoLabelBank``,
  e.g. the bank before this layout (``git show <rev>:umilayers/pseudo_labels.py > FILE``), as a
  cross-check of ``full``.

The figure reported is the peak minus the resident set before the bank is built. It counts the
process's anonymous memory and the pages of files it maps; not the kernel's page cache of the
files the file-backed modes read and write with system calls, which is reported separately
(``mincore``, Linux): memory of the machine (shared, written back in the background,
reclaimable; a memory cgroup counts it) but not of the process. Every variant must give the same
targets bit for bit (a SHA-256 of all of them); the script stops if they differ.

Goals: the bank at half, ``learned`` <= 600 MB (10^6 bytes) peak at EPIC size with two
training splits, with the file-backed resident size unchanged (``file`` against ``file-full``);
file-backed <= 300 MB resident; one epoch of updates < 10 s.

Bytes on disk are also compared with the authors' released code's approach: one ``[E, C]``
float32 ``.npy`` per sample (``E = window`` epochs), its size computed from the ``.npy`` header
and measured on a sample of real files.

Usage::

    python benchmarks/pseudo_bank.py            # EPIC size: 62,429 x 3,806, 2 splits, ~2 min
    python benchmarks/pseudo_bank.py --quick    # CI smoke test (small N and C, seconds)
    git show main:umilayers/pseudo_labels.py > /tmp/old.py
    python benchmarks/pseudo_bank.py --old-code /tmp/old.py

Writes ``results/pseudo_bank.json`` and ``results/pseudo_bank.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (imports no torch: the parent process never does)

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"learned_mb": 600.0, "file_mb": 300.0, "epoch_s": 10.0}
VARIANTS = ("full", "learned", "told", "file-full", "file")
MB = 1e6  # figures in MB of 10^6 bytes, as the goals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_bytes as _atomic_write  # noqa: E402
from _common import peak_rss_kib as _peak_kb  # noqa: E402
from _common import reset_peak_rss as _reset_peak  # noqa: E402
from _common import status_kib as _status_kb  # noqa: E402
from _common import table as _table  # noqa: E402


# ----------------------------------------------------------------------------- worker


def page_cache_bytes(path: Path) -> Optional[int]:
    """Bytes of ``path`` in the kernel's page cache (``mincore`` on a mapping never touched)."""
    import ctypes
    import mmap

    import numpy as np

    size = path.stat().st_size
    if size == 0:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable: from_buffer needs it
    try:
        buffer = (ctypes.c_char * size).from_buffer(mm)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        rc = mincore(ctypes.addressof(buffer), size, vec)
        del buffer
    finally:
        mm.close()
    if rc != 0:
        return None
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE


def _bank_class(args):
    if args.worker == "old-code":
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_pseudo_labels", args.old_code)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.PseudoLabelBank
    from umilayers.pseudo_labels import PseudoLabelBank

    return PseudoLabelBank


def _owner(n: int, modalities: int, pairs: str):
    """``(N, M)`` bool: which modalities each sample has (equal contiguous splits, or all)."""
    import torch

    if pairs == "all":
        return torch.ones(n, modalities, dtype=torch.bool)
    split = torch.arange(n) * modalities // n  # split j holds samples j*N/M .. (j+1)*N/M - 1
    return torch.nn.functional.one_hot(split, modalities).bool()


def worker(args) -> dict:
    """Runs in a subprocess: one variant, returns its figures as a dict."""
    import torch

    sys.path.insert(0, str(ROOT))
    bank_class = _bank_class(args)
    _common.set_threads(args.threads)
    n, c, batch = args.samples, args.classes, args.batch
    modalities = [f"m{i}" for i in range(args.modalities)]
    has = _owner(n, len(modalities), args.pairs)
    gen = torch.Generator().manual_seed(0)
    # one batch of predictions reused for every update: generating them is not what we time
    preds = torch.softmax(torch.randn(batch, c, generator=gen) * 3, dim=-1)
    labels = torch.randint(0, c, (n,), generator=gen)
    ids = {m: has[:, j].nonzero().flatten() for j, m in enumerate(modalities)}
    orders = [{m: ids[m][torch.randperm(ids[m].numel(), generator=gen)] for m in modalities}
              for _ in range(args.epochs)]
    baseline_rss = _status_kb("VmRSS") or _peak_kb()
    reset = _reset_peak()
    baseline = baseline_rss if reset else _peak_kb()

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        kwargs = {}
        if args.worker.startswith("file"):
            kwargs["storage"] = Path(tmp) / "bank"
        if args.worker.endswith("full"):
            kwargs["present"] = {m: torch.ones(n, dtype=torch.bool) for m in modalities}
        elif args.worker == "told":
            kwargs["present"] = {m: has[:, j] for j, m in enumerate(modalities)}
        t0 = time.perf_counter()
        bank = bank_class(n, c, modalities, window=args.window, total_epochs=args.window, **kwargs)
        create_s = time.perf_counter() - t0
        epoch_s, epoch_cpu_s = [], []
        for epoch in range(args.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            for m in modalities:
                order = orders[epoch][m]
                for start in range(0, order.numel(), batch):
                    chunk = order[start:start + batch]
                    bank.update(m, chunk, preds[: chunk.numel()], epoch)
            epoch_s.append(time.perf_counter() - t0)
            epoch_cpu_s.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        digest = hashlib.sha256()
        for start in range(0, n, batch):
            rows = torch.arange(start, min(n, start + batch))
            present = {m: has[rows, j] for j, m in enumerate(modalities)}
            out = bank.targets(rows, present, ground_truth=labels[rows])
            digest.update(out.numpy().tobytes())
        lookup_s = time.perf_counter() - t0
        lookup_cpu_s = time.process_time() - c0
        peak = _peak_kb()
        disk = None
        if "storage" in kwargs:
            files = list(kwargs["storage"].iterdir())
            cached = [page_cache_bytes(f) for f in files]
            t0 = time.perf_counter()
            bank.flush()
            flush_s = time.perf_counter() - t0
            disk = {
                "size": sum(f.stat().st_size for f in files),
                "allocated": sum(f.stat().st_blocks * 512 for f in files),
                "page_cache": None if None in cached else sum(cached),
                "flush_s": flush_s,
            }
        nbytes = bank.nbytes
        bank.close()
    return {
        "variant": args.worker,
        "peak_rss_mb": (peak - baseline) * 1024 / MB,
        "baseline_rss_mb": baseline_rss * 1024 / MB,
        "peak_reset": reset,
        "nbytes": nbytes,
        "pairs": int(has.sum()),
        "create_s": create_s,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "updates_per_s": int(has.sum()) / min(epoch_s),
        "lookup_s": lookup_s,
        "lookup_cpu_s": lookup_cpu_s,
        "lookups_per_s": n / lookup_s,
        "disk": disk,
        "targets_sha256": digest.hexdigest(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- released approach


def released_files(n: int, c: int, epochs: int, modalities: int, sample: int, tmpdir) -> dict:
    """Bytes of one ``[E, C]`` float32 ``.npy`` per sample: exact header maths + measured files."""
    import numpy as np

    array = np.zeros((epochs, c), dtype=np.float32)
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        paths = []
        for i in range(sample):
            path = Path(tmp) / f"{i:07d}.npy"
            array[:] = np.float32(i)  # real data, so the filesystem cannot keep it sparse
            np.save(path, array)
            paths.append(path)
        sizes = [p.stat().st_size for p in paths]
        blocks = [p.stat().st_blocks * 512 for p in paths]
    data = epochs * c * 4
    per_file = sizes[0]
    assert all(s == per_file for s in sizes)
    return {
        "epochs": epochs,
        "data_bytes_per_file": data,
        "file_bytes": per_file,
        "header_bytes": per_file - data,
        "allocated_bytes_per_file": sum(blocks) / len(blocks),
        "files_measured": sample,
        "one_per_sample": {"files": n, "size": n * per_file, "allocated": n * sum(blocks) / len(blocks)},
    }


# ----------------------------------------------------------------------------- report


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["variants"]
    names = [r["variant"] for r in runs]
    colors = ["C1" if name.startswith("file") else "C0" for name in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(names, [r["peak_rss_mb"] for r in runs], color=colors)
    for goal, label in ((GOALS["learned_mb"], "goal: learned, in memory"),
                        (GOALS["file_mb"], "goal: file-backed, resident")):
        axes[0].axhline(goal, ls="--", lw=1, color="gray")
        axes[0].text(-0.4, goal, label, va="bottom", fontsize=8)
    axes[0].set_ylabel("peak resident memory above baseline (MB)")
    axes[1].bar(names, [max(r["epoch_s"]) for r in runs], color=colors)
    axes[1].axhline(GOALS["epoch_s"], ls="--", lw=1, color="gray")
    axes[1].set_ylabel("one epoch of updates, slowest (s)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    cfg = result["config"]
    fig.suptitle(f"PseudoLabelBank, N={cfg['samples']:,}, C={cfg['classes']:,}, "
                 f"M={cfg['modalities']} ({cfg['pairs']} pairs), window={cfg['window']}, "
                 f"{result['machine']['cpus']} CPUs, load {result['machine']['load_average_1min_before_after'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=110)
    os.replace(path.with_suffix(".tmp.png"), path)


def _worker_threads(args) -> int:
    """The workers' ``--threads``: the parent's, or the benchmarks' default (the parent imports no torch)."""
    return _common.default_threads() if args.threads is None else args.threads


def _run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--samples", str(args.samples),
           "--classes", str(args.classes), "--modalities", str(args.modalities),
           "--window", str(args.window), "--batch", str(args.batch), "--epochs", str(args.epochs),
           "--threads", str(_worker_threads(args)), "--pairs", args.pairs]
    if args.tmpdir:
        cmd += ["--tmpdir", args.tmpdir]
    if args.old_code:
        cmd += ["--old-code", str(args.old_code)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"worker {variant} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verdicts(by: dict) -> dict:
    learned, file, file_full = by["learned"], by["file"], by["file-full"]
    return {
        "learned_vs_full_peak": learned["peak_rss_mb"] / by["full"]["peak_rss_mb"],
        "told_vs_full_peak": by["told"]["peak_rss_mb"] / by["full"]["peak_rss_mb"],
        "file_vs_file_full_peak": file["peak_rss_mb"] / file_full["peak_rss_mb"],
        "learned_goal_met": learned["peak_rss_mb"] <= GOALS["learned_mb"],
        "file_goal_met": max(file["peak_rss_mb"], file_full["peak_rss_mb"]) <= GOALS["file_mb"],
        "epoch_goal_met": max(max(r["epoch_s"]) for r in by.values()) < GOALS["epoch_s"],
        "same_targets": len({r["targets_sha256"] for r in by.values()}) == 1,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke test")
    parser.add_argument("--samples", type=int, default=62_429)
    parser.add_argument("--classes", type=int, default=3_806)
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument("--pairs", choices=["split", "all"], default="split",
                        help="split: one training split per modality, each sample has one "
                             "(default, EPIC's setting); all: every sample has every modality")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of updates timed")
    _common.add_threads_option(parser)  # the workers' threads (the bank's work is memory-bound)
    parser.add_argument("--old-code", type=Path, default=None,
                        help="a pseudo_labels.py to run as the extra variant 'old-code' (full layout)")
    parser.add_argument("--released-sample", type=int, default=200,
                        help="released-approach files written to measure their size")
    parser.add_argument("--tmpdir", default=None, help="where the file-backed banks go")
    parser.add_argument("--out", type=Path, default=ROOT / "results",
                        help="folder for pseudo_bank.json and .png (quick: pseudo_bank_quick.*)")
    parser.add_argument("--worker", choices=[*VARIANTS, "old-code"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.classes, args.epochs, args.released_sample = 2_000, 256, 2, 20
    if args.old_code is not None and not args.old_code.is_file():
        parser.error(f"--old-code: no such file: {args.old_code}")

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    load_before = os.getloadavg()[0]
    variants = [*VARIANTS, *(["old-code"] if args.old_code else [])]
    runs = [_run_variant(args, v) for v in variants]
    by = {r["variant"]: r for r in runs}
    verdicts = _verdicts(by)
    if not verdicts["same_targets"]:
        raise SystemExit("the variants' targets differ: " + ", ".join(
            f"{r['variant']} {r['targets_sha256'][:12]}" for r in runs))

    released = released_files(args.samples, args.classes, args.window, args.modalities,
                              args.released_sample, args.tmpdir)
    load_after = os.getloadavg()[0]
    result = {
        "config": {"samples": args.samples, "classes": args.classes, "modalities": args.modalities,
                   "pairs": args.pairs, "window": args.window, "batch": args.batch,
                   "epochs": args.epochs, "threads": _worker_threads(args), "dtype": "float16",
                   "quick": args.quick, "old_code": str(args.old_code) if args.old_code else None},
        "machine": {"cpus": os.cpu_count(), "torch_threads": runs[0]["torch_threads"],
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": runs[0]["torch"],
                    "date": time.strftime("%Y-%m-%d"),
                    "load_average_1min_before_after": [load_before, load_after]},
        "goals": GOALS,
        "variants": runs,
        "verdicts": verdicts,
        "released": released,
        "command": " ".join([Path(sys.executable).name, "benchmarks/pseudo_bank.py", *(argv or sys.argv[1:])]),
    }

    rows = [["variant", "peak RSS (MB)", "bank bytes (MB)", "epoch of updates: wall (s)",
             "CPU (s)", "updates/s", "lookups/s", "on disk (alloc., MB)", "page cache (MB)"]]
    for r in runs:
        disk = r["disk"]
        rows.append([
            r["variant"], f"{r['peak_rss_mb']:.0f}", f"{r['nbytes'] / MB:,.1f}",
            " / ".join(f"{s:.2f}" for s in r["epoch_s"]),
            " / ".join(f"{s:.2f}" for s in r["epoch_cpu_s"]), f"{r['updates_per_s']:,.0f}",
            f"{r['lookups_per_s']:,.0f}",
            "-" if disk is None else f"{disk['allocated'] / MB:,.1f}",
            "-" if disk is None or disk["page_cache"] is None else f"{disk['page_cache'] / MB:,.1f}",
        ])
    print(f"PseudoLabelBank: N={args.samples:,} C={args.classes:,} M={args.modalities} "
          f"pairs={args.pairs} ({runs[0]['pairs']:,}) window={args.window} batch={args.batch}, "
          f"float16; {os.cpu_count()} CPUs, {runs[0]['torch_threads']} torch threads, load "
          f"average {load_before:.1f} -> {load_after:.1f}")
    print(_table(rows))
    print("(MB = 10^6 bytes; peak RSS above the process before the bank is built; page cache: "
          "the bank's files held by the kernel after the timed work, not in the RSS)")
    v = verdicts
    print(f"learned / full peak: {v['learned_vs_full_peak']:.2f}x, told / full: "
          f"{v['told_vs_full_peak']:.2f}x, file / file-full resident: {v['file_vs_file_full_peak']:.2f}x; "
          f"targets bit-identical across variants: {v['same_targets']}")
    print(f"goals{' (judged at EPIC size, not at --quick size)' if args.quick else ''}: "
          f"learned <= {GOALS['learned_mb']:.0f} MB: "
          f"{'met' if v['learned_goal_met'] else 'MISSED'}; file-backed <= {GOALS['file_mb']:.0f} MB "
          f"resident: {'met' if v['file_goal_met'] else 'MISSED'}; epoch < {GOALS['epoch_s']:.0f} s: "
          f"{'met' if v['epoch_goal_met'] else 'MISSED'}")
    one = released["one_per_sample"]
    print(f"disk: released code, one [E, C] float32 .npy per sample: {one['files']:,} files, "
          f"{one['size'] / 1e9:.2f} GB ({released['file_bytes']:,} B each, measured on "
          f"{released['files_measured']} files); bank file-backed: "
          f"{by['file']['disk']['size'] / 1e9:.2f} GB ({one['size'] / by['file']['disk']['size']:.1f}x less)")

    out = args.out / ("pseudo_bank_quick.json" if args.quick else "pseudo_bank.json")
    _atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
