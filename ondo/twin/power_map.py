"""Recursive least squares, in Kalman form, on the load-to-power map (`adapt_params`):

    P - leak_w_per_c (T_die - leak_ref_c) = idle_power_w + compute_w f_c + memory_w m

from the fast power channel. Each constant moves only while it is identifiable (`free`):
the caller frees the idle power while nothing runs and the load's powers while it runs;
between readings a free constant's variance grows by its drift (the forgetting), a frozen
one's does not. Readings outside the chi-square gate are refused. Estimates stay inside
their physical bounds and variances under their prior's.
"""

from __future__ import annotations

import numpy as np

from ondo.twin.adapt_params import DRIFT_VAR_PER_S, HI, LO, POWER, PRIOR_VAR
from ondo.twin.state_filter import GATE_CHI2, Innovation

POWER_VAR_W2 = 80.0**2  # the fast power channel about the map: noise and unmodelled load
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
               memory_activity: float, free: np.ndarray, gate: bool = True) -> Innovation:
        h = np.array([1.0, compute_feature, memory_activity])
        ph = self.p @ h
        s = float(h @ ph) + POWER_VAR_W2
        nu = power_w - self.predicted_w(leak_w, compute_feature, memory_activity)
        if gate and nu * nu > GATE_CHI2 * s:
            return Innovation(nu, s, False)
        k = np.where(free, ph / s, 0.0)
        a = np.eye(3) - np.outer(k, h)
        self.p = a @ self.p @ a.T + POWER_VAR_W2 * np.outer(k, k)  # Joseph: k is not optimal
        self.theta = np.clip(self.theta + k * nu, _LO, _HI)
        self._cap()
        return Innovation(nu, s, True)

    def _cap(self) -> None:
        d = np.diag(self.p)
        scale = np.sqrt(np.minimum(1.0, _PRIOR_VAR / np.maximum(d, 1e-300)))
        self.p = 0.5 * (self.p + self.p.T) * np.outer(scale, scale)
