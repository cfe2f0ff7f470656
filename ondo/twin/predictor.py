"""Forecasts: from an estimated state and a planned load, the plant's trajectory ahead."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ondo.twin.estimator import Estimate
from ondo.twin.params import TwinParams
from ondo.twin.plant import (
    THERMAL_BITS,
    THROTTLE_SW_POWER_CAP,
    PlantState,
    advance,
    initial_state,
    reported_sm_mhz,
    throttle_reasons,
)

FORECAST_DT_S = 0.01


@dataclass(frozen=True)
class Forecast:
    t_s: np.ndarray  # seconds from now, one entry per step
    temp_c: np.ndarray  # what the die sensor will read (not rounded)
    mem_temp_c: np.ndarray
    power_w: np.ndarray  # NVML's averaged power
    power_instant_w: np.ndarray
    sm_mhz: np.ndarray
    throttle_reasons: np.ndarray

    @property
    def time_to_throttle_s(self) -> float | None:
        """Seconds until a thermal slowdown (SW or HW) starts, None if not within the horizon."""
        return _first(self.t_s, (self.throttle_reasons & THERMAL_BITS) > 0)

    @property
    def time_to_power_cap_s(self) -> float | None:
        return _first(self.t_s, (self.throttle_reasons & THROTTLE_SW_POWER_CAP) > 0)


def _first(t_s: np.ndarray, flags: np.ndarray) -> float | None:
    hits = np.flatnonzero(flags)
    return float(t_s[hits[0]]) if len(hits) else None


def state_from_estimate(
    params: TwinParams,
    est: Estimate,
    sm_mhz: float,
    power_avg_w: float,
    power_instant_w: float,
    power_capped: bool,
) -> PlantState:
    """A plant state to forecast from: estimated temperatures, measured clock and power."""
    s = initial_state(params, est.die_c, est.hbm_c, est.sink_c, est.board_c, sm_mhz, power_avg_w)
    s.die_sensor_c = np.array(est.die_sensor_c)
    s.hbm_sensor_c = np.array(est.hbm_sensor_c)
    s.power_instant_w = np.array(power_instant_w)
    s.cap_power_w = np.array(power_instant_w)
    s.power_req_mhz = np.array(sm_mhz if power_capped else params.sm_max_mhz)
    return s


def forecast(
    params: TwinParams,
    state: PlantState,
    compute_activity: np.ndarray,
    memory_activity: np.ndarray,
    ambient_c: float,
    dt_s: float = FORECAST_DT_S,
    load_scale: float = 1.0,
) -> Forecast:
    """Run the plant from `state` over a planned load given per step of dt_s.

    `load_scale` is the what-if knob: 0.5 asks "what if the token budget were halved"."""
    s = state.copy()
    n = len(compute_activity)
    cols = {k: np.empty(n) for k in ("temp", "mem", "pw", "pi", "f")}
    bits = np.empty(n, dtype=int)
    for k in range(n):
        advance(
            s,
            params,
            dt_s,
            compute_activity[k] * load_scale,
            memory_activity[k] * load_scale,
            ambient_c,
        )
        cols["temp"][k], cols["mem"][k] = s.die_sensor_c, s.hbm_sensor_c
        cols["pw"][k], cols["pi"][k] = s.power_avg_w, s.power_instant_w
        cols["f"][k] = reported_sm_mhz(s, params)
        bits[k] = throttle_reasons(s, params)
    return Forecast(
        t_s=dt_s * np.arange(1, n + 1),
        temp_c=cols["temp"],
        mem_temp_c=cols["mem"],
        power_w=cols["pw"],
        power_instant_w=cols["pi"],
        sm_mhz=cols["f"],
        throttle_reasons=bits,
    )


def forecast_constant(
    params: TwinParams,
    state: PlantState,
    horizon_s: float,
    compute_activity: float,
    memory_activity: float,
    ambient_c: float,
    dt_s: float = FORECAST_DT_S,
    load_scale: float = 1.0,
) -> Forecast:
    n = int(np.ceil(horizon_s / dt_s))
    return forecast(
        params,
        state,
        np.full(n, compute_activity),
        np.full(n, memory_activity),
        ambient_c,
        dt_s,
        load_scale,
    )
