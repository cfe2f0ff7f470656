"""Replay a trace through the twin: estimate at every row, forecast every row H seconds ahead."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ondo.twin.engine_load import in_plant_units
from ondo.twin.estimator import ThermalEstimator
from ondo.twin.params import TwinParams
from ondo.twin.plant import (
    THERMAL_BITS,
    THROTTLE_SW_POWER_CAP,
    advance,
    initial_state,
    reported_sm_mhz,
    throttle_reasons,
)
from ondo.twin.traces import Trace

FORWARD_DT_S = 0.01


@dataclass(frozen=True)
class Replay:
    """Per row of a trace: the twin's forecast of that row made horizon_s earlier."""

    t_s: np.ndarray
    temp_c_pred: np.ndarray
    mem_temp_c_pred: np.ndarray
    power_w_pred: np.ndarray
    sm_mhz_pred: np.ndarray
    power_cap_pred: np.ndarray  # bool
    thermal_slowdown_pred: np.ndarray  # bool


def hbm_power_w(params: TwinParams, memory_activity) -> np.ndarray:
    return (
        params.hbm_idle_power_w
        + params.hbm_share_of_memory * params.memory_power_w * np.asarray(memory_activity)
    )


def estimate_states(params: TwinParams, tr: Trace) -> np.ndarray:
    """Kalman state (ThermalEstimator.x) after each row's measurements, shape (rows, 7)."""
    tr = in_plant_units(params, tr)
    _, a_m = tr.load_at(tr.t_s, params.load_delay_s)
    hbm_w = hbm_power_w(params, a_m)
    est = ThermalEstimator(params, tr.temp_c[0], tr.mem_temp_c[0], tr.power_fast_w[0], hbm_w[0])
    out = np.empty((len(tr), len(est.x)))
    prev_t = tr.t_s[0]
    for i in range(len(tr)):
        dt = tr.t_s[i] - prev_t
        prev_t = tr.t_s[i]
        if dt > 0:
            # The power over (t_prev, t] is best known as the previous row's fast reading.
            j = max(i - 1, 0)
            est.update(dt, tr.power_fast_w[j], hbm_w[j], tr.temp_c[i], tr.mem_temp_c[i])
        else:
            est.update(1e-3, tr.power_fast_w[i], hbm_w[i], tr.temp_c[i], tr.mem_temp_c[i])
        out[i] = est.x
    return out


def check_horizon(horizon_s: float) -> None:
    """ValueError unless a forecast horizon is a positive, finite number of seconds: a
    negative one runs the plant backwards (it blows up), an infinite one never ends."""
    if not (math.isfinite(horizon_s) and horizon_s > 0):
        raise ValueError(f"the horizon must be a positive number of seconds, got {horizon_s}")


def forward_steps(horizon_s: float, span_s: np.ndarray, dt_s: float) -> int:
    """Plant steps for every row's span at once: horizon_s / dt_s, but no more than the
    longest span needs. Where the horizon is within the trace some row spans all of it, so
    this is horizon_s / dt_s; beyond it, every row starts at the first and the steps stop
    at the trace's end, instead of running (hours, for a horizon of years) past it."""
    return max(1, int(np.ceil(min(horizon_s, float(np.max(span_s))) / dt_s)))


def replay(
    params: TwinParams, tr: Trace, horizon_s: float, forward_dt_s: float = FORWARD_DT_S
) -> Replay:
    """For every row at t: estimate from rows up to t - horizon_s, then simulate forward to t
    with the trace's own load over (t - horizon_s, t]. All rows are simulated together.
    An engine load descriptor goes through the params' engine load map first."""
    check_horizon(horizon_s)
    tr = in_plant_units(params, tr)
    x = estimate_states(params, tr)
    origin = np.searchsorted(tr.t_s, tr.t_s - horizon_s, side="right") - 1
    origin = np.clip(origin, 0, len(tr) - 1)
    span_s = tr.t_s - tr.t_s[origin]
    n_steps = forward_steps(horizon_s, span_s, forward_dt_s)
    dt = span_s / n_steps
    xo = x[origin]
    capped = (tr.throttle_reasons[origin] & THROTTLE_SW_POWER_CAP) > 0
    s = initial_state(
        params,
        xo[:, 0],
        xo[:, 1],
        xo[:, 2],
        xo[:, 3],
        tr.sm_mhz[origin],
        tr.power_w[origin],
        shape=(len(tr),),
    )
    s.die_sensor_c, s.hbm_sensor_c = xo[:, 4].copy(), xo[:, 5].copy()
    s.power_instant_w = tr.power_fast_w[origin].copy()
    s.cap_power_w = tr.power_fast_w[origin].copy()
    s.power_req_mhz = np.where(capped, tr.sm_mhz[origin], params.sm_max_mhz)
    ambient = xo[:, 6]
    t0 = tr.t_s[origin]
    for k in range(n_steps):
        a_c, a_m = tr.load_at(t0 + (k + 0.5) * dt, params.load_delay_s)
        advance(s, params, dt, a_c, a_m, ambient)
    bits = throttle_reasons(s, params)
    return Replay(
        t_s=tr.t_s.copy(),
        temp_c_pred=s.die_sensor_c,
        mem_temp_c_pred=s.hbm_sensor_c,
        power_w_pred=s.power_avg_w,
        sm_mhz_pred=reported_sm_mhz(s, params),
        power_cap_pred=(bits & THROTTLE_SW_POWER_CAP) > 0,
        thermal_slowdown_pred=(bits & THERMAL_BITS) > 0,
    )


@dataclass(frozen=True)
class Score:
    temp_rmse_c: float
    mem_temp_rmse_c: float
    sm_mae_frac_capped: float  # mean |error| / measured clock over rows the GPU reports capped
    power_cap_agreement: float
    rows: int


def score(rep: Replay, tr: Trace, start_s: float = -np.inf, stop_s: float = np.inf) -> Score:
    m = (tr.t_s >= start_s) & (tr.t_s < stop_s)
    cap = (tr.throttle_reasons & THROTTLE_SW_POWER_CAP) > 0
    mc = m & cap
    return Score(
        temp_rmse_c=float(np.sqrt(np.mean((np.round(rep.temp_c_pred) - tr.temp_c)[m] ** 2))),
        mem_temp_rmse_c=float(
            np.sqrt(np.mean((np.round(rep.mem_temp_c_pred) - tr.mem_temp_c)[m] ** 2))
        ),
        sm_mae_frac_capped=float(np.mean(np.abs(rep.sm_mhz_pred - tr.sm_mhz)[mc] / tr.sm_mhz[mc]))
        if mc.any()
        else 0.0,
        power_cap_agreement=float(np.mean(rep.power_cap_pred[m] == cap[m])),
        rows=int(m.sum()),
    )
