"""A recorded trace through the online twin (`ondo twin adapt`): the filter takes the trace
sample by sample, exactly as in `ondo serve`, and every row at t is forecast from the
filter's state and constants at the last row at or before t - horizon, driven over the
horizon by the load the trace ran then (the engine's planned load, as `ondo twin predict`
does). A forecast's band comes from the errors of the earlier forecasts whose time had come
by its origin (`confidence.ErrorBand`), so nothing at or after t - horizon is read.

`run_trace` feeds the filter and keeps its state per GPU row; `forecast_rows` runs every
origin forward at once (the plant steps all rows together, each with its own constants);
`score` gives the figures the targets name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ondo.events.trace_input import TraceRecords, read_trace_records
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.adapt_params import Units, params_from_theta
from ondo.twin.adaptive import AdaptiveTwin
from ondo.twin.confidence import ErrorBand, throttle_probability
from ondo.twin.load_window import LoadWindow, load_at
from ondo.twin.params import TwinParams
from ondo.twin.plant import (
    THERMAL_BITS,
    THROTTLE_SW_POWER_CAP,
    advance,
    initial_state,
    largest_stable_step_s,
    reported_sm_mhz,
    throttle_reasons,
)
from ondo.twin.replay import check_horizon, forward_steps
from ondo.twin.state_filter import N_X

FORWARD_DT_S = 0.01


@dataclass(frozen=True)
class AdaptRun:
    """Per GPU row the filter took: its time, readings, and the filter after that row."""

    trace: str
    units: Units
    t0_s: float  # the first GPU row's time: a row's trace time `t` is t_s - t0_s
    t_s: np.ndarray  # the rows' times on the samples' (monotonic) clock
    temp_c: np.ndarray  # readings (NaN where missing)
    mem_temp_c: np.ndarray
    power_w: np.ndarray  # NVML's 1 s average (the fast reading where there is none)
    power_fast_w: np.ndarray
    sm_mhz: np.ndarray
    capped: np.ndarray  # bool: the SW power-cap bit
    z: np.ndarray  # (rows, N_Z): state and constants after the row
    die_var_c2: np.ndarray  # the filter's variance of the die / HBM sensor
    hbm_var_c2: np.ndarray
    theta_var: np.ndarray  # (rows, N_THETA): the constants' variances after the row
    excited: np.ndarray  # bool: the thermal constants were free at that row
    steps: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # the load (LoadWindow)
    twin: AdaptiveTwin

    def params_at(self, i: int) -> TwinParams:
        return params_from_theta(self.twin.base, self.z[i, N_X:], self.units, self.twin.knee)


def _value(v: float | int | None) -> float:
    return math.nan if v is None else float(v)


def run_trace(records: TraceRecords, base: TwinParams, theta: np.ndarray | None = None,
              theta_var: np.ndarray | None = None) -> AdaptRun:
    """Feed every record of the trace to a fresh `AdaptiveTwin` starting from `base` (or from
    `theta`), in file order; NVML traces' phase labels become load segments."""
    units: Units = "engine" if records.format == "export" else "plant"
    twin = AdaptiveTwin(base, units, theta, theta_var)
    full = LoadWindow(twin.window.shape, keep_s=math.inf)
    rows: list[tuple] = []

    def taken(s: GpuSample) -> None:
        f = twin.filter
        assert f is not None
        fast = s.power_instant_w if s.power_instant_w is not None else s.power_w
        rows.append((s.t_monotonic_s, _value(s.temp_c), _value(s.mem_temp_c),
                     _value(s.power_w if s.power_w is not None else fast), _value(fast),
                     _value(s.sm_mhz), bool((s.throttle_reasons or 0) & THROTTLE_SW_POWER_CAP),
                     np.concatenate([f.x, twin.theta]), f.p[4, 4], f.p[5, 5],
                     twin.excitation.excited, twin.theta_var))

    twin.on_processed = taken

    def load(start: float, end: float, c: float, m: float) -> None:
        twin.on_load(start, end, c, m)
        full.add(start + twin.load_delay_s, end + twin.load_delay_s, c, m)

    recs = records.records
    gpu_at = [i for i, r in enumerate(recs) if isinstance(r, GpuSample)]
    previous: int | None = None  # an NVML trace's phase label holds until the next row
    for i, r in enumerate(recs):
        if isinstance(r, EngineSample):
            load(r.start_monotonic_s, r.end_monotonic_s, r.compute_activity, r.memory_activity)
            continue
        if previous is not None and previous in records.phase_load:
            c, m = records.phase_load[previous]
            load(recs[previous].t_monotonic_s, r.t_monotonic_s, c, m)
        previous = i
        twin.on_gpu_sample(r)
    twin.flush()
    if not rows:
        raise ValueError(f"{records.path}: no GPU row the twin could start from "
                         "(a temperature and a power reading are needed)")
    cols = list(zip(*rows))
    arr = [np.array(c) for c in cols[:7]]
    return AdaptRun(
        trace=Path(records.path).name, units=units, t0_s=float(recs[gpu_at[0]].t_monotonic_s),
        t_s=arr[0], temp_c=arr[1],
        mem_temp_c=arr[2], power_w=arr[3], power_fast_w=arr[4], sm_mhz=arr[5],
        capped=arr[6].astype(bool), z=np.stack(cols[7]), die_var_c2=np.array(cols[8]),
        hbm_var_c2=np.array(cols[9]), excited=np.array(cols[10], dtype=bool),
        theta_var=np.stack(cols[11]),
        steps=full.arrays(), twin=twin)


def stacked_params(params: list[TwinParams]) -> TwinParams:
    """One `TwinParams` whose fields are arrays (one entry per GPU) where `params` differ:
    the plant's `advance` broadcasts them, so each row steps with its own constants."""
    first = params[0]
    changes = {}
    for f in dataclasses.fields(TwinParams):
        if f.name == "notes":
            continue
        values = np.array([getattr(p, f.name) for p in params], dtype=float)
        if np.any(values != values[0]):
            changes[f.name] = values
    return dataclasses.replace(first, **changes)


@dataclass(frozen=True)
class AdaptForecast:
    """Per row of the run: its forecast made horizon_s earlier, with the band."""

    t_s: np.ndarray
    origin: np.ndarray  # index of the row it was forecast from
    temp_c_pred: np.ndarray
    mem_temp_c_pred: np.ndarray
    power_w_pred: np.ndarray
    sm_mhz_pred: np.ndarray
    power_cap_pred: np.ndarray
    thermal_slowdown_pred: np.ndarray
    temp_c_band: np.ndarray  # half-width: the band is pred +- band
    mem_temp_c_band: np.ndarray
    throttle_probability: np.ndarray


def forecast_rows(run: AdaptRun, horizon_s: float,
                  forward_dt_s: float = FORWARD_DT_S) -> AdaptForecast:
    check_horizon(horizon_s)
    t = run.t_s
    n = len(t)
    origin = np.clip(np.searchsorted(t, t - horizon_s, side="right") - 1, 0, n - 1)
    params = [run.params_at(i) for i in range(n)]
    stable = {}
    for i in np.unique(origin):
        key = run.z[i, N_X:].tobytes()
        if key not in stable:
            stable[key] = largest_stable_step_s(params[i])
    dt_max = min(forward_dt_s, 0.9 * min(stable.values()))
    p = stacked_params([params[i] for i in origin])
    span_s = t - t[origin]
    n_steps = forward_steps(horizon_s, span_s, dt_max)
    dt = span_s / n_steps
    zo = run.z[origin]
    s = initial_state(p, zo[:, 0], zo[:, 1], zo[:, 2], zo[:, 3], run.sm_mhz[origin],
                      run.power_w[origin], shape=(n,))
    s.die_sensor_c, s.hbm_sensor_c = zo[:, 4].copy(), zo[:, 5].copy()
    s.power_instant_w = run.power_fast_w[origin].copy()
    s.cap_power_w = run.power_fast_w[origin].copy()
    capped = run.capped[origin]
    s.power_req_mhz = np.where(capped, run.sm_mhz[origin], p.sm_max_mhz)
    t0 = t[origin]
    peak_die, peak_hbm = s.die_sensor_c.copy(), s.hbm_sensor_c.copy()
    for k in range(n_steps):
        a_c, a_m = load_at(run.steps, t0 + (k + 0.5) * dt)
        advance(s, p, dt, a_c, a_m, zo[:, 6])
        peak_die = np.maximum(peak_die, s.die_sensor_c)
        peak_hbm = np.maximum(peak_hbm, s.hbm_sensor_c)
    bits = throttle_reasons(s, p)
    die_band, hbm_band, prob = _bands(run, origin, s.die_sensor_c, s.hbm_sensor_c,
                                      peak_die, peak_hbm, p)
    return AdaptForecast(
        t_s=t.copy(), origin=origin, temp_c_pred=s.die_sensor_c,
        mem_temp_c_pred=s.hbm_sensor_c, power_w_pred=s.power_avg_w,
        sm_mhz_pred=reported_sm_mhz(s, p),
        power_cap_pred=(bits & THROTTLE_SW_POWER_CAP) > 0,
        thermal_slowdown_pred=(bits & THERMAL_BITS) > 0,
        temp_c_band=die_band, mem_temp_c_band=hbm_band, throttle_probability=prob)


def _bands(run: AdaptRun, origin: np.ndarray, die_pred: np.ndarray, hbm_pred: np.ndarray,
           peak_die: np.ndarray, peak_hbm: np.ndarray, p: TwinParams):
    """Each row's band from the errors of the rows whose time had come by its origin."""
    t = run.t_s
    n = len(t)
    die_err = run.temp_c - die_pred
    hbm_err = run.mem_temp_c - hbm_pred
    die_band, hbm_band = ErrorBand(), ErrorBand()
    out_die, out_hbm, prob = np.empty(n), np.empty(n), np.empty(n)
    sw = np.broadcast_to(p.sw_thermal_c, (n,))
    mem_max = np.broadcast_to(p.mem_max_c, (n,))
    k = 0
    for j in range(n):
        o = origin[j]
        while k < n and t[k] <= t[o]:
            if origin[k] < k:  # a real forecast (not the trace's first rows)
                die_band.add(t[k], float(die_err[k]))
                hbm_band.add(t[k], float(hbm_err[k]))
            k += 1
        sd = die_band.sigma_c(math.sqrt(run.die_var_c2[o]))
        sh = hbm_band.sigma_c(math.sqrt(run.hbm_var_c2[o]))
        out_die[j], out_hbm[j] = die_band.half_width_c(math.sqrt(run.die_var_c2[o])), (
            hbm_band.half_width_c(math.sqrt(run.hbm_var_c2[o])))
        prob[j] = throttle_probability(float(peak_die[j]), sd, float(sw[j]),
                                       float(peak_hbm[j]), sh, float(mem_max[j]))
    return out_die, out_hbm, prob


@dataclass(frozen=True)
class AdaptScore:
    """10 s-ahead figures over the rows from `from_s` on."""

    rows: int
    temp_rmse_c: float
    mem_temp_rmse_c: float
    temp_band_coverage: float  # share of readings inside their band
    mem_temp_band_coverage: float
    temp_persistence_rmse_c: float  # the reading horizon_s earlier as the forecast
    mem_temp_persistence_rmse_c: float


def _rmse(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x * x))) if len(x) else math.nan


def score(run: AdaptRun, fc: AdaptForecast, from_s: float) -> AdaptScore:
    """`from_s`: in trace time (seconds after the first GPU row)."""
    m = (fc.t_s - run.t0_s >= from_s) & (fc.origin < np.arange(len(fc.t_s)))
    o = fc.origin
    die_err = np.round(fc.temp_c_pred) - run.temp_c
    hbm_err = np.round(fc.mem_temp_c_pred) - run.mem_temp_c
    return AdaptScore(
        rows=int(m.sum()),
        temp_rmse_c=_rmse(die_err[m]),
        mem_temp_rmse_c=_rmse(hbm_err[m]),
        temp_band_coverage=_coverage(run.temp_c - fc.temp_c_pred, fc.temp_c_band, m),
        mem_temp_band_coverage=_coverage(run.mem_temp_c - fc.mem_temp_c_pred,
                                         fc.mem_temp_c_band, m),
        temp_persistence_rmse_c=_rmse((run.temp_c[o] - run.temp_c)[m]),
        mem_temp_persistence_rmse_c=_rmse((run.mem_temp_c[o] - run.mem_temp_c)[m]),
    )


def _coverage(err: np.ndarray, band: np.ndarray, m: np.ndarray) -> float:
    ok = m & np.isfinite(err)
    return float(np.mean(np.abs(err[ok]) <= band[ok])) if ok.any() else math.nan


def adapt_trace(path: str | Path, base: TwinParams, horizon_s: float,
                theta: np.ndarray | None = None) -> tuple[AdaptRun, AdaptForecast]:
    run = run_trace(read_trace_records(path), base, theta)
    return run, forecast_rows(run, horizon_s)

