"""PseudoLabelBank at EPIC-Kitchens size: peak memory, update/lookup speed, bytes on disk.

Two workloads, each in its own fresh subprocess so that its peak resident memory (``VmHWM`` of
``/proc/self/status``, reset after importing torch and building the inputs through
``/proc/self/clear_refs``; ``ru_maxrss`` elsewhere) is its own:

- ``split``: the paper's modality-incomplete training: ``--modalities`` training splits of
  equal size, each with one modality (EPIC: half the samples rgb only, half audio only), so
  each sample has one (sample, modality) pair;
- ``all``: every sample has every modality (lookups then choose the modality closest to the
  ground truth).

Every epoch updates each modality with the predictions of its samples (batches of ``--batch``
in a random order, softmax-like predictions); then every sample's pseudo-label is looked up,
and the bank is saved (its bytes on disk and the time). The figure reported is the peak minus
the resident set before the bank is built.

``--old-code DIR`` runs the same workloads with the ``umilayers`` package of another source
tree (``git archive <rev> umilayers | tar -x -C DIR``) as extra variants ``old-split`` and
``old-all``: the targets of each workload must be the same bits (a SHA-256 of all of them), or
the script stops.

Goals: the bank at half (``split``) <= 600 MB (10^6 bytes) peak at EPIC size; every sample in
every modality (``all``) <= 1 GB; one epoch of updates < 10 s.

Bytes on disk are also compared with the authors' released code's approach: one ``[E, C]``
float32 ``.npy`` per sample (``E = window`` epochs), measured on a sample of real files.

Usage::

    python benchmarks/pseudo_bank.py            # EPIC size: 62,429 x 3,806, ~1 min
    python benchmarks/pseudo_bank.py --quick    # CI smoke test (small N and C, seconds)
    mkdir /tmp/old && git archive <rev> umilayers | tar -x -C /tmp/old
    python benchmarks/pseudo_bank.py --old-code /tmp/old

Writes ``results/pseudo_bank.json`` and ``results/pseudo_bank.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (imports no torch: the parent process never does)
from _common import atomic_write_bytes as _atomic_write  # noqa: E402
from _common import peak_rss_kib as _peak_kb  # noqa: E402
from _common import reset_peak_rss as _reset_peak  # noqa: E402
from _common import status_kib as _status_kb  # noqa: E402
from _common import table as _table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"split_mb": 600.0, "all_mb": 1000.0, "epoch_s": 10.0}
WORKLOADS = ("split", "all")
MB = 1e6  # figures in MB of 10^6 bytes, as the goals


# ----------------------------------------------------------------------------- worker


def _owner(n: int, modalities: int, pairs: str):
    """``(N, M)`` bool: which modalities each sample has (equal contiguous splits, or all)."""
    import torch

    if pairs == "all":
        return torch.ones(n, modalities, dtype=torch.bool)
    split = torch.arange(n) * modalities // n  # split j holds samples j*N/M .. (j+1)*N/M - 1
    return torch.nn.functional.one_hot(split, modalities).bool()


def worker(args) -> dict:
    """Runs in a subprocess (``umilayers`` on its ``PYTHONPATH``): one variant, returns its figures."""
    import torch

    from umilayers.pseudo_labels import PseudoLabelBank

    _common.set_threads(args.threads)
    pairs = args.worker.removeprefix("old-")
    n, c, batch = args.samples, args.classes, args.batch
    modalities = [f"m{i}" for i in range(args.modalities)]
    has = _owner(n, len(modalities), pairs)
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

    t0 = time.perf_counter()
    bank = PseudoLabelBank(n, c, modalities, window=args.window, total_epochs=args.window)
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
        digest.update(bank.targets(rows, present, ground_truth=labels[rows]).numpy().tobytes())
    lookup_s, lookup_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        t0 = time.perf_counter()
        bank.save(Path(tmp) / "bank")
        save_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (Path(tmp) / "bank").iterdir())
    peak = _peak_kb()
    return {
        "variant": args.worker,
        "code": str(Path(sys.modules[PseudoLabelBank.__module__].__file__).resolve()),
        "peak_rss_mb": (peak - baseline) * 1024 / MB,
        "baseline_rss_mb": baseline_rss * 1024 / MB,
        "peak_reset": reset,
        "nbytes": bank.nbytes,
        "pairs": int(has.sum()),
        "create_s": create_s,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "updates_per_s": int(has.sum()) / min(epoch_s),
        "lookup_s": lookup_s,
        "lookup_cpu_s": lookup_cpu_s,
        "lookups_per_s": n / lookup_s,
        "save_s": save_s,
        "disk_bytes": disk,
        "targets_sha256": digest.hexdigest(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- released approach


def released_files(n: int, c: int, epochs: int, sample: int, tmpdir) -> dict:
    """Bytes of one ``[E, C]`` float32 ``.npy`` per sample, measured on ``sample`` real files."""
    import numpy as np

    array = np.zeros((epochs, c), dtype=np.float32)
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        paths = []
        for i in range(sample):
            path = Path(tmp) / f"{i:07d}.npy"
            array[:] = np.float32(i)  # real data, so the filesystem cannot keep it sparse
            np.save(path, array)
            paths.append(path)
        sizes = {p.stat().st_size for p in paths}
        allocated = sum(p.stat().st_blocks * 512 for p in paths) / sample
    assert len(sizes) == 1
    per_file = sizes.pop()
    return {"epochs": epochs, "file_bytes": per_file, "header_bytes": per_file - epochs * c * 4,
            "allocated_bytes_per_file": allocated, "files_measured": sample,
            "one_per_sample": {"files": n, "size": n * per_file, "allocated": n * allocated}}


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
    colors = ["C1" if name.startswith("old-") else "C0" for name in names]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    axes[0].bar(names, [r["peak_rss_mb"] for r in runs], color=colors)
    for goal, label in ((GOALS["split_mb"], "goal: split"), (GOALS["all_mb"], "goal: all")):
        axes[0].axhline(goal, ls="--", lw=1, color="gray")
        axes[0].text(-0.4, goal, label, va="bottom", fontsize=8)
    axes[0].set_ylabel("peak resident memory above baseline (MB)")
    axes[1].bar(names, [max(r["epoch_s"]) for r in runs], color=colors)
    axes[1].axhline(GOALS["epoch_s"], ls="--", lw=1, color="gray")
    axes[1].set_ylabel("one epoch of updates, slowest (s)")
    cfg, machine = result["config"], result["machine"]
    fig.suptitle(f"PseudoLabelBank, N={cfg['samples']:,}, C={cfg['classes']:,}, M={cfg['modalities']}, "
                 f"window={cfg['window']}, {machine['cpus']} CPUs, "
                 f"load {machine['load_average_1min_before_after'][0]:.1f}")
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
           "--threads", str(_worker_threads(args))]
    if args.tmpdir:
        cmd += ["--tmpdir", args.tmpdir]
    if args.old_code:
        cmd += ["--old-code", str(args.old_code)]
    # the variant's umilayers (this tree's or --old-code's) is the only one the worker can import
    env = {**os.environ, "PYTHONPATH": str(args.old_code.resolve() if variant.startswith("old-") else ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"worker {variant} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verdicts(by: dict) -> dict:
    verdicts = {
        "split_goal_met": by["split"]["peak_rss_mb"] <= GOALS["split_mb"],
        "all_goal_met": by["all"]["peak_rss_mb"] <= GOALS["all_mb"],
        "split_vs_all_peak": by["split"]["peak_rss_mb"] / by["all"]["peak_rss_mb"],
        "epoch_goal_met": max(max(r["epoch_s"]) for r in by.values()) < GOALS["epoch_s"],
    }
    if "old-split" in by:
        verdicts["same_targets_as_old_code"] = all(
            by[w]["targets_sha256"] == by[f"old-{w}"]["targets_sha256"] for w in WORKLOADS)
    return verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke test")
    parser.add_argument("--samples", type=int, default=62_429)
    parser.add_argument("--classes", type=int, default=3_806)
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of updates timed")
    _common.add_threads_option(parser)  # the workers' threads (the bank's work is memory-bound)
    parser.add_argument("--old-code", type=Path, default=None,
                        help="a source tree holding umilayers/ to run as the extra variants old-split, old-all")
    parser.add_argument("--released-sample", type=int, default=200,
                        help="released-approach files written to measure their size")
    parser.add_argument("--tmpdir", default=None, help="where the saved banks go")
    parser.add_argument("--out", type=Path, default=ROOT / "results",
                        help="folder for pseudo_bank.json and .png (quick: pseudo_bank_quick.*)")
    parser.add_argument("--worker", choices=[*WORKLOADS, *(f"old-{w}" for w in WORKLOADS)], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.classes, args.epochs, args.released_sample = 2_000, 256, 2, 20
    if args.old_code is not None and not (args.old_code / "umilayers" / "pseudo_labels.py").is_file():
        parser.error(f"--old-code: expected a folder holding umilayers/pseudo_labels.py, got {args.old_code}")

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    load_before = os.getloadavg()[0]
    variants = [*WORKLOADS, *([f"old-{w}" for w in WORKLOADS] if args.old_code else [])]
    runs = [_run_variant(args, v) for v in variants]
    by = {r["variant"]: r for r in runs}
    verdicts = _verdicts(by)
    if verdicts.get("same_targets_as_old_code") is False:
        raise SystemExit("the targets differ from the old code's: " + ", ".join(
            f"{r['variant']} {r['targets_sha256'][:12]}" for r in runs))
    released = released_files(args.samples, args.classes, args.window, args.released_sample, args.tmpdir)
    load_after = os.getloadavg()[0]
    result = {
        "config": {"samples": args.samples, "classes": args.classes, "modalities": args.modalities,
                   "window": args.window, "batch": args.batch, "epochs": args.epochs,
                   "threads": _worker_threads(args), "dtype": "float16", "quick": args.quick,
                   "old_code": str(args.old_code) if args.old_code else None},
        "machine": {**_common.machine_info(), "torch": runs[0]["torch"], "torch_threads": runs[0]["torch_threads"],
                    "load_average_1min_before_after": [load_before, load_after]},
        "goals": GOALS,
        "variants": runs,
        "verdicts": verdicts,
        "released": released,
        "command": " ".join([Path(sys.executable).name, "benchmarks/pseudo_bank.py", *(argv or sys.argv[1:])]),
    }

    rows = [["variant", "pairs", "peak RSS (MB)", "bank bytes (MB)", "epoch of updates: wall (s)",
             "CPU (s)", "updates/s", "lookups/s", "save (s)", "on disk (MB)"]]
    for r in runs:
        rows.append([
            r["variant"], f"{r['pairs']:,}", f"{r['peak_rss_mb']:.0f}", f"{r['nbytes'] / MB:,.1f}",
            " / ".join(f"{s:.2f}" for s in r["epoch_s"]), " / ".join(f"{s:.2f}" for s in r["epoch_cpu_s"]),
            f"{r['updates_per_s']:,.0f}", f"{r['lookups_per_s']:,.0f}", f"{r['save_s']:.2f}",
            f"{r['disk_bytes'] / MB:,.1f}",
        ])
    print(f"PseudoLabelBank: N={args.samples:,} C={args.classes:,} M={args.modalities} window={args.window} "
          f"batch={args.batch}, float16; {os.cpu_count()} CPUs, {runs[0]['torch_threads']} torch threads, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(_table(rows))
    print("(MB = 10^6 bytes; peak RSS above the process before the bank is built)")
    v = verdicts
    same = v.get("same_targets_as_old_code")
    print(f"split / all peak: {v['split_vs_all_peak']:.2f}x"
          + ("" if same is None else f"; targets bit-identical to the old code's: {same}"))
    print(f"goals{' (judged at EPIC size, not at --quick size)' if args.quick else ''}: "
          f"split <= {GOALS['split_mb']:.0f} MB: {'met' if v['split_goal_met'] else 'MISSED'}; "
          f"all <= {GOALS['all_mb']:.0f} MB: {'met' if v['all_goal_met'] else 'MISSED'}; "
          f"epoch < {GOALS['epoch_s']:.0f} s: {'met' if v['epoch_goal_met'] else 'MISSED'}")
    one = released["one_per_sample"]
    print(f"disk: released code, one [E, C] float32 .npy per sample: {one['files']:,} files, "
          f"{one['size'] / 1e9:.2f} GB ({released['file_bytes']:,} B each, measured on "
          f"{released['files_measured']} files); bank saved (split): {by['split']['disk_bytes'] / 1e9:.2f} GB "
          f"({one['size'] / by['split']['disk_bytes']:.1f}x less)")

    out = args.out / ("pseudo_bank_quick.json" if args.quick else "pseudo_bank.json")
    _atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
