"""Canonical bytes of an event and the hash chain over them.

The same event gives the same bytes on every machine and Python version: JSON with keys
sorted, no spaces, ASCII only, integers as integers, and every float written with exactly
`FLOAT_DECIMALS` decimals (correctly rounded, negative zero written as zero; NaN and
infinities refused). Nothing depends on `repr`.

Entry n's hash is sha256(hash of entry n-1, a newline, entry n's canonical body), hex; the
entry before the first is `GENESIS_HASH`. The head hash therefore names the whole history.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from typing import Any

FLOAT_DECIMALS = 6
GENESIS_HASH = hashlib.sha256(b"ondo event log genesis v1").hexdigest()


def canonical_float(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"{x} has no canonical form: events hold finite numbers only")
    text = f"{x:.{FLOAT_DECIMALS}f}"
    if text.startswith("-") and not text.strip("-0."):
        return text[1:]  # -0.000000: the same number as 0.000000
    return text


def plain(value: Any) -> Any:
    """`value` as plain JSON types (dict, list, str, int, float, bool, None): numpy scalars,
    enums, tuples, sets (sorted) and dataclasses are converted; anything else is refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return plain(value.item())  # a numpy scalar
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"event fields are named by strings, not {type(k).__name__} {k!r}")
            out[k] = plain(v)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    raise TypeError(f"{type(value).__name__} {value!r} has no canonical JSON form")


def canonical_json(value: Any) -> str:
    """The canonical text of a plain JSON value (see `plain`)."""
    parts: list[str] = []
    _encode(plain(value), parts)
    return "".join(parts)


def _encode(v: Any, out: list[str]) -> None:
    if v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, float):
        out.append(canonical_float(v))
    elif isinstance(v, str):
        out.append(json.dumps(v, ensure_ascii=True))
    elif isinstance(v, list):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:  # dict
        out.append("{")
        for i, key in enumerate(sorted(v)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=True))
            out.append(":")
            _encode(v[key], out)
        out.append("}")


def chain_hash(prev_hash: str, body: str) -> str:
    """The hash of an entry whose canonical body is `body`, after the entry `prev_hash`."""
    return hashlib.sha256(f"{prev_hash}\n{body}".encode("ascii")).hexdigest()
