"""Kalman filter over the thermal network's temperatures and the inlet, for constants that
change while it runs (the online twin's; `estimator.py` is the fixed-constant one).

    x = [T_die, T_hbm, T_sink, T_board, die sensor, HBM sensor, T_inlet]

Predict (every poll, dt seconds): the network discretised exactly for the present constants,
driven by the measured power over the interval, of which the HBM takes `hbm_w`; the inlet is
a random walk. Update: one temperature reading at a time, gated on its normalised innovation
nu^2 / (S + GATE_MODEL_VAR_C2) (chi-square, one degree of freedom; the allowance is the
model's own error in a transient, which is not a bad reading): a reading outside the gate is
not used, and the caller counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import expm

from ondo.twin.adapt_params import INLET_BOUNDS_C
from ondo.twin.fit import N_THERMAL, thermal_ab
from ondo.twin.params import TwinParams

N_X = N_THERMAL + 1
I_INLET = N_THERMAL
I_DIE_SENSOR, I_HBM_SENSOR = 4, 5
SENSOR_VAR_C2 = 1 / 12 + 0.25  # integer quantisation plus sensor noise
# Process noise [C^2/s]: the fast nodes carry the power split's error, the inlet drifts.
Q_X_C2_PER_S = np.array([4.0, 4.0, 0.05, 0.01, 0.0, 0.0, 0.02])
GATE_CHI2 = 10.83  # 99.9 % of chi-square with one degree of freedom
GATE_MODEL_VAR_C2 = 4.0


@dataclass(frozen=True)
class Innovation:
    """One scalar measurement's outcome."""

    residual: float  # reading minus the filter's prediction of it
    variance: float  # of that residual, as the filter sees it
    accepted: bool


def discretize(a: np.ndarray, b: np.ndarray, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(Phi, Gamma) of dx/dt = A x + B u with u held over dt_s, exactly: through A's
    eigenvectors (an RC network has real, distinct modes), else the matrix exponential."""
    w, v = np.linalg.eig(a)
    if np.max(np.abs(w.imag)) < 1e-9 * (1 + np.max(np.abs(w.real))) and np.linalg.cond(v) < 1e8:
        w, v = w.real, v.real
        vi = np.linalg.inv(v)
        wdt = w * dt_s
        safe_w = np.where(np.abs(wdt) > 1e-12, w, 1.0)
        phi1 = np.where(np.abs(wdt) > 1e-12, np.expm1(wdt) / safe_w, dt_s)
        return (v * np.exp(wdt)) @ vi, (v * phi1) @ (vi @ b)
    n, m = b.shape
    big = np.zeros((n + m, n + m))
    big[:n, :n], big[:n, n:] = a * dt_s, b * dt_s
    e = expm(big)
    return e[:n, :n], e[:n, n:]


def rest_state(p: TwinParams, temp_c: float, mem_temp_c: float, power_w: float,
               hbm_w: float) -> np.ndarray:
    """x at rest for the present power, shifted so that the die sensor agrees with its
    reading (the shift goes to the inlet, kept within its bounds)."""
    board = p.ambient_c + p.board_amb_c_per_w * power_w
    sink = board + p.sink_board_c_per_w * power_w
    die = sink + p.die_sink_c_per_w * (power_w - hbm_w)
    inlet = float(np.clip(p.ambient_c + temp_c - die, *INLET_BOUNDS_C))
    shift = inlet - p.ambient_c
    return np.array([temp_c, mem_temp_c, sink + shift, board + shift, temp_c, mem_temp_c,
                     inlet])


class StateFilter:
    """Call `predict` once per poll with the constants in force, then `update_sensor`."""

    def __init__(self, x0: np.ndarray) -> None:
        self.x = np.array(x0, dtype=float)
        self.p = np.diag([1.0, 1.0, 4.0, 9.0, 1.0, 1.0, 16.0])
        self._key: tuple | None = None
        self._phi = self._gam = np.zeros(0)

    def predict(self, params: TwinParams, params_key: bytes, dt_s: float, power_w: float,
                hbm_w: float, inlet_var_c2_per_s: float = Q_X_C2_PER_S[I_INLET]) -> None:
        key = (params_key, int(round(dt_s * 1e5)))
        if key != self._key:
            self._phi, self._gam = discretize(*thermal_ab(params), dt_s)
            self._key = key
        phi, gam = self._phi, self._gam
        x6 = self.x[:N_THERMAL]
        self.x[:N_THERMAL] = phi @ x6 + gam @ np.array([power_w - hbm_w, hbm_w, self.x[I_INLET]])
        f = np.eye(N_X)
        f[:N_THERMAL, :N_THERMAL] = phi
        f[:N_THERMAL, I_INLET] = gam[:, 2]
        q = Q_X_C2_PER_S.copy()
        q[I_INLET] = inlet_var_c2_per_s
        self.p = f @ self.p @ f.T + np.diag(q * dt_s)

    def update_sensor(self, index: int, reading_c: float, gate: bool = True) -> Innovation:
        """A temperature reading of the die (I_DIE_SENSOR) or HBM (I_HBM_SENSOR) sensor."""
        ph = self.p[:, index]
        s = float(ph[index]) + SENSOR_VAR_C2
        nu = reading_c - float(self.x[index])
        if gate and nu * nu > GATE_CHI2 * (s + GATE_MODEL_VAR_C2):
            return Innovation(nu, s, False)
        k = ph / s
        self.x = self.x + k * nu
        self.p = self.p - np.outer(k, ph)
        self.p = 0.5 * (self.p + self.p.T)
        self.x[I_INLET] = float(np.clip(self.x[I_INLET], *INLET_BOUNDS_C))
        return Innovation(nu, s, True)

    def inflate_level(self, sensor_index: int, var: float) -> None:
        """Let the temperature level seen by a sensor jump (after readings the gate kept
        refusing but that move together): `var` of common-mode uncertainty on that sensor,
        its node, the heatsink, the board and the inlet, so that a reading moves them as one
        and the shift persists, rather than the sensor alone and the model pulling it back."""
        node = 0 if sensor_index == I_DIE_SENSOR else 1
        v = np.zeros(N_X)
        v[[node, sensor_index, 2, 3, I_INLET]] = 1.0
        self.p = self.p + var * np.outer(v, v)

    def sensor_std_c(self, index: int) -> float:
        return float(np.sqrt(max(self.p[index, index], 0.0)))
