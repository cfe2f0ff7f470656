"""Synthetic scenarios that check the twin's estimator and predictor against its own plant."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ondo.twin.estimator import ThermalEstimator
from ondo.twin.params import TwinParams
from ondo.twin.plant import THERMAL_BITS, THROTTLE_SW_POWER_CAP, GpuPlant, Load, steady_state
from ondo.twin.predictor import forecast_constant, state_from_estimate
from ondo.twin.replay import hbm_power_w


@dataclass(frozen=True)
class HotInletResult:
    slowdown_start_s: float  # when the plant first reports a thermal slowdown bit
    first_warning_s: (
        float | None
    )  # earliest forecast origin that saw it coming (and kept seeing it)
    predicted_start_s: float | None  # what that first warning said
    plant_clock_after_mhz: float  # plant clock settle_s after the slowdown starts
    predicted_clock_after_mhz: float  # what the forecast from slowdown_start_s - lead_s said

    @property
    def lead_s(self) -> float | None:
        return (
            None if self.first_warning_s is None else self.slowdown_start_s - self.first_warning_s
        )


def hot_inlet(
    params: TwinParams,
    inlet_rise_c: float = 25.0,
    load_s: float = 240.0,
    dt_s: float = 0.01,
    check_every_s: float = 2.0,
    horizon_s: float = 40.0,
    settle_s: float = 10.0,
) -> HotInletResult:
    """Full compute load on a GPU whose inlet runs inlet_rise_c hotter than the fitted one.

    The plant is the truth; the estimator sees only its sensor readings (as NVML would give
    them); forecasts run from the estimate with the load held."""
    ambient = params.ambient_c + inlet_rise_c
    plant = GpuPlant(params, state=steady_state(params, Load(), ambient))
    load = Load(compute_activity=1.0)
    r0 = plant.reading()
    hbm_w = float(hbm_power_w(params, 0.0))
    est = ThermalEstimator(params, r0.temp_c, r0.mem_temp_c, r0.power_instant_w, hbm_w)
    est.x[6] = ambient  # the operator knows the inlet reading; the filter refines it
    n = int(load_s / dt_s)
    every = int(round(check_every_s / dt_s))
    times, clocks, bits = np.empty(n), np.empty(n), np.empty(n, dtype=int)
    warnings: list[
        tuple[float, float | None, float]
    ] = []  # (origin, predicted start, clock settle_s later)
    stop = n
    for k in range(n):
        if k >= stop:
            break
        r = plant.step(dt_s, load, ambient)
        est.update(dt_s, r.power_instant_w, hbm_w, r.temp_c, r.mem_temp_c)
        times[k], clocks[k], bits[k] = plant.time_s, r.sm_mhz, r.throttle_reasons
        if stop == n and bits[k] & THERMAL_BITS:
            stop = k + int((settle_s + 1.0) / dt_s)
        if (k + 1) % every == 0:
            e = est.estimate(r.power_instant_w, hbm_w)
            state = state_from_estimate(
                params,
                e,
                r.sm_mhz,
                r.power_w,
                r.power_instant_w,
                bool(r.throttle_reasons & THROTTLE_SW_POWER_CAP),
            )
            fc = forecast_constant(
                params, state, horizon_s, 1.0, 0.0, float(e.ambient_c), dt_s=0.02
            )
            ttt = fc.time_to_throttle_s
            start = None if ttt is None else plant.time_s + ttt
            clock = float("nan")
            if ttt is not None:
                j = min(np.searchsorted(fc.t_s, ttt + settle_s), len(fc.t_s) - 1)
                clock = float(fc.sm_mhz[j])
            warnings.append((plant.time_s, start, clock))
    n = min(stop, n)
    times, clocks, bits = times[:n], clocks[:n], bits[:n]
    hit = np.flatnonzero(bits & THERMAL_BITS)
    if len(hit) == 0:
        raise ValueError("the plant never reached a thermal slowdown; raise inlet_rise_c or load_s")
    start_s = float(times[hit[0]])
    # The first warning of an unbroken run of warnings up to the slowdown.
    first = None
    for origin, predicted, _ in reversed([w for w in warnings if w[0] <= start_s]):
        if predicted is None:
            break
        first = (origin, predicted)
    j_plant = min(np.searchsorted(times, start_s + settle_s), n - 1)
    lead = [w for w in warnings if w[0] <= start_s - 10.0 and w[1] is not None]
    predicted_clock = lead[-1][2] if lead else float("nan")
    return HotInletResult(
        slowdown_start_s=start_s,
        first_warning_s=None if first is None else first[0],
        predicted_start_s=None if first is None else first[1],
        plant_clock_after_mhz=float(clocks[j_plant]),
        predicted_clock_after_mhz=predicted_clock,
    )
