"""Input checks shared by every public module.

Each check raises at the module's own boundary with a message that names the argument, the
expected shape and the actual one, so that a user never has to decode a shape error from deep
inside torch. Shape specs are tuples whose entries are an ``int`` (that size exactly), ``None``
(any size) or a ``str`` (a named size: the first tensor that uses a name fixes it for the rest
of the call, through the ``sizes`` dict the caller passes along).

Example::

    >>> import torch
    >>> sizes = {}
    >>> check_tensor("x", torch.zeros(2, 3, 4), ("B", "k_m", 4), sizes)
    >>> sizes
    {'B': 2, 'k_m': 3}
    >>> check_tensor("mask", torch.zeros(5, 3, dtype=torch.bool), ("B", "k_m"), sizes)
    Traceback (most recent call last):
    ...
    ValueError: mask: expected shape (B=2, k_m=3), got (5, 3) (B is 2 from an earlier argument, got 5)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "ShapeSpec",
    "check_tensor",
    "check_bool_mask",
    "check_finite",
    "check_positive_int",
    "check_choice",
    "format_spec",
]

Dim = Union[int, str, None]
ShapeSpec = Sequence[Dim]


def format_spec(spec: ShapeSpec, sizes: Optional[Mapping[str, int]] = None) -> str:
    """Render a shape spec as ``(B=2, k_m, 4)``, filling in names already bound in ``sizes``."""
    sizes = sizes or {}
    parts = []
    for dim in spec:
        if dim is None:
            parts.append("*")
        elif isinstance(dim, str):
            parts.append(f"{dim}={sizes[dim]}" if dim in sizes else dim)
        else:
            parts.append(str(dim))
    return "(" + ", ".join(parts) + ")"


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def check_tensor(
    name: str,
    x: Any,
    spec: Optional[ShapeSpec] = None,
    sizes: Optional[dict[str, int]] = None,
    *,
    floating: bool = False,
) -> None:
    """Check that ``x`` is a tensor whose shape matches ``spec``.

    Args:
        name: the argument's name, used in the error message.
        x: the value to check.
        spec: expected shape; ``None`` accepts any shape.
        sizes: named sizes bound so far in this call; updated in place with new bindings.
        floating: also require a floating-point dtype.

    Raises:
        TypeError: ``x`` is not a tensor, or not floating point when ``floating`` is set.
        ValueError: the rank or a size differs from ``spec``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if spec is None:
        return
    bound = {} if sizes is None else sizes
    if x.dim() != len(spec):
        raise ValueError(
            f"{name}: expected a {len(spec)}-d tensor of shape {format_spec(spec, bound)}, "
            f"got {x.dim()}-d shape {_shape(x)}"
        )
    for axis, (dim, actual) in enumerate(zip(spec, x.shape)):
        if dim is None:
            continue
        if isinstance(dim, str):
            if dim in bound and bound[dim] != actual:
                raise ValueError(
                    f"{name}: expected shape {format_spec(spec, bound)}, got {_shape(x)} "
                    f"({dim} is {bound[dim]} from an earlier argument, got {actual})"
                )
            bound.setdefault(dim, int(actual))
        elif dim != actual:
            raise ValueError(
                f"{name}: expected shape {format_spec(spec, bound)}, got {_shape(x)} "
                f"(axis {axis} should be {dim})"
            )


def check_bool_mask(
    name: str, mask: Any, spec: ShapeSpec, sizes: Optional[dict[str, int]] = None
) -> None:
    """Check a boolean mask's dtype and shape (see :func:`check_tensor`)."""
    check_tensor(name, mask, spec, sizes)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a torch.bool mask, got dtype {mask.dtype}")


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity (one sync; call at boundaries only)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries")


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an ``int`` greater than zero (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
