"""Input checks shared by every public module.

Each check raises at the module's own boundary with a message that names the argument, the
expected shape and the actual one, so that a user never has to decode a shape error from deep
inside torch. Shape specs are tuples whose entries are an ``int`` (that size exactly), ``None``
(any size) or a ``str`` (a named size: the first tensor that uses a name fixes it for the rest
of the call, through the ``sizes`` dict the caller passes along).

The checks of plain values (:func:`check_int`, :func:`check_number`, :func:`check_bool`,
:func:`check_choice`, :func:`check_divides`) raise :class:`InvalidArgument` (a ``ValueError``)
or :class:`InvalidArgumentType` (also a ``TypeError``). Both carry the argument's ``name`` and a
``reason`` that may name other arguments, so one check serves Python callers and config fields
(``epochs: expected an int >= 1, got 0``) and the command line, which renders the same error with
its flags (``--epochs: expected an int >= 1, got 0``, see :meth:`InvalidArgument.message`).

Checks that read tensor values back to the host (:func:`check_finite`, label ranges, ...) are a
pipeline stall on a GPU: layers run them only when called with ``check_values=True``; data is
checked once where it enters (the FeatureStore).

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
    >>> err = InvalidArgument("heads", "must divide {dim}=256, got 3", refs=["dim"])
    >>> str(err), err.message(lambda name: "--" + name)
    ('heads: must divide dim=256, got 3', '--heads: must divide --dim=256, got 3')
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "ShapeSpec",
    "Sizes",
    "InvalidArgument",
    "InvalidArgumentType",
    "OutputExistsError",
    "MissingExtra",
    "check_tensor",
    "check_bool_mask",
    "check_finite",
    "is_int",
    "check_int",
    "check_positive_int",
    "check_number",
    "check_bool",
    "check_choice",
    "check_divides",
    "check_head_dim",
    "check_ids",
    "check_labels",
    "format_spec",
    "format_indices",
]

Dim = Union[int, str, None]
ShapeSpec = Sequence[Dim]


class InvalidArgument(ValueError):
    """A bad argument, config field or command-line option.

    Args:
        name: the argument (or config field) whose value is wrong.
        reason: what was expected and what was given; ``{other}`` stands for the name of another
            argument listed in ``refs`` (rendered by :meth:`message`).
        refs: the other arguments the reason mentions.

    ``str(err)`` spells every name as Python does; the command line passes its own speller to
    :meth:`message` (``heads`` -> ``--heads``).
    """

    def __init__(self, name: str, reason: str, refs: Sequence[str] = ()) -> None:
        self.name = name
        self.reason = reason
        self.refs = tuple(refs)
        super().__init__(self.message())

    def message(self, spell: Callable[[str], str] = str) -> str:
        """``"name: reason"`` with ``name`` and every name in ``refs`` passed through ``spell``."""
        text = self.reason
        for ref in self.refs:
            text = text.replace("{" + ref + "}", spell(ref))
        return f"{spell(self.name)}: {text}"

    def __reduce__(self):  # picklable across processes (DataLoader workers, spawn)
        return type(self), (self.name, self.reason, self.refs)


class InvalidArgumentType(InvalidArgument, TypeError):
    """:class:`InvalidArgument` for a value of the wrong type (also a ``TypeError``)."""


class OutputExistsError(InvalidArgument, FileExistsError):
    """:class:`InvalidArgument` for an output that exists already and is not to be replaced
    unless asked (also a ``FileExistsError``).

    Example::

        >>> err = OutputExistsError("out", "runs/a already exists; pass {overwrite} to replace it",
        ...                         refs=["overwrite"])
        >>> err.message(lambda name: "--" + name)
        '--out: runs/a already exists; pass --overwrite to replace it'
    """


class MissingExtra(ImportError):
    """An optional package that a feature needs is not installed; the message names the
    ``umilayers[extra]`` to install. The one refusal besides :class:`InvalidArgument` that the
    command line shows as a line rather than a traceback.

    Example::

        >>> str(MissingExtra("h5py", "datasets", "reading the robot dataset"))
        'reading the robot dataset needs h5py: pip install "umilayers[datasets]"'
    """

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package, self.extra, self.purpose = package, extra, purpose
        super().__init__(f'{purpose} needs {package}: pip install "umilayers[{extra}]"')

    def __reduce__(self):  # picklable across processes, like InvalidArgument
        return type(self), (self.package, self.extra, self.purpose)


class Sizes(dict):
    """Named sizes bound so far in a call (``{"B": 2, "D": 64}``), remembering which argument
    bound each, so that a mismatch names both tensors involved (:func:`check_tensor`).

    Example::

        >>> import torch
        >>> sizes = Sizes()
        >>> check_tensor("features['audio']", torch.zeros(2, 4, 6), (None, "K", "D"), sizes)
        >>> check_tensor("features['rgb']", torch.zeros(2, 4, 8), (None, "K", "D"), sizes)
        Traceback (most recent call last):
        ...
        ValueError: features['rgb']: expected shape (*, K=4, D=6), got (2, 4, 8) (D is 6 from features['audio'], got 8)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin: dict[str, str] = {}


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
        sizes: named sizes bound so far in this call; updated in place with new bindings (a
            :class:`Sizes` also records which argument bound each, for the messages).
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
            origin = getattr(bound, "origin", {})
            if dim in bound and bound[dim] != actual:
                raise ValueError(
                    f"{name}: expected shape {format_spec(spec, bound)}, got {_shape(x)} "
                    f"({dim} is {bound[dim]} from {origin.get(dim, 'an earlier argument')}, got {actual})"
                )
            if dim not in bound:
                bound[dim] = int(actual)
                origin[dim] = name
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


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy) and not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: Optional[int] = None, *, optional: bool = False) -> None:
    """Raise unless ``value`` is an ``int`` (``bool`` is refused) of at least ``minimum``.

    Example::

        >>> check_int("epochs", 0, 1)
        Traceback (most recent call last):
        ...
        umilayers._validation.InvalidArgument: epochs: expected an int >= 1, got 0
    """
    if optional and value is None:
        return
    wanted = "an int" + ("" if minimum is None else f" >= {minimum}") + (" or None" if optional else "")
    if not is_int(value):
        raise InvalidArgumentType(name, f"expected {wanted}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidArgument(name, f"expected {wanted}, got {value}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an ``int`` greater than zero (``bool`` is refused)."""
    if not is_int(value):
        raise InvalidArgumentType(name, f"expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise InvalidArgument(name, f"expected a positive int, got {value}")


def check_number(name: str, value: Any, minimum: float = 0.0, *, strict: bool = False) -> None:
    """Raise unless ``value`` is a finite real number ``>= minimum`` (``> minimum`` if ``strict``).

    Example::

        >>> check_number("mlp_ratio", 0, strict=True)
        Traceback (most recent call last):
        ...
        umilayers._validation.InvalidArgument: mlp_ratio: expected a number > 0, got 0
    """
    wanted = f"a number {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentType(name, f"expected {wanted}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise InvalidArgument(name, f"expected {wanted}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise unless ``value`` is a ``bool`` (``0``/``1`` are refused)."""
    if not isinstance(value, bool):
        raise InvalidArgumentType(name, f"expected a bool, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidArgument(name, f"expected one of {list(choices)}, got {value!r}")


def check_divides(name: str, value: int, of: str, total: int) -> None:
    """Raise unless ``value`` divides ``total`` (the argument ``of``): heads of a width, say.

    Example::

        >>> check_divides("heads", 3, "dim", 16)
        Traceback (most recent call last):
        ...
        umilayers._validation.InvalidArgument: heads: must divide dim=16, got heads=3
    """
    if total % value:
        raise InvalidArgument(name, f"must divide {{{of}}}={total}, got {{{name}}}={value}", refs=(of, name))


def check_head_dim(heads: int, of: str, width: int, head_dim: Optional[int]) -> int:
    """The width of each attention head: ``head_dim`` when given (positive), else ``width //
    heads``, which needs ``heads`` to divide ``width`` (the argument ``of``).

    Example::

        >>> check_head_dim(4, "dim", 32, None), check_head_dim(3, "dim", 32, 64)
        (8, 64)
    """
    if head_dim is None:
        check_divides("heads", heads, of, width)
        return width // heads
    check_positive_int("head_dim", head_dim)
    return head_dim


def check_ids(name: str, ids: Tensor, upper: int, what: str) -> Tensor:
    """Refuse a float, complex or bool tensor, or values outside ``[0, upper)``.

    Reads the values back to the host: for entry points that hold ids on the CPU anyway.

    Args:
        name: the argument, for the message.
        ids: integer tensor of any shape.
        upper: one past the largest valid value.
        what: what the values are, for the message (``"sample ids"``, ``"class labels"``).

    Returns:
        ``ids`` detached, as a CPU ``int64`` tensor.

    Example::

        >>> check_ids("labels", torch.tensor([0, 2]), 3, "class labels")
        tensor([0, 2])
    """
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor of {what}, got dtype {ids.dtype}")
    ids = ids.detach().to("cpu", torch.int64)
    bad = (ids < 0) | (ids >= upper)
    if ids.numel() and bool(bad.any()):
        raise ValueError(f"{name}: expected {what} in [0, {upper}), got {int(bad.sum())} out of range, "
                         f"e.g. {format_indices(ids[bad], limit=5)}")
    return ids


def check_labels(name: str, labels: Any, size: int, upper: int, what: str, *, check_values: bool = True) -> None:
    """``(size,)`` integer labels (any integer dtype); with ``check_values`` also each in
    ``[0, upper)``, which reads them back to the host. The one check of class labels, wherever
    they enter (a model's ``loss``, the loss functions, the metrics).

    Example::

        >>> check_labels("targets", torch.tensor([0, 3]), 2, 3, "class labels")
        Traceback (most recent call last):
        ...
        ValueError: targets: expected values in [0, 3) (class labels), got min 0, max 3 (1 of 2 out of range)
    """
    check_tensor(name, labels, ("B",), {"B": size})
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name}: expected an integer tensor ({what}), got dtype {labels.dtype}")
    if not check_values or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= upper:
        bad = int(((labels < 0) | (labels >= upper)).sum())
        raise ValueError(f"{name}: expected values in [0, {upper}) ({what}), got min {lo}, max {hi} "
                         f"({bad} of {labels.numel()} out of range)")


def format_indices(indices: Iterable[Any], limit: int = 10) -> str:
    """``[3, 8, 11, ...]``: the first ``limit`` of some row indices, for an error message.

    Takes a tensor, a numpy array or any iterable of ints.

    Example::

        >>> format_indices(range(12), limit=3)
        '[0, 1, 2, ...]'
    """
    if hasattr(indices, "tolist"):
        indices = indices.tolist()
    values = list(indices)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return "[" + shown + (", ..." if len(values) > limit else "") + "]"
