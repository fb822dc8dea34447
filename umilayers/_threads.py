"""How many intra-op threads torch uses in a run started from the command line.

The rule, from ``benchmarks/threads.py`` (figures and reasoning: ``docs/benchmarks.rst``,
section "Threads"):

1. ``--threads N`` (N >= 1) sets N threads.
2. ``--threads 0`` leaves torch's own choice: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` when set,
   else one thread per physical core.
3. No ``--threads``:

   - ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set in the environment: left as it is (the
     user, a job scheduler or ``torchrun`` chose);
   - a run on the CPU (``--device cpu``, or ``auto`` without CUDA): **one thread**. At the demo's
     model size and at the paper's D=256, one thread was the fastest count in every measurement
     on a 2-core machine shared with other jobs, and torch's default (one per core) took 2.9-99x
     as long: OpenMP's waiting threads spin against the other jobs. The count is also fixed,
     not chosen from the load, because the thread count changes float sums in the last bits
     (the same seed gives bit-identical runs only at the same count);
   - any other device (CUDA): left as it is. The model runs on the accelerator; the CPU
     threads only collate batches, and nothing was measured there to justify a change.

Only the command-line entry points apply the rule (:func:`apply_thread_policy`, once, at start;
their ``--threads`` option is :func:`add_threads_argument`).
The library (``fit``, the models) never changes the process-wide thread count: a Python user
keeps whatever ``torch.set_num_threads`` they called.

Example::

    >>> choose_threads(None, "cpu", environ={})
    (1, 'the CPU default')
    >>> choose_threads(None, "cpu", environ={"OMP_NUM_THREADS": "4"})
    (None, 'OMP_NUM_THREADS=4')
    >>> choose_threads(3, "cpu", environ={"OMP_NUM_THREADS": "4"})
    (3, '--threads 3')
    >>> choose_threads(None, "cuda:1", environ={})
    (None, "torch's default on cuda:1")
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Optional, Sequence

__all__ = ["CPU_DEFAULT_THREADS", "THREAD_ENV_VARS", "THREADS_HELP", "choose_threads", "apply_thread_policy",
           "add_threads_argument"]

#: Threads on the CPU when neither ``--threads`` nor the environment says otherwise.
CPU_DEFAULT_THREADS = 1

#: Environment variables whose presence means the thread count was already chosen (torch reads
#: them at import to size its intra-op pool).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: The ``--threads`` help text of every command and benchmark that takes the option.
THREADS_HELP = (
    "torch intra-op CPU threads. Default: 1 on the CPU (measured fastest for these models; torch's "
    "own default of one per core ran 3-99x slower on a 2-core machine shared with other jobs), "
    "unless OMP_NUM_THREADS or MKL_NUM_THREADS is set; on CUDA torch's own choice. "
    "0 = torch's own choice (one per physical core)."
)


_EXPECTED = "expected an int >= 0 (0 = torch's own choice)"


def _check_threads(threads: Any, name: str) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"{name}: {_EXPECTED}, got {type(threads).__name__} {threads!r}")
    if threads < 0:
        raise ValueError(f"{name}: {_EXPECTED}, got {threads}")


def _runs_on_cpu(device: Any) -> bool:
    """Whether ``device`` (``None``/``"auto"`` = CUDA when available) is the CPU."""
    name = "auto" if device is None else str(device)
    if name in ("", "auto"):
        import torch

        return not torch.cuda.is_available()
    return name.split(":")[0] == "cpu"


def choose_threads(
    threads: Optional[int] = None,
    device: Any = None,
    environ: Optional[Mapping[str, str]] = None,
    *,
    name: str = "--threads",
) -> tuple[Optional[int], str]:
    """The thread count the rule picks, and why (for one log line); changes nothing.

    Args:
        threads: the ``--threads`` value: ``None`` (not given), ``0`` (torch's own choice) or a
            count >= 1.
        device: the run's device as the user gave it (``"auto"``, ``"cpu"``, ``"cuda:1"``,
            a ``torch.device``); ``None`` means ``"auto"``.
        environ: the environment to read (default ``os.environ``).
        name: the option's name in error messages (as the user typed it).

    Returns:
        ``(count, reason)``; ``count`` is ``None`` when the current setting is to be left alone.

    Raises:
        TypeError, ValueError: ``threads`` is not ``None`` or an int >= 0.
    """
    _check_threads(threads, name)
    env = os.environ if environ is None else environ
    if threads == 0:
        return None, f"{name} 0 (torch's own choice)"
    if threads is not None:
        return threads, f"{name} {threads}"
    for var in THREAD_ENV_VARS:
        if env.get(var, "").strip():
            return None, f"{var}={env[var].strip()}"
    if _runs_on_cpu(device):
        return CPU_DEFAULT_THREADS, "the CPU default"
    return None, f"torch's default on {'auto' if device is None else device}"


def apply_thread_policy(threads: Optional[int] = None, device: Any = None, *, name: str = "--threads") -> int:
    """Apply :func:`choose_threads` to this process (``torch.set_num_threads``).

    Call it once, at the start of a command-line run, before any work.

    Args:
        threads: the ``--threads`` value (``None`` = not given, ``0`` = torch's own choice).
        device: the run's device as the user gave it (``None`` = ``"auto"``).
        name: the option's name in error messages.

    Returns:
        The number of intra-op threads torch uses from now on.

    Raises:
        TypeError, ValueError: ``threads`` is not ``None`` or an int >= 0.
    """
    import torch

    count, _ = choose_threads(threads, device, name=name)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    return torch.get_num_threads()


class _ThreadsOption(argparse.Action):
    """``--threads N``: an int >= 0, refused in one line naming the flag as typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        typed = option_string or self.option_strings[0]
        try:
            count = int(values)
        except ValueError:
            parser.error(f"{typed}: {_EXPECTED}, got {values!r}")
        try:
            _check_threads(count, typed)
        except ValueError as err:
            parser.error(str(err))
        setattr(namespace, self.dest, count)


def add_threads_argument(parser: Any, flags: Sequence[str] = ("--threads",), note: str = "") -> None:
    """Add ``--threads N`` (default ``None``: the rule decides) to a parser or argument group;
    ``note`` is added to its help.

    Example::

        >>> parser = argparse.ArgumentParser(prog="demo")
        >>> add_threads_argument(parser)
        >>> parser.parse_args([]).threads, parser.parse_args(["--threads", "0"]).threads
        (None, 0)
    """
    parser.add_argument(*flags, action=_ThreadsOption, default=None, metavar="N",
                        help=THREADS_HELP + (" " + note if note else ""))
