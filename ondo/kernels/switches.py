"""The attention kernels' on/off switches, read from the environment: "0" or "1", anything
else refused with the variable's name, so that a typo fails at start rather than running
the other way."""

from __future__ import annotations

import os


def on_off(name: str, default: bool) -> bool:
    """The switch `name`: "1" on, "0" off, unset `default`."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"
