"""argparse types for the benchmarks' numeric flags: a value out of range is refused when
the command line is read, naming the flag, before an engine starts or a request is sent."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def sampling_hz(text: str) -> float:
    """A telemetry sampling rate, in the range the NVML poller takes."""
    from ondo.telemetry.polling import MAX_HZ

    value = _number(text, float)
    if not 0 < value <= MAX_HZ:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_HZ:g}] Hz, got {text}")
    return value


def writable_file(text: str) -> str:
    """A file the command will write when it ends: refused now if it could not be, so that
    no run is lost to a bad path. Nothing is created."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {folder} to write {path.name} in")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text
