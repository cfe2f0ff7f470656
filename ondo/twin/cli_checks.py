"""What `ondo twin predict` and `ondo twin adapt` check of their flags before they run, so
that bad input ends with one line naming the flag and the value, and nothing is written."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ondo.twin.traces import Trace


def refused(e: Exception | str) -> int:
    """Bad input's one line and exit status, as `ondo.cli.main` gives them: said here too
    since the commands' functions are also called without it."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def read_trace_arg(path: str) -> Trace:
    """The --trace file; ValueError "--trace: PATH: why" where it cannot be read or is none,
    as `ondo twin adapt` words it."""
    from ondo.twin.traces import read_trace

    try:
        return read_trace(path)
    except OSError as e:
        raise ValueError(f"--trace: {path}: cannot read it: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"--trace: {e}") from None


def check_horizon(horizon_s: float) -> None:
    if not (math.isfinite(horizon_s) and horizon_s > 0):
        raise ValueError(f"--horizon-s must be a positive number of seconds, got {horizon_s}")


def check_horizon_within(horizon_s: float, t_s: Sequence[float] | np.ndarray,
                         trace: str) -> None:
    """A horizon is at most the trace's length: no row is forecast from further back than
    its first, so a longer one would label forecasts with a horizon none of them has (and
    the plant would step through all of it: hours, for a horizon of years)."""
    length_s = float(t_s[-1] - t_s[0]) if len(t_s) else 0.0
    if horizon_s <= length_s:
        return
    if length_s <= 0:
        raise ValueError(f"--trace {trace}: its rows are all at one time: no row can be "
                         "forecast from an earlier one")
    most_s = math.floor(length_s * 1000) / 1000  # printed rounded down: it must be allowed
    raise ValueError(f"--horizon-s {horizon_s:g} is longer than --trace {trace} "
                     f"({length_s:g} s from its first row to its last): no row can be "
                     f"forecast that far ahead; give at most {most_s:g}")


def check_score_from(from_s: float | None) -> None:
    if from_s is not None and not math.isfinite(from_s):
        raise ValueError(f"--score-from-s must be a finite number of seconds, got {from_s}")


def check_score_window(from_s: float | None, scored_t_s: np.ndarray, trace: str) -> None:
    """ValueError where no row would be scored (`scored_t_s`: the times of those that can
    be): a score of no rows is no number."""
    if from_s is not None and not np.any(np.asarray(scored_t_s) >= from_s):
        end = f" (its last is at {float(np.max(scored_t_s)):g} s)" if len(scored_t_s) else ""
        raise ValueError(f"--score-from-s {from_s:g}: no row of --trace {trace} to score "
                         f"from then on{end}")


def score_json(horizon_s: float, from_s: float, score: dict) -> str:
    """The score line: a figure with nothing to take its mean of (every reading missing) is
    null, since NaN is not JSON."""
    out = {"horizon_s": horizon_s, "from_s": from_s, **score}
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in out.items()}, allow_nan=False)
