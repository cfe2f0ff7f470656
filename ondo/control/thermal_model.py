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
    activities of its kinds of step, for the ripple. One vectorised evaluation of the power
    model for the busy load, idle and every kind of step."""
    c = np.array([compute_activity, 0.0, *(a for a, _ in steps)], dtype=float)
    m = np.array([memory_activity, 0.0, *(b for _, b in steps)], dtype=float)
    total, hbm = power_split_w(params, c, m, sm_mhz, die_c)
    die_step = hbm_step = None
    if steps:
        die_step = max(0.0, float(np.max(total[2:] - hbm[2:])))
        hbm_step = max(0.0, float(np.max(hbm[2:])))
    return LoadPower(float(total[1]), float(total[0]), float(hbm[1]), float(hbm[0]), die_c,
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


@lru_cache(maxsize=16)
def plan_responses(params: TwinParams, dt_s: float, first: int,
                   steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sensor readings' responses over a plan, stacked over its `steps` model steps:
    (A, B1, B2), each of shape (2, steps, 6), such that the die and HBM sensor readings after
    step i are A[:, i] @ z0 + B1[:, i] @ g1 + B2[:, i] @ g2, where g1 and g2 are Gamma @ d of
    the first move (the first `first` steps) and of the rest. From z_{i+1} = Phi z_i + g:
    A_i = C Phi^(i+1), B1_i = C Phi^(i+1-n1) S_n1, B2_i = C S_(i+1-n1), n1 = min(i+1, first),
    S_n = sum_{j<n} Phi^j."""
    phi, _ = discrete_model(params, dt_s)
    n = phi.shape[0]
    powers = [np.eye(n)]
    for _ in range(steps):
        powers.append(phi @ powers[-1])
    sums = [np.zeros((n, n))]
    for k in range(steps):
        sums.append(sums[-1] + powers[k])
    c = np.zeros((2, n))
    c[0, 4] = c[1, 5] = 1.0  # the die and HBM sensors
    a = np.empty((2, steps, n))
    b1 = np.empty((2, steps, n))
    b2 = np.empty((2, steps, n))
    for i in range(steps):
        n1 = min(i + 1, first)
        a[:, i] = c @ powers[i + 1]
        b1[:, i] = c @ powers[i + 1 - n1] @ sums[n1]
        b2[:, i] = c @ sums[i + 1 - n1]
    for m in (a, b1, b2):
        m.setflags(write=False)
    return a, b1, b2


def forecast_plans(params: TwinParams, z0: np.ndarray, ambient_c: float, power: LoadPower,
                   u_first: np.ndarray, u_then: np.ndarray, first_s: float, horizon_s: float,
                   dt_s: float) -> np.ndarray:
    """Die and HBM sensor readings for each plan (u_first for first_s, then u_then) at every
    dt_s up to horizon_s, the busy steps' ripple included: shape (2, steps, plans).

    The model is linear in the state and in the level, so every plan's forecast is the free
    response plus each move's level times that move's response (`plan_responses`, computed
    once per model): a few matrix-vector products whatever the number of plans."""
    _, gam = discrete_model(params, dt_s)
    steps = int(round(horizon_s / dt_s))
    first = int(round(first_s / dt_s))
    a, b1, b2 = plan_responses(params, dt_s, first, steps)
    k = params.leak_w_per_c
    # Gamma d(u) = g0 + u gu: leakage enters through the state, the inputs carry power at
    # T_die = 0; total and HBM power are affine in the level.
    idle_die0 = power.idle_w - power.hbm_idle_w - k * power.die_c
    span_die = (power.busy_w - power.hbm_busy_w) - (power.idle_w - power.hbm_idle_w)
    g0 = gam @ np.array([idle_die0, power.hbm_idle_w, ambient_c])
    gu = gam @ np.array([span_die, power.hbm_busy_w - power.hbm_idle_w, 0.0])
    base = a @ np.asarray(z0, dtype=float) + (b1 + b2) @ g0  # (2, steps)
    out = (base[:, :, None] + (b1 @ gu)[:, :, None] * np.asarray(u_first, dtype=float)
           + (b2 @ gu)[:, :, None] * np.asarray(u_then, dtype=float))
    first_ripple, then_ripple = ripple_c(params, power, u_first), ripple_c(params, power, u_then)
    out[:, :first] += np.stack(first_ripple)[:, None, :]
    out[:, first:] += np.stack(then_ripple)[:, None, :]
    return out


def full_load_peaks(params: TwinParams, z0: np.ndarray, ambient_c: float, power: LoadPower,
                    horizon_s: float, dt_s: float) -> tuple[float, float]:
    """The peak die and HBM sensor readings of a plan that stays at full load (u = 1) over
    the horizon, no ripple (at u = 1 the level is the busy load): two matrix-vector
    products, for the policy's cheap bound."""
    phi, gam = discrete_model(params, dt_s)
    steps = int(round(horizon_s / dt_s))
    a, b1, b2 = plan_responses(params, dt_s, 1, steps)
    die0 = power.busy_w - power.hbm_busy_w - params.leak_w_per_c * power.die_c
    g = gam @ np.array([die0, power.hbm_busy_w, ambient_c])
    out = a @ np.asarray(z0, dtype=float) + (b1 + b2) @ g
    return float(out[0].max()), float(out[1].max())


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
        self.cov = np.diag([25.0**2, 0.25**2])
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
