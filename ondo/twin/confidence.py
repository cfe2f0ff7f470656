"""How sure a forecast is: a band from the twin's own recent forecast errors, and the
probability of a thermal slowdown within the horizon.

The band is empirical: every forecast whose time has come is scored against the reading,
and the band's sigma is sqrt(pi/2) times an exponentially weighted mean of the absolute
errors (time constant BAND_TAU_S; for Gaussian errors that is their standard deviation, and
a few large misses, such as the first seconds of learning, do not dominate it as they would
a root mean square). So it covers what the model misses (load it did not plan, constants
still adapting, sensor rounding), not only what the filter's covariance knows. Until
MIN_ERRORS errors are in, the filter's own standard deviation plus a prior stands in. The
band is forecast +- Z_BAND sigma (a nominal 90 % two-sided interval).

The probability of a thermal slowdown within the horizon treats the forecast peaks as
Gaussian with that sigma: P = 1 - (1 - Phi((die_peak - T_sw) / sigma_die))
(1 - Phi((hbm_peak - T_hbm_max) / sigma_hbm)).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

Z_BAND = 1.645
PRIOR_SIGMA_C = 2.0
BAND_TAU_S = 30.0
MIN_ERRORS = 20
MEAN_ABS_TO_SIGMA = math.sqrt(math.pi / 2)


@dataclass
class ErrorBand:
    """Exponentially weighted mean absolute error of one channel's forecasts."""

    tau_s: float = BAND_TAU_S
    prior_sigma_c: float = PRIOR_SIGMA_C
    min_errors: int = MIN_ERRORS
    mean_abs_c: float = 0.0
    errors: int = 0
    last_t_s: float | None = None

    def add(self, t_s: float, error_c: float) -> None:
        if not math.isfinite(error_c):
            return
        if self.last_t_s is None or self.errors == 0:
            w = 1.0
        else:
            w = -math.expm1(-max(t_s - self.last_t_s, 0.0) / self.tau_s)
            if self.errors < self.min_errors:  # a plain mean of the first few
                w = max(w, 1.0 / (self.errors + 1))
        self.mean_abs_c += w * (abs(error_c) - self.mean_abs_c)
        self.errors += 1
        self.last_t_s = t_s

    def sigma_c(self, filter_std_c: float = 0.0) -> float:
        prior = math.hypot(self.prior_sigma_c, filter_std_c)
        if self.errors < self.min_errors:
            return prior
        return max(MEAN_ABS_TO_SIGMA * self.mean_abs_c, 0.5)  # not under the sensor's rounding

    def half_width_c(self, filter_std_c: float = 0.0) -> float:
        return Z_BAND * self.sigma_c(filter_std_c)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def throttle_probability(die_peak_c: float, die_sigma_c: float, sw_thermal_c: float,
                         hbm_peak_c: float, hbm_sigma_c: float, mem_max_c: float) -> float:
    """Probability that a thermal slowdown starts within the horizon."""
    p_die = normal_cdf((die_peak_c - sw_thermal_c) / max(die_sigma_c, 1e-6))
    p_hbm = normal_cdf((hbm_peak_c - mem_max_c) / max(hbm_sigma_c, 1e-6))
    return 1.0 - (1.0 - p_die) * (1.0 - p_hbm)


@dataclass(frozen=True)
class Bands:
    die_band_c: float  # the forecast is +- this
    hbm_band_c: float
    throttle_probability: float


class ForecastScorer:
    """A live twin's forecasts, scored as their time comes: `forecast` records what the
    sensors should read at a time, `reading` scores the forecasts that time has reached."""

    def __init__(self, max_pending: int = 4096) -> None:
        self.die = ErrorBand()
        self.hbm = ErrorBand()
        self._pending: deque[tuple[float, float, float]] = deque(maxlen=max_pending)

    def forecast(self, t_target_s: float, die_c: float, hbm_c: float) -> None:
        self._pending.append((t_target_s, die_c, hbm_c))

    def reading(self, t_s: float, die_c: float | None, hbm_c: float | None) -> None:
        while self._pending and self._pending[0][0] <= t_s:
            _, die_pred, hbm_pred = self._pending.popleft()
            if die_c is not None:
                self.die.add(t_s, die_c - die_pred)
            if hbm_c is not None:
                self.hbm.add(t_s, hbm_c - hbm_pred)

    def bands(self, die_std_c: float, hbm_std_c: float, die_peak_c: float,
              sw_thermal_c: float, hbm_peak_c: float, mem_max_c: float) -> Bands:
        sd, sh = self.die.sigma_c(die_std_c), self.hbm.sigma_c(hbm_std_c)
        return Bands(Z_BAND * sd, Z_BAND * sh,
                     throttle_probability(die_peak_c, sd, sw_thermal_c, hbm_peak_c, sh,
                                          mem_max_c))
