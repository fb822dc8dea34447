"""Helpers shared by the benchmark scripts: timing, peak memory, machine description, output.

Nothing here imports torch at module import time (``pseudo_bank.py``'s parent process never
imports it); the functions that need it import it inside.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the step.
- CPU (Linux): the kernel's resident-set high-water mark ``VmHWM`` of ``/proc/self/status``,
  reset to the current resident set by writing ``5`` to ``/proc/self/clear_refs``; the figure is
  the peak minus the resident set before the step. glibc keeps freed small blocks in its heap,
  so :func:`pin_mmap_threshold` (called before torch is imported) re-executes the script with a
  fixed ``MALLOC_MMAP_THRESHOLD_``: large tensors then live in their own mappings, go back to the
  OS when freed, and the high-water mark measures what a step needed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
NO_REEXEC = "--no-reexec"


def pin_mmap_threshold(threshold: int = 131072) -> None:
    """Re-execute this script once with glibc's mmap threshold pinned (Linux only).

    Call it before importing torch. The re-executed process gets ``--no-reexec`` appended to its
    arguments (the script's parser must accept and ignore it).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ or NO_REEXEC in sys.argv:
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    os.execv(sys.executable, [sys.executable, *sys.argv, NO_REEXEC])


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
    steps: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, sync: Optional[Callable[[], Any]] = None
) -> dict[str, list[float]]:
    """Wall time of each step, round-robin: every round runs every step once.

    On a shared machine the load then hits all methods alike, and ratios taken within a round
    (:func:`median_ratio`) are steadier than ratios of separate medians. The first ``warmup``
    rounds are not recorded. ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each step,
    inside the timed interval.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
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


# ----------------------------------------------------------------------------- machine


def machine_info(device: Any = "cpu") -> dict[str, Any]:
    """What the figures were measured on: processor or GPU, cores, threads, load, versions."""
    info: dict[str, Any] = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
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


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


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
