"""Lagged cross-correlation between the engine's load and the GPU's response.

For a load series x and a response y on the same grid, both standardised (mean removed,
divided by their standard deviation), r(lag) = sum_t x(t) y(t + lag) / n, through
`scipy.signal.correlate` and `correlation_lags`. Only lags >= 0 are searched (the response
after the load) up to `max_lag_s`; the lag with the largest |r| is reported with its signed
r (a clock falls as load rises: r < 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal


@dataclass(frozen=True)
class LaggedCorrelation:
    load: str
    response: str
    lag_s: float | None  # None where either series is constant or missing
    r: float | None
    r_at_zero: float | None


def _standardised(x: np.ndarray) -> np.ndarray | None:
    x = np.asarray(x, dtype=float)
    if not len(x) or not np.all(np.isfinite(x)):
        return None
    sd = x.std()
    if sd == 0:
        return None
    return (x - x.mean()) / sd


def lagged_correlation(load_name: str, load: np.ndarray, response_name: str,
                       response: np.ndarray, bin_s: float, max_lag_s: float) -> LaggedCorrelation:
    x, y = _standardised(load), _standardised(response)
    if x is None or y is None:
        return LaggedCorrelation(load_name, response_name, None, None, None)
    n = len(x)
    r = signal.correlate(y, x, mode="full") / n  # r[k] pairs y(t + lag) with x(t)
    lags = signal.correlation_lags(len(y), len(x), mode="full")
    keep = (lags >= 0) & (lags * bin_s <= max_lag_s)
    r, lags = r[keep], lags[keep]
    best = int(np.argmax(np.abs(r)))
    return LaggedCorrelation(load_name, response_name, float(lags[best] * bin_s),
                             float(r[best]), float(r[0]))
