"""The predictive governor's model: the twin's thermal network and power model, linear in the
engine's load level, so that hundreds of candidate plans are forecast at once.

State z = [die, hbm, heatsink, board, die sensor, HBM sensor] (°C), inputs [P_die, P_hbm,
T_inlet]: the same equations and constants as the twin's plant (`ondo/twin/plant.py`),
exactly discretized (matrix exponential) at `dt_s`, with the die's leakage (k_leak W/°C)
folded into its dynamics. The plant is linear in power at a fixed clock, and its power is
linear in the fraction of time the engine steps, so a plan of load levels maps to a forecast
by matrix products. The clock controllers are left out: the plans this model accepts keep
the GPU below the temperatures where they act.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.linalg import expm

from ondo.engine.scheduler_limits import DEFAULT_SLICE_S
from ondo.twin.fit import thermal_matrices
from ondo.twin.params import TwinParams
from ondo.twin.plant import power_split_w

N_STATE = 6


@lru_cache(maxsize=16)
def discrete_model(params: TwinParams, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(Phi, Gamma): z' = Phi z + Gamma [P_die0, P_hbm, T_inlet] over dt_s, where the die's
    power is P_die0 + k_leak (T_die - T_ref) and P_die0 is taken at T_die = T_ref = 0."""
    a, b, _, _ = thermal_matrices(params, dt_s)
    a = a.copy()
    a[0, 0] += params.leak_w_per_c / params.die_c_j_per_c
    n, m = a.shape[0], b.shape[1]
    big = np.zeros((n + m, n + m))
    big[:n, :n], big[:n, n:] = a * dt_s, b * dt_s
    e = expm(big)
    return e[:n, :n], e[:n, n:]


@dataclass(frozen=True)
class LoadPower:
    """Power at a load level u (the fraction of wall time the engine steps, 0 to 1):
    total(u) = idle_w + u * (busy_w - idle_w), of which hbm(u) in the HBM; both evaluated at
    the die temperature `die_c`, whose later changes the model's leakage term carries."""

    idle_w: float
    busy_w: float
    hbm_idle_w: float
    hbm_busy_w: float
    die_c: float
    die_step_w: float | None = None  # the die's power in its hungriest kind of step
    hbm_step_w: float | None = None

    def total_w(self, u):
        return self.idle_w + np.asarray(u) * (self.busy_w - self.idle_w)

    def hbm_w(self, u):
        return self.hbm_idle_w + np.asarray(u) * (self.hbm_busy_w - self.hbm_idle_w)

    def level_for_power(self, power_w: float) -> float:
        """The load level that draws `power_w` (unclipped)."""
        span = self.busy_w - self.idle_w
        return float("inf") if span <= 1e-9 else (power_w - self.idle_w) / span


def load_power(params: TwinParams, compute_activity: float, memory_activity: float,
               sm_mhz: float, die_c: float,
               steps: tuple[tuple[float, float], ...] = ()) -> LoadPower:
    """`LoadPower` for the engine's busy load (activities in the plant's units); `steps`: the
    activities of its kinds of step, for the ripple."""
    busy, hbm_busy = power_split_w(params, compute_activity, memory_activity, sm_mhz, die_c)
    idle, hbm_idle = power_split_w(params, 0.0, 0.0, sm_mhz, die_c)
    die_step = hbm_step = None
    for a_c, a_m in steps:
        total, hbm = power_split_w(params, a_c, a_m, sm_mhz, die_c)
        die_step = max(die_step or 0.0, float(total - hbm))
        hbm_step = max(hbm_step or 0.0, float(hbm))
    return LoadPower(float(idle), float(busy), float(hbm_idle), float(hbm_busy), die_c,
                     die_step, hbm_step)


def ripple_c(params: TwinParams, power: LoadPower, u,
             busy_s: float = DEFAULT_SLICE_S) -> tuple[np.ndarray, np.ndarray]:
    """How far the die and HBM rise above their level-averaged temperature while the engine
    steps: the die and HBM nodes follow power within tens of milliseconds (C R = 14 and
    35 ms in the H100 fit), as fast as a slice of steps, so a duty-cycled engine heats them
    to the busy power's level over the heatsink, not to the average's; and within the busy
    time each kind of step (prefill-heavy: the die; decode: the HBM) to its own."""
    u = np.asarray(u, dtype=float)
    die_busy = power.busy_w - power.hbm_busy_w
    if power.die_step_w is not None:
        die_busy = max(die_busy, power.die_step_w)
    hbm_busy = max(power.hbm_busy_w, power.hbm_step_w or 0.0)
    die_w = power.total_w(u) - power.hbm_w(u)
    # How far node and sensor get in `busy_s` (a slice of steps, or one long step).
    die_reach = -np.expm1(-busy_s / (params.die_c_j_per_c * params.die_sink_c_per_w
                                     + params.temp_sensor_tau_s))
    hbm_reach = -np.expm1(-busy_s / (params.hbm_c_j_per_c * params.hbm_sink_c_per_w
                                     + params.mem_temp_sensor_tau_s))
    die = die_reach * params.die_sink_c_per_w * np.maximum(0.0, die_busy - die_w)
    hbm = hbm_reach * params.hbm_sink_c_per_w * np.maximum(0.0, hbm_busy - power.hbm_w(u))
    return die, hbm


def forecast_plans(params: TwinParams, z0: np.ndarray, ambient_c: float, power: LoadPower,
                   u_first: np.ndarray, u_then: np.ndarray, first_s: float, horizon_s: float,
                   dt_s: float) -> np.ndarray:
    """Die and HBM sensor readings for each plan (u_first for first_s, then u_then) at every
    dt_s up to horizon_s, the busy steps' ripple included: shape (2, steps, plans)."""
    phi, gam = discrete_model(params, dt_s)
    steps = int(round(horizon_s / dt_s))
    first = int(round(first_s / dt_s))
    plans = len(u_first)
    z = np.repeat(np.asarray(z0, dtype=float)[:, None], plans, axis=1)
    k = params.leak_w_per_c
    out = np.empty((2, steps, plans))
    for i in range(steps):
        u = u_first if i < first else u_then
        total, hbm = power.total_w(u), power.hbm_w(u)
        # Leakage enters through the state; the inputs carry power at T_die = 0.
        die0 = total - hbm - k * power.die_c
        inputs = np.stack([die0, hbm, np.full(plans, ambient_c)])
        z = phi @ z + gam @ inputs
        out[0, i], out[1, i] = z[4], z[5]
    first_ripple, then_ripple = ripple_c(params, power, u_first), ripple_c(params, power, u_then)
    out[:, :first] += np.stack(first_ripple)[:, None, :]
    out[:, first:] += np.stack(then_ripple)[:, None, :]
    return out


class PowerCalibration:
    """The twin's power model corrected online: measured = P_idle + b + g s (P_busy - P_idle),
    s the share of the last second the engine stepped, b an offset and g a gain estimated by
    a Kalman filter (a random walk each, around b = 0, g = 1) from NVML's 1 s average. The
    offset removes a steady error (as integral action would); the gain, a wrong slope (a twin
    fitted on another GPU, a load map in other units), which an offset alone would turn into
    overshoot at every change of level."""

    def __init__(self, noise_w: float = 10.0, offset_walk_w: float = 5.0,
                 gain_walk: float = 0.05, gain_range: tuple[float, float] = (0.25, 4.0)) -> None:
        self.theta = np.array([0.0, 1.0])  # offset W, gain
        self.cov = np.diag([50.0**2, 0.5**2])
        self.noise_w2 = noise_w**2
        self.walk = np.array([offset_walk_w**2, gain_walk**2])  # per second
        self.gain_range = gain_range

    @property
    def offset_w(self) -> float:
        return float(self.theta[0])

    @property
    def gain(self) -> float:
        return float(self.theta[1])

    def update(self, measured_w: float, idle_w: float, busy_span_w: float, dt_s: float) -> None:
        """`busy_span_w`: s (P_busy - P_idle) over the same second as the measurement."""
        self.cov = self.cov + np.diag(self.walk * max(dt_s, 0.0))
        x = np.array([1.0, busy_span_w])
        innovation = measured_w - idle_w - float(x @ self.theta)
        k = self.cov @ x / (float(x @ self.cov @ x) + self.noise_w2)
        self.theta = self.theta + k * innovation
        self.cov = self.cov - np.outer(k, x @ self.cov)
        self.theta[1] = min(max(self.theta[1], self.gain_range[0]), self.gain_range[1])

    def apply(self, lp: LoadPower) -> LoadPower:
        b, g = self.offset_w, self.gain
        die_idle = lp.idle_w - lp.hbm_idle_w
        die_step = None if lp.die_step_w is None else die_idle + b + g * (lp.die_step_w - die_idle)
        return LoadPower(lp.idle_w + b, lp.idle_w + b + g * (lp.busy_w - lp.idle_w),
                         lp.hbm_idle_w, lp.hbm_idle_w + g * (lp.hbm_busy_w - lp.hbm_idle_w),
                         lp.die_c, die_step, lp.hbm_step_w)
