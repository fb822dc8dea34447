"""PseudoLabelBank at EPIC-Kitchens size: resident memory, update/lookup throughput, bytes on disk.

Each storage mode (in memory, memmap) runs in its own subprocess, so its peak resident memory
(``VmHWM`` of ``/proc/self/status``, reset after importing torch with ``/proc/self/clear_refs``;
``ru_maxrss`` elsewhere) is not mixed with the other mode's. The figure reported is the peak
minus the resident size right after importing torch and building the inputs. It counts the
process's anonymous memory and the pages of files it has mapped; it does not count the kernel's
page cache of files the process reads and writes with system calls. The "memmap" mode
(``storage=path``) writes its means that way (positioned I/O; only the 8-byte epoch masks are
mapped), so the script also reports how much of the bank's files sits in the page cache after
the timed work (``mincore``, Linux): memory the kernel holds for the files, shared, written back
in the background and reclaimable, but still memory of the machine (a memory cgroup counts it).

In each mode: ``--epochs`` epochs of updates (every sample, every modality, batches of
``--batch`` in a random order, softmax-like predictions), timed per epoch (the first epoch
also pays the page faults of fresh memory or a fresh sparse file); then a lookup of
every sample with both modalities present and a class label as ground truth (the cosine
selection path). Goals (issue 5): in memory <= 1 GB, memmap <= 300 MB resident, one epoch of
updates < 10 s.

Bytes on disk are compared with the authors' released code's approach: one ``[E, C]`` float32
``.npy`` per sample (``E = window`` epochs). Its size is computed exactly from the ``.npy``
header and measured on a sample of real files (``st_size`` and allocated blocks), then scaled
to ``N`` files (one per sample, as in EPIC's modality-incomplete training set where each sample
has one modality) and to ``N * M`` files (the same content as the bank: every modality of every
sample).

Usage::

    python benchmarks/pseudo_bank.py            # EPIC size: 62,429 x 3,806, 2 modalities
    python benchmarks/pseudo_bank.py --quick    # CI smoke test (small N and C, < 20 s)

Writes ``results/pseudo_bank.json`` and ``results/pseudo_bank.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"memory_mb": 1000.0, "memmap_mb": 300.0, "epoch_s": 10.0}


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


def worker(args) -> dict:
    """Runs in a subprocess: one storage mode, returns its figures as a dict."""
    import torch

    sys.path.insert(0, str(ROOT))
    from umilayers.pseudo_labels import PseudoLabelBank

    torch.set_num_threads(args.threads)
    n, c, batch = args.samples, args.classes, args.batch
    modalities = [f"m{i}" for i in range(args.modalities)]
    gen = torch.Generator().manual_seed(0)
    # one batch of predictions reused for every update: generating them is not what we time
    preds = torch.softmax(torch.randn(batch, c, generator=gen) * 3, dim=-1)
    labels = torch.randint(0, c, (n,), generator=gen)
    orders = [torch.randperm(n, generator=gen) for _ in range(args.epochs)]
    baseline_rss = _status_kb("VmRSS") or _peak_kb()
    reset = _reset_peak()
    baseline = baseline_rss if reset else _peak_kb()

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        storage = Path(tmp) / "bank" if args.worker == "memmap" else None
        t0 = time.perf_counter()
        bank = PseudoLabelBank(n, c, modalities, window=args.window,
                               total_epochs=args.window, storage=storage)
        create_s = time.perf_counter() - t0
        epoch_s, epoch_cpu_s = [], []
        for epoch in range(args.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            for m in modalities:
                for start in range(0, n, batch):
                    ids = orders[epoch][start:start + batch]
                    bank.update(m, ids, preds[: ids.numel()], epoch)
            epoch_s.append(time.perf_counter() - t0)
            epoch_cpu_s.append(time.process_time() - c0)
        present = {m: torch.ones(batch, dtype=torch.bool) for m in modalities}
        t0, c0 = time.perf_counter(), time.process_time()
        checksum = 0.0
        for start in range(0, n, batch):
            ids = torch.arange(start, min(n, start + batch))
            mask = {m: p[: ids.numel()] for m, p in present.items()}
            out = bank.targets(ids, mask, ground_truth=labels[ids])
            checksum += float(out[:, 0].sum())
        lookup_s = time.perf_counter() - t0
        lookup_cpu_s = time.process_time() - c0
        disk = None
        peak = _peak_kb()
        rss_file = _status_kb("RssFile")
        if storage is not None:
            files = list(storage.iterdir())
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
        "mode": args.worker,
        "peak_rss_mb": (peak - baseline) / 1024,
        "baseline_rss_mb": baseline_rss / 1024,
        "peak_reset": reset,
        "rss_file_mb_at_end": None if rss_file is None else rss_file / 1024,
        "nbytes": nbytes,
        "create_s": create_s,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "updates_per_s": n * len(modalities) / min(epoch_s),
        "lookup_s": lookup_s,
        "lookup_cpu_s": lookup_cpu_s,
        "lookups_per_s": n / lookup_s,
        "disk": disk,
        "checksum": checksum,
        "estimate_nbytes": PseudoLabelBank.estimate_nbytes(n, c, len(modalities), torch.float16),
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
        "one_per_sample_and_modality": {
            "files": n * modalities,
            "size": n * modalities * per_file,
            "allocated": n * modalities * sum(blocks) / len(blocks),
        },
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

    modes = result["modes"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [m["mode"] for m in modes]
    axes[0].bar(names, [m["peak_rss_mb"] for m in modes], color=["C0", "C1"])
    for goal, label in ((GOALS["memory_mb"], "goal in memory"), (GOALS["memmap_mb"], "goal memmap")):
        axes[0].axhline(goal, ls="--", lw=1, color="gray")
        axes[0].text(-0.4, goal, label, va="bottom", fontsize=8)
    axes[0].set_ylabel("peak resident memory above baseline (MB)")
    axes[1].bar(names, [max(m["epoch_s"]) for m in modes], color=["C0", "C1"])
    axes[1].axhline(GOALS["epoch_s"], ls="--", lw=1, color="gray")
    axes[1].set_ylabel("one epoch of updates, slowest (s)")
    rel = result["released"]
    disk_names = ["bank (fp16)", "released\n(N files)", "released\n(N*M files)"]
    disk = [result["bank_bytes"] / 1e9, rel["one_per_sample"]["size"] / 1e9,
            rel["one_per_sample_and_modality"]["size"] / 1e9]
    axes[2].bar(disk_names, disk, color=["C2", "C3", "C3"])
    axes[2].set_ylabel("bytes on disk (GB)")
    fig.suptitle(f"PseudoLabelBank, N={result['config']['samples']:,}, "
                 f"C={result['config']['classes']:,}, M={result['config']['modalities']}, "
                 f"window={result['config']['window']} ({result['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=110)
    os.replace(path.with_suffix(".tmp.png"), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke test")
    parser.add_argument("--samples", type=int, default=62_429)
    parser.add_argument("--classes", type=int, default=3_806)
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of updates timed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the workers (the bank's work is memory-bound; on a "
                             "shared machine extra threads mostly wait for each other)")
    parser.add_argument("--released-sample", type=int, default=200,
                        help="released-approach files written to measure their size")
    parser.add_argument("--tmpdir", default=None, help="where the memmap files go")
    parser.add_argument("--out", type=Path, default=ROOT / "results",
                        help="folder for pseudo_bank.json and .png (quick: pseudo_bank_quick.*)")
    parser.add_argument("--worker", choices=["memory", "memmap"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.classes, args.epochs, args.released_sample = 2_000, 256, 2, 20

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    load_before = os.getloadavg()[0]
    modes = []
    for mode in ("memory", "memmap"):
        cmd = [sys.executable, __file__, "--worker", mode, "--samples", str(args.samples),
               "--classes", str(args.classes), "--modalities", str(args.modalities),
               "--window", str(args.window), "--batch", str(args.batch),
               "--epochs", str(args.epochs), "--threads", str(args.threads)]
        if args.tmpdir:
            cmd += ["--tmpdir", args.tmpdir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            raise SystemExit(f"worker {mode} failed with exit code {proc.returncode}")
        modes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert all(m["nbytes"] == m["estimate_nbytes"] for m in modes), modes
    if abs(modes[0]["checksum"] - modes[1]["checksum"]) > 1e-6 * max(1.0, abs(modes[0]["checksum"])):
        raise SystemExit(f"memory and memmap lookups differ: {modes[0]['checksum']} vs {modes[1]['checksum']}")

    bank_bytes = modes[0]["nbytes"]  # the parent never imports torch: it is slow to import
    released = released_files(args.samples, args.classes, args.window, args.modalities,
                              args.released_sample, args.tmpdir)
    result = {
        "config": {"samples": args.samples, "classes": args.classes, "modalities": args.modalities,
                   "window": args.window, "batch": args.batch, "epochs": args.epochs,
                   "threads": args.threads,
                   "dtype": "float16", "quick": args.quick},
        "machine": {"cpus": os.cpu_count(), "torch_threads": modes[0]["torch_threads"],
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": modes[0]["torch"],
                    "load_average_1min_before_after": [load_before, os.getloadavg()[0]]},
        "goals": GOALS,
        "modes": modes,
        "bank_bytes": bank_bytes,
        "released": released,
        "command": " ".join([Path(sys.executable).name, "benchmarks/pseudo_bank.py", *(argv or sys.argv[1:])]),
    }

    rows = [["mode", "peak RSS (MB)", "goal (MB)", "epoch of updates: wall (s)", "CPU (s)",
             "updates/s", "lookups/s", "lookup CPU (s)", "bank bytes", "on disk (alloc.)",
             "page cache"]]
    for m in modes:
        goal = GOALS["memory_mb"] if m["mode"] == "memory" else GOALS["memmap_mb"]
        rows.append([
            m["mode"], f"{m['peak_rss_mb']:.0f}", f"{goal:.0f}",
            " / ".join(f"{s:.2f}" for s in m["epoch_s"]),
            " / ".join(f"{s:.2f}" for s in m["epoch_cpu_s"]), f"{m['updates_per_s']:,.0f}",
            f"{m['lookups_per_s']:,.0f}", f"{m['lookup_cpu_s']:.2f}", f"{m['nbytes'] / 1e6:,.1f} MB",
            "-" if m["disk"] is None else f"{m['disk']['allocated'] / 1e6:,.1f} MB",
            "-" if m["disk"] is None or m["disk"]["page_cache"] is None
            else f"{m['disk']['page_cache'] / 1e6:,.1f} MB",
        ])
    print(f"PseudoLabelBank: N={args.samples:,} C={args.classes:,} M={args.modalities} "
          f"window={args.window} batch={args.batch}, float16; {os.cpu_count()} CPUs, "
          f"{modes[0]['torch_threads']} torch threads, load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(_table(rows))
    print(f"(epoch of updates = every sample x {args.modalities} modalities; goal < "
          f"{GOALS['epoch_s']:.0f} s; peak RSS above the process after importing torch; page "
          f"cache: the bank's files held by the kernel after the timed work, not in the RSS)")
    print()
    disk_rows = [["layout", "files", "bytes", "allocated", "vs bank"],
                 ["PseudoLabelBank fp16 (running mean + epoch mask)", str(2 * args.modalities + 1),
                  f"{bank_bytes / 1e9:.3f} GB", "-", "1.0x"]]
    for key, label in (("one_per_sample", "released: [E, C] float32 .npy per sample"),
                       ("one_per_sample_and_modality", "released: per sample and modality")):
        r = released[key]
        disk_rows.append([label, f"{r['files']:,}", f"{r['size'] / 1e9:.3f} GB",
                          f"{r['allocated'] / 1e9:.3f} GB", f"{r['size'] / bank_bytes:.1f}x"])
    print(_table(disk_rows))
    print(f"(released file: {released['header_bytes']} B header + {released['data_bytes_per_file']:,} B "
          f"data = {released['file_bytes']:,} B, {released['allocated_bytes_per_file']:,.0f} B allocated, "
          f"measured on {released['files_measured']} files)")

    out = args.out / ("pseudo_bank_quick.json" if args.quick else "pseudo_bank.json")
    _atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
