"""Config dataclasses: each field is one option, with its help text and its check in its metadata.

A config is a frozen dataclass deriving from :class:`Config` whose option fields are declared
with :func:`option`::

    @dataclass(frozen=True)
    class Schedule(Config):
        epochs: int = option(30, "epochs of training", minimum=1)

The field's name is the one spelling of the option everywhere: the constructor argument that
takes it, the key in ``config.json``, and the command-line flag that :mod:`umilayers.cli`
generates from the field (``--epochs``: ``_`` becomes ``-``; a ``bool`` gets ``--x`` and
``--no-x``). Adding an option is adding a field.

Checks run when a config is made (``__post_init__``): first each option from its type and
metadata, then the class's cross-field :meth:`Config.check`. Both raise
:class:`~umilayers._validation.InvalidArgument` naming the field, so Python callers read
``epochs: expected an int >= 1, got 0`` and the command line renders the same error with its
flags (``--epochs: expected an int >= 1, got 0``).

Example::

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Schedule(Config):
    ...     epochs: int = option(30, "epochs of training", minimum=1)
    ...     lr: float = option(1e-4, "learning rate", minimum=0, strict=True)
    >>> Schedule(epochs=2).to_dict()
    {'epochs': 2, 'lr': 0.0001}
    >>> Schedule(epochs=0)
    Traceback (most recent call last):
    ...
    umilayers._validation.InvalidArgument: epochs: expected an int >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence, TypeVar, Union

from umilayers._validation import InvalidArgument, check_bool, check_choice, check_int, check_number

__all__ = ["Config", "OptionSpec", "option", "option_specs"]

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class OptionSpec:
    """What a field declared with :func:`option` says about itself.

    Attributes:
        name: the field's name (the one spelling of the option).
        kind: ``bool``, ``int``, ``float`` or ``str``.
        optional: ``None`` is a valid value.
        default: the default value.
        help: one line for ``--help`` (the default is shown after it).
        minimum: the smallest valid value of a number (``None``: any).
        strict: the value must be greater than ``minimum``.
        choices: the valid values of a ``str`` option (``None``: any).
    """

    name: str
    kind: type
    optional: bool
    default: Any
    help: str
    minimum: Optional[float] = None
    strict: bool = False
    choices: Optional[tuple[Any, ...]] = None

    def check(self, value: Any) -> None:
        """Raise :class:`~umilayers._validation.InvalidArgument` unless ``value`` is valid."""
        if value is None and self.optional:
            return
        if self.kind is bool:
            check_bool(self.name, value)
        elif self.kind is int:
            check_int(self.name, value, None if self.minimum is None else int(self.minimum))
            if self.strict and value == self.minimum:
                raise InvalidArgument(self.name, f"expected an int > {self.minimum}, got {value}")
        elif self.kind is float:
            check_number(self.name, value, -float("inf") if self.minimum is None else self.minimum,
                         strict=self.strict)
        elif self.choices is not None:
            check_choice(self.name, value, self.choices)
        elif not isinstance(value, str):
            raise InvalidArgument(self.name, f"expected a str, got {type(value).__name__} {value!r}")


def option(
    default: Any,
    help: str = "",
    *,
    minimum: Optional[float] = None,
    strict: bool = False,
    choices: Optional[Sequence[Any]] = None,
) -> Any:
    """A config field that is an option: its default, its help line and what makes it valid.

    The field's type annotation gives the kind (``bool``, ``int``, ``float``, ``str``, or
    ``Optional`` of one of them). ``help`` is the ``--help`` line of an option the command line
    offers; the models' own configs document their fields in the model's docstring instead.
    """
    meta = {"help": help, "minimum": minimum, "strict": strict,
            "choices": None if choices is None else tuple(choices)}
    return dataclasses.field(default=default, metadata={"option": meta})


def _kind(annotation: Any) -> tuple[type, bool]:
    """``(kind, optional)`` of an option's annotation: ``Optional[int]`` -> ``(int, True)``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def option_specs(cls: type) -> tuple[OptionSpec, ...]:
    """The :class:`OptionSpec` of every option field of ``cls``, in field order."""
    # A class is hashable, but mypy reads a frozen dataclass's instance ``__hash__`` as the
    # class's own and refuses ``type[Config]`` for ``lru_cache``'s ``Hashable``: call through ``type``.
    return _option_specs(cls)


@functools.lru_cache(maxsize=None)
def _option_specs(cls: type) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        kind, optional = _kind(hints[f.name])
        if kind not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: an option must be bool, int, float or str, got {kind}")
        specs.append(OptionSpec(f.name, kind, optional, f.default, **meta))
    return tuple(specs)


def _nested(cls: type) -> dict[str, type[Config]]:
    """Fields of ``cls`` that hold a config of their own: name -> its class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Config)}


@dataclass(frozen=True)
class Config:
    """Base of the package's config dataclasses (frozen; see the module docstring).

    Example::

        >>> from umilayers.model import ModelConfig
        >>> cfg = ModelConfig(dim=32, heads=4)
        >>> ModelConfig.from_dict(cfg.to_dict()) == cfg, cfg.replace(heads=8).heads
        (True, 8)
    """

    #: Options that were removed: name -> the value that reproduces what the library does now.
    #: :meth:`from_dict` drops such a key holding that value (a saved config from before the
    #: removal still loads) and refuses any other value.
    retired: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        for spec in option_specs(type(self)):
            spec.check(getattr(self, spec.name))
        for name, cls in _nested(type(self)).items():
            if not isinstance(getattr(self, name), cls):
                value = getattr(self, name)
                raise InvalidArgument(name, f"expected a {cls.__name__}, got {type(value).__name__}")
        self.check()

    def check(self) -> None:
        """Cross-field checks (after every field passed its own); raise ``InvalidArgument``."""

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict (nested configs as dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict`; unknown keys are an error (:attr:`retired` ones at their value
        are dropped)."""
        for key, value in cls.retired.items():
            if key in data and data[key] != value:
                raise InvalidArgument(key, f"this option was removed (only {value!r}, what the library does now, "
                                           f"can still be read), got {data[key]!r}")
        data = {k: v for k, v in data.items() if k not in cls.retired}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidArgument(unknown[0], f"{cls.__name__} has no such option: unknown keys {unknown}; "
                                              f"unknown options are refused, expected a subset of {sorted(names)}")
        nested = _nested(cls)
        return cls(**{k: nested[k].from_dict(v) if k in nested and isinstance(v, Mapping) else v
                      for k, v in data.items()})

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (checked like a new config)."""
        return dataclasses.replace(self, **changes)
