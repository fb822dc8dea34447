"""Helpers shared by the benchmark scripts: timing, peak memory, machine description, output.

Nothing here imports torch at module import time (``pseudo_bank.py``'s parent process never
imports it); the functions that need it import it inside.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the step.
- CPU (Linux): the kernel's resident-set high-water mark ``VmHWM`` of ``/proc/self/status``,
  reset to the current resident set by writing ``5`` to ``/proc/self/clear_refs``; the figure is
  the peak minus the resident set before the step. glibc keeps freed blocks in its heap (and
  raises its mmap threshold as a process runs), so a script measures peaks in a second process
  started by :func:`peaks_in_fresh_process` with a fixed ``MALLOC_MMAP_THRESHOLD_``: large
  tensors then live in their own mappings, go back to the OS when freed, and the high-water mark
  measures what a step needed. The timed process keeps glibc's defaults, as a user's training
  process does (pinning the threshold costs a page fault per large tensor: +20-26% per step
  of ``train_step.py``, measured 2026-11-30).
- A malloc replacement preloaded by the user (``LD_PRELOAD=libtcmalloc...``, as PyTorch's CPU
  performance guide suggests) is kept for the timed process and named in :func:`machine_info`,
  but left out of the peaks process: tcmalloc and jemalloc keep freed memory mapped, so the
  high-water mark would show what they cached, not what a step needed (tcmalloc made the released
  code's peak read 29 MiB against glibc's 2527).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: The hidden option through which :func:`peaks_in_fresh_process` asks a script for its peaks.
PEAKS_OUT = "--peaks-out"
#: glibc's mmap threshold in the process that measures peaks (bytes).
PEAKS_MMAP_THRESHOLD = 131072
#: Library names that replace malloc when preloaded (matched in the file names of ``LD_PRELOAD``).
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def preloaded_allocators(preload: Optional[str] = None) -> list[str]:
    """Entries of ``LD_PRELOAD`` (default: this process's) that replace malloc, as written.

    Example::

        >>> preloaded_allocators("/usr/lib/libtcmalloc_minimal.so.4 libfoo.so")
        ['/usr/lib/libtcmalloc_minimal.so.4']
    """
    entries = (os.environ.get("LD_PRELOAD", "") if preload is None else preload).replace(":", " ").split()
    return [e for e in entries if any(name in Path(e).name for name in ALLOCATORS)]


def system_allocator() -> str:
    """The C library's malloc: ``"glibc"`` on most Linux systems, else ``"system"``."""
    return platform.libc_ver()[0] or "system"


def allocator_name() -> str:
    """The file name of the preloaded malloc replacement (see :data:`ALLOCATORS`), or
    :func:`system_allocator`."""
    found = preloaded_allocators()
    return ", ".join(Path(e).name for e in found) if found else system_allocator()


def _without_allocators(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the malloc replacements taken out of ``LD_PRELOAD`` (other preloads stay)."""
    env = dict(env)
    preload = env.pop("LD_PRELOAD", "")
    kept = [e for e in preload.replace(":", " ").split() if e not in preloaded_allocators(preload)]
    if kept:
        env["LD_PRELOAD"] = " ".join(kept)
    return env


def peaks_in_fresh_process(script: Path, argv: Sequence[str]) -> Optional[dict[str, Optional[int]]]:
    """Run ``script argv --peaks-out FILE`` with glibc's mmap threshold pinned (and no preloaded
    malloc replacement); return the JSON object it writes to FILE (the peak bytes of each
    method), or None off Linux.

    The script builds what it times as usual and, given :data:`PEAKS_OUT`, measures
    :func:`peak_bytes` of each step instead of timing it. Its output is shown only when it fails.

    Raises:
        RuntimeError: the child failed (its output is in the message).
    """
    import subprocess

    if not sys.platform.startswith("linux"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "peaks.json"
        env = dict(_without_allocators(os.environ), MALLOC_MMAP_THRESHOLD_=str(PEAKS_MMAP_THRESHOLD))
        done = subprocess.run([sys.executable, str(script), *argv, PEAKS_OUT, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"measuring peak memory in a fresh process failed (exit {done.returncode}):\n"
                               + done.stdout[-4000:])
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- memory


def status_kib(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    """The resident-set high-water mark in KiB (``VmHWM``, else ``ru_maxrss``)."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def peak_bytes(step: Callable[[], Any], device: Any = "cpu") -> Optional[int]:
    """Peak memory that one call of ``step`` adds above what was in use before it.

    CUDA: allocator peak above the allocation before the call. CPU: resident-set peak above the
    resident set before the call (None where the peak cannot be reset).
    """
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not reset_peak_rss():
        return None
    base = status_kib("VmRSS")
    step()
    peak = status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) * 1024


# ----------------------------------------------------------------------------- timing


def interleaved_times(
    steps: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, sync: Optional[Callable[[], Any]] = None,
    cpu_times: Optional[dict[str, list[float]]] = None,
) -> dict[str, list[float]]:
    """Wall time of each step, round-robin: every round runs every step once.

    On a shared machine the load then hits all methods alike, and ratios taken within a round
    (:func:`median_ratio`) are steadier than ratios of separate medians. The first ``warmup``
    rounds are not recorded. ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each step,
    inside the timed interval. ``cpu_times``, when given, receives the process's CPU time of
    each step too (``time.process_time``: on a loaded machine it leaves out the time the process
    waited for a core; with one torch thread it is the step's own work).
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name in steps:
        if cpu_times is not None:
            cpu_times[name] = []
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if sync is not None:
                sync()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if round_ >= warmup:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times[name].append(elapsed_cpu)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios ``numerator[i] / denominator[i]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (the exponent of a power law)."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x`` with its coefficient of determination ``r2``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept": intercept, "slope": slope, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


# ----------------------------------------------------------------------------- threads


def default_threads(device: Any = "cpu") -> int:
    """The threads of a benchmark run without ``--threads``: the library's measured policy
    (:func:`umilayers._threads.choose_threads`: one on the CPU unless ``OMP_NUM_THREADS`` /
    ``MKL_NUM_THREADS`` is set; torch's choice on CUDA); 0 stands for torch's own choice."""
    from umilayers._threads import choose_threads

    return choose_threads(None, device)[0] or 0


def _threads(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {value}")
    return value


def add_threads_option(parser: Any) -> None:
    """Add ``--threads N`` (torch's intra-op CPU threads) to a benchmark's argument parser."""
    from umilayers._threads import THREADS_HELP

    parser.add_argument("--threads", type=_threads, default=None, metavar="N", help=THREADS_HELP)


def set_threads(threads: Optional[int], device: Any = "cpu") -> int:
    """Apply ``--threads`` by the library's rule (:func:`umilayers._threads.apply_thread_policy`:
    None = the measured default, 0 = torch's choice); return the number torch then uses."""
    from umilayers._threads import apply_thread_policy

    return apply_thread_policy(threads, device)


# ----------------------------------------------------------------------------- machine


def machine_info(device: Any = "cpu") -> dict[str, Any]:
    """What the figures were measured on: processor or GPU, cores, threads, load, versions."""
    info: dict[str, Any] = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "allocator": allocator_name(),
    }
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if getattr(device, "type", str(device)).startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for a table title, e.g. ``x86_64, 2 cores, 1 torch thread, load 3.2``."""
    if "gpu" in info:
        return f"{info['gpu']} (CUDA)"
    text = f"{info['processor']}, {info['cpus']} cores"
    if "torch_threads" in info:
        text += f", {info['torch_threads']} torch thread{'s' if info['torch_threads'] != 1 else ''}"
    if "load_average_1min" in info:
        text += f", load {info['load_average_1min']:.1f}"
    if info.get("allocator", system_allocator()) != system_allocator():
        text += f", malloc {info['allocator']}"
    return text


# ----------------------------------------------------------------------------- output


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def run_root(keep: Optional[Path], prefix: str) -> Iterator[Path]:
    """The folder for a benchmark's runs: ``keep`` (created, kept) or a temporary one (deleted)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
        return
    keep.mkdir(parents=True, exist_ok=True)
    yield keep


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_results(out: Path, name: str, result: Mapping[str, Any], plot: Optional[Callable[[Path, Any], None]],
                  seconds: Optional[float] = None) -> None:
    """``out/<name>.json`` (atomically), then ``plot(out/<name>.png, result)``, and say so (with the
    run's ``seconds`` when given)."""
    write_json(Path(out) / f"{name}.json", result)
    if plot is not None:
        plot(Path(out) / f"{name}.png", result)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    print(f"wrote {Path(out) / name}.json" + (" and .png" if plot is not None else "") + took)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (temporary PNG in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finish_figure(fig: Any, path: Path, title: str, fontsize: int = 7) -> None:
    """Title, tight layout, save atomically, close."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a message) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install 'umilayers[train]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned text table; the first row is the header, underlined."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"
