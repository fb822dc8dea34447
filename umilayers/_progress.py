"""Progress: one line per finished unit of work that stays on screen and in a log file alike
(:class:`Heartbeat`: the epochs of ``fit``, the runs of ``umilayers demo``), and a tqdm bar for
the long extraction loops (:func:`progress`, tqdm is optional).

Example::

    >>> progress(10, "clips", enabled=False) is None
    True
    >>> format_duration(75), format_duration(9.6)
    ('1m15s', '10s')
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

__all__ = ["progress", "format_duration", "Heartbeat"]


def progress(total: int, description: str, enabled: bool = True, **options: Any) -> Optional[Any]:
    """A tqdm bar over ``total`` steps on stderr, or None when disabled, when stderr is not a
    terminal (logs and CI stay clean), or when tqdm is not installed (``umilayers[train]``).

    ``options`` go to ``tqdm`` (``unit="clip"``, ``leave=False``, ...).
    """
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm  # optional extra, imported where it is used
    except ImportError:
        return None
    return tqdm(total=total, desc=description, dynamic_ncols=True, **options)


def format_duration(seconds: float) -> str:
    """``1m15s``, or ``10s`` under a minute (whole seconds)."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Heartbeat:
    """One line per finished unit of work: its number, what it was, the time elapsed and an
    estimate of what remains.

    The estimate of a unit still to come is the mean time of the finished units of its kind (of
    all finished units while its kind has none).

    Args:
        plan: the kind of every unit, in order (``"unimodal"`` / ``"multimodal"`` epochs, the
            task of each demo run).
        clock: seconds, monotonic (``time.perf_counter``).
        start: units already done before this process (a resumed run): the count goes on from
            there, the estimate covers the rest of ``plan``.

    Example::

        >>> times = iter([0.0, 10.0, 40.0])
        >>> beat = Heartbeat(["classification", "classification", "retrieval"], clock=lambda: next(times))
        >>> beat.tick("classification", 10.0)
        '[1/3] 10s elapsed, about 20s left'
        >>> beat.tick("classification", 30.0, "run 2")
        '[2/3] run 2; 40s elapsed, about 20s left'
    """

    def __init__(self, plan: Sequence[str], clock: Callable[[], float] = time.perf_counter, start: int = 0) -> None:
        self.plan = list(plan)
        self.clock = clock
        self.begin = clock()
        self.before = start
        self.seconds: dict[str, list[float]] = {}

    @property
    def done(self) -> int:
        """Units done, counting those before this process."""
        return self.before + sum(len(v) for v in self.seconds.values())

    def remaining_seconds(self) -> float:
        """The estimate of the units still to come (NaN before the first is done)."""
        finished = [t for times in self.seconds.values() for t in times]
        if not finished:
            return float("nan")
        overall = statistics.fmean(finished)
        return sum(statistics.fmean(self.seconds[kind]) if kind in self.seconds else overall
                   for kind in self.plan[self.done:])

    def tick(self, kind: str, seconds: float, what: str = "") -> str:
        """Record a finished unit of ``kind`` that took ``seconds``; return its line (``what``
        says which unit it was and what it gave)."""
        self.seconds.setdefault(kind, []).append(seconds)
        width = len(str(len(self.plan)))
        line = f"[{self.done:>{width}}/{len(self.plan)}]" + (f" {what};" if what else "")
        line += f" {format_duration(self.clock() - self.begin)} elapsed"
        return line + (f", about {format_duration(self.remaining_seconds())} left"
                       if self.done < len(self.plan) else ", done")
