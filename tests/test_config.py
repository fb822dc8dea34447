"""umilayers._config: options declared once (type, default, help, check) and checked the same way
for Python callers (the field's name) and the command line (the flag)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from umilayers._config import Config, option, option_specs
from umilayers._validation import InvalidArgument, InvalidArgumentType


@dataclass(frozen=True)
class Inner(Config):
    width: int = option(4, "a width", minimum=1)
    scale: float = option(1.0, "a scale", minimum=0, strict=True)
    mode: str = option("a", "a mode", choices=("a", "b"))
    cap: Optional[int] = option(None, "an optional cap", minimum=1)
    on: bool = option(True, "a switch")

    def check(self) -> None:
        if self.cap is not None and self.cap < self.width:
            raise InvalidArgument("cap", "expected at least {width}", refs=("width",))


@dataclass(frozen=True)
class Outer(Config):
    name: str = option("x", "a name")
    inner: Inner = field(default_factory=Inner)


def test_specs_come_from_the_fields():
    specs = {spec.name: spec for spec in option_specs(Inner)}
    assert list(specs) == ["width", "scale", "mode", "cap", "on"]
    assert specs["cap"].kind is int and specs["cap"].optional and specs["mode"].choices == ("a", "b")
    assert specs["scale"].kind is float and specs["scale"].strict and specs["on"].kind is bool


@pytest.mark.parametrize("changes, error, message", [
    ({"width": 0}, InvalidArgument, "width: expected an int >= 1, got 0"),
    ({"width": 2.5}, InvalidArgumentType, "width: expected an int >= 1, got float 2.5"),
    ({"width": True}, InvalidArgumentType, "width: expected an int >= 1, got bool True"),
    ({"scale": 0.0}, InvalidArgument, "scale: expected a number > 0, got 0.0"),
    ({"scale": float("inf")}, InvalidArgument, "scale: expected a number > 0, got inf"),
    ({"mode": "c"}, InvalidArgument, "mode: expected one of ['a', 'b'], got 'c'"),
    ({"cap": 0}, InvalidArgument, "cap: expected an int >= 1, got 0"),
    ({"on": 1}, InvalidArgumentType, "on: expected a bool, got int 1"),
    ({"cap": 2}, InvalidArgument, "cap: expected at least width"),
])
def test_bad_values_name_the_field(changes, error, message):
    with pytest.raises(error) as info:
        Inner(**changes)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_the_command_line_spells_the_same_error_with_flags():
    with pytest.raises(InvalidArgument) as info:
        Inner(width=8, cap=2)
    assert info.value.message(lambda name: "--" + name) == "--cap: expected at least --width"


def test_round_trip_nested_and_unknown_keys():
    outer = Outer(name="y", inner=Inner(width=2, cap=None, on=False))
    assert Outer.from_dict(outer.to_dict()) == outer
    assert outer.to_dict()["inner"] == {"width": 2, "scale": 1.0, "mode": "a", "cap": None, "on": False}
    with pytest.raises(InvalidArgument, match=r"unknown keys \['size'\]"):
        Inner.from_dict({"size": 3})
    with pytest.raises(InvalidArgument, match="inner: expected a Inner"):
        Outer(inner={"width": 3})
    assert outer.replace(name="z").inner is outer.inner


def test_a_saved_config_with_a_removed_option_at_its_neutral_value_still_loads():
    from umilayers.train.config import FitConfig

    saved = FitConfig().to_dict()
    saved["train"]["pseudo_folds"] = 1  # what a run folder written before the removal holds
    assert FitConfig.from_dict(saved) == FitConfig()
    saved["train"]["pseudo_folds"] = 2
    with pytest.raises(InvalidArgument, match=r"pseudo_folds: this option was removed .* got 2"):
        FitConfig.from_dict(saved)
