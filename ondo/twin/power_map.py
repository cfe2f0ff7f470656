"""Recursive least squares, in Kalman form, on the load-to-power map (`adapt_params`):

    P - leak_w_per_c (T_die - leak_ref_c) = idle_power_w + compute_w f_c + memory_w m

from the energy counter's mean power over windows of ENERGY_WINDOW_S or more (`EnergyWindow`),
against the load's mean over the same window; the fast power channel only where there is no
counter. A reading of the fast channel is one instant of a load that switches every few
milliseconds between steps and gaps: its spread is the step's whole power, two-valued, and
a gate on it would keep one side and bias the map; the counter's mean has neither problem.

Each constant moves only while it is identifiable (`free`):
the caller frees the idle power while nothing runs and the load's powers while it runs;
between readings a free constant's variance grows by its drift (the forgetting), a frozen
one's does not. Readings outside the chi-square gate are refused. Estimates stay inside
their physical bounds and variances under their prior's.
"""

from __future__ import annotations

import math

import numpy as np

from ondo.twin.adapt_params import DRIFT_VAR_PER_S, HI, LO, POWER, PRIOR_VAR
from ondo.twin.state_filter import GATE_CHI2, Innovation

ENERGY_WINDOW_S = 0.5
ENERGY_VAR_W2 = 40.0**2  # a window's mean power about the map: noise and unmodelled load
POWER_VAR_W2 = 80.0**2  # one fast power reading about the map
_LO, _HI = LO[POWER], HI[POWER]
_PRIOR_VAR = PRIOR_VAR[POWER]
_DRIFT_VAR_PER_S = DRIFT_VAR_PER_S[POWER]


class PowerMapRLS:
    def __init__(self, theta0: np.ndarray, var0: np.ndarray | None = None) -> None:
        """theta = [idle_power_w, compute_w, memory_w]."""
        self.theta = np.clip(np.asarray(theta0, dtype=float), _LO, _HI)
        var = _PRIOR_VAR if var0 is None else np.minimum(var0, _PRIOR_VAR)
        self.p = np.diag(var)

    def drift(self, dt_s: float, free: np.ndarray) -> None:
        self.p[np.diag_indices(3)] += np.where(free, _DRIFT_VAR_PER_S * dt_s, 0.0)
        self._cap()

    def predicted_w(self, leak_w: float, compute_feature: float, memory_activity: float
                    ) -> float:
        return float(leak_w + self.theta @ [1.0, compute_feature, memory_activity])

    def update(self, power_w: float, leak_w: float, compute_feature: float,
               memory_activity: float, free: np.ndarray, gate: bool = True,
               var_w2: float = ENERGY_VAR_W2) -> Innovation:
        h = np.array([1.0, compute_feature, memory_activity])
        ph = self.p @ h
        s = float(h @ ph) + var_w2
        nu = power_w - self.predicted_w(leak_w, compute_feature, memory_activity)
        if gate and nu * nu > GATE_CHI2 * s:
            return Innovation(nu, s, False)
        k = np.where(free, ph / s, 0.0)
        a = np.eye(3) - np.outer(k, h)
        self.p = a @ self.p @ a.T + var_w2 * np.outer(k, k)  # Joseph: k is not optimal
        self.theta = np.clip(self.theta + k * nu, _LO, _HI)
        self._cap()
        return Innovation(nu, s, True)

    def _cap(self) -> None:
        d = np.diag(self.p)
        scale = np.sqrt(np.minimum(1.0, _PRIOR_VAR / np.maximum(d, 1e-300)))
        self.p = 0.5 * (self.p + self.p.T) * np.outer(scale, scale)


class EnergyWindow:
    """Mean power between refreshes of the energy counter at least ENERGY_WINDOW_S apart."""

    def __init__(self) -> None:
        self._start: tuple[float, float] | None = None  # (time, counter) at the window's start
        self._clock_sum = 0.0
        self._clock_n = 0

    def add(self, t_s: float, energy_j: float | None, refreshed: bool, sm_mhz: float | None
            ) -> tuple[float, float, float, float | None] | None:
        """A poll; (start, end, mean power, mean SM clock) when it closes a window."""
        if sm_mhz is not None and math.isfinite(sm_mhz):
            self._clock_sum += sm_mhz
            self._clock_n += 1
        if energy_j is None or not refreshed or not math.isfinite(energy_j):
            return None
        start = self._start
        if start is None or energy_j < start[1]:  # first, or the counter was reset
            self._restart(t_s, energy_j)
            return None
        if t_s - start[0] < ENERGY_WINDOW_S:
            return None
        clock = self._clock_sum / self._clock_n if self._clock_n else None
        self._restart(t_s, energy_j)
        return start[0], t_s, (energy_j - start[1]) / (t_s - start[0]), clock

    def _restart(self, t_s: float, energy_j: float) -> None:
        self._start = (t_s, energy_j)
        self._clock_sum, self._clock_n = 0.0, 0
