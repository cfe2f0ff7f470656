"""The kernels' switches, read from the environment: on/off ("0" or "1"), whole numbers
and labels of launch configurations, anything else refused with the variable's name, so
that a typo fails at start rather than running the other way."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_off(name: str, default: bool) -> bool:
    """The switch `name`: "1" on, "0" off, unset `default`."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def whole_number(name: str, unit: str, minimum: int) -> int | None:
    """The whole number of `unit` in `name`, at least `minimum`; None when unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of {unit}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {minimum} or more, got {number}")
    return number


def labelled(name: str, parse: Callable[[str], T]) -> T | None:
    """What `parse` makes of the variable `name` (a label naming a launch configuration);
    None when unset. A label `parse` refuses is refused with the variable's name."""
    label = os.environ.get(name)
    if label is None:
        return None
    try:
        return parse(label)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
