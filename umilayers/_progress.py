"""Progress bars: the one helper every long loop of the package uses (tqdm is optional).

Example::

    >>> progress(10, "epoch 1", enabled=False) is None
    True
"""

from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["progress"]


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
