"""The twin's snapshots for a replayed trace, where no live twin runs.

Once per second of trace time and per GPU: the Kalman estimator (`ondo.twin.estimator`) takes
the second's mean power (energy counter, else the fast power channel, else NVML's average)
and the last temperature readings; then the plant (`ondo.twin.plant`) is run forward from
each second's estimate under that second's mean load (the trace's phase labels, or the
engine's steps through the twin's engine-load map) for `horizon_s`, all seconds at once, and
the forecast gives the time to a thermal slowdown and to the power cap, and the peaks. The
figures are rounded to 1e-3 so that a last-bit difference in floating point between two
machines does not change the log.
"""

from __future__ import annotations

import numpy as np

from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.engine_load import plant_activity
from ondo.twin.estimator import ThermalEstimator
from ondo.twin.live import TwinSnapshot
from ondo.twin.params import TwinParams
from ondo.twin.plant import (
    THERMAL_BITS,
    THROTTLE_SW_POWER_CAP,
    advance,
    initial_state,
    throttle_reasons,
)
from ondo.twin.predictor import FORECAST_DT_S
from ondo.twin.replay import hbm_power_w

SNAPSHOT_PERIOD_S = 1.0
HORIZON_S = 10.0

def _r(x: float) -> float:
    return float(np.round(x, 3))


def _engine_steps(params: TwinParams, steps: list[EngineSample]) -> tuple[np.ndarray, ...]:
    start = np.array([s.start_monotonic_s for s in steps], dtype=float)
    end = np.array([s.end_monotonic_s for s in steps], dtype=float)
    a_c, a_m = plant_activity(params, [s.compute_activity for s in steps],
                              [s.memory_activity for s in steps])
    return start, end, np.asarray(a_c, dtype=float), np.asarray(a_m, dtype=float)


def _engine_load(steps: tuple[np.ndarray, ...], t0: float, t1: float) -> tuple[float, float]:
    """Mean load over (t0, t1]: each step's activity weighted by its overlap."""
    start, end, a_c, a_m = steps
    i0, i1 = int(np.searchsorted(end, t0, "right")), int(np.searchsorted(start, t1, "left"))
    if i1 <= i0:
        return 0.0, 0.0
    overlap = np.clip(np.minimum(end[i0:i1], t1) - np.maximum(start[i0:i1], t0), 0.0, None)
    return (float(overlap @ a_c[i0:i1]) / (t1 - t0), float(overlap @ a_m[i0:i1]) / (t1 - t0))


def _column(samples: list[GpuSample], name: str) -> np.ndarray:
    return np.array([np.nan if (v := getattr(s, name)) is None else v for s in samples],
                    dtype=float)


def replay_snapshots(params: TwinParams, samples: list[GpuSample],
                     phase_load: list[tuple[float, float] | None], steps: list[EngineSample],
                     period_s: float = SNAPSHOT_PERIOD_S,
                     horizon_s: float = HORIZON_S) -> list[TwinSnapshot]:
    """Snapshots of one GPU every `period_s` of its samples' time. `phase_load`: per sample,
    the labelled load in plant units (NVML traces), else None; `steps`: the engine's steps,
    used where there are no labels."""
    if len(samples) < 2:
        return []
    t = _column(samples, "t_monotonic_s")
    wall = _column(samples, "t_wall_s")
    temp, mem = _column(samples, "temp_c"), _column(samples, "mem_temp_c")
    avg, inst = _column(samples, "power_w"), _column(samples, "power_instant_w")
    energy, sm = _column(samples, "energy_j"), _column(samples, "sm_mhz")
    reasons = np.array([s.throttle_reasons or 0 for s in samples])
    labelled = all(x is not None for x in phase_load) and len(phase_load) == len(samples)
    phase = np.array(phase_load, dtype=float) if labelled else None
    engine = _engine_steps(params, steps) if steps else None
    ticks = t[0] + period_s * np.arange(1, int((t[-1] - t[0]) / period_s) + 1)
    if not len(ticks):
        return []
    last = np.searchsorted(t, ticks, side="right") - 1  # the last sample at or before a tick
    first = np.r_[0, last[:-1] + 1]
    rows = []
    est: ThermalEstimator | None = None
    prev = 0
    for k, tick in enumerate(ticks):
        a, b = int(first[k]), int(last[k])
        if b < a:  # no sample within this second
            continue
        span = slice(a, b + 1)
        if phase is not None:
            a_c, a_m = (float(x) for x in phase[span].mean(axis=0))
        elif engine is not None:
            a_c, a_m = _engine_load(engine, tick - period_s, tick)
        else:
            a_c = a_m = 0.0
        power = _mean_power(t, energy, inst, avg, prev, b, span)
        hbm = float(hbm_power_w(params, a_m))
        if est is None:
            est = ThermalEstimator(params, _finite(temp[b], 40.0), _finite(mem[b], 40.0),
                                   power, hbm)
        else:
            est.update(period_s, power, hbm, _opt(temp[b]), _opt(mem[b]))
        tick_wall = float(wall[b] + (tick - t[b]))
        rows.append((k, b, a_c, a_m, power, est.x.copy(), float(np.sqrt(est.p[0, 0])), tick_wall))
        prev = b
    return _forecast(params, rows, ticks, avg, sm, reasons, samples[0].gpu_index, horizon_s)


def _finite(x: float, default: float) -> float:
    return float(x) if np.isfinite(x) else default


def _opt(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _mean_power(t, energy, inst, avg, prev: int, b: int, span: slice) -> float:
    """The second's mean power: the energy counter's increase, else the fast channel's mean,
    else NVML's average (its last reading)."""
    if b > prev and np.isfinite(energy[b]) and np.isfinite(energy[prev]):
        de, dt = energy[b] - energy[prev], t[b] - t[prev]
        if de > 0 and dt > 0:
            return float(de / dt)
    fast = inst[span]
    fast = fast[np.isfinite(fast)]
    if len(fast):
        return float(fast.mean())
    return _finite(avg[b], 0.0)


def _forecast(params: TwinParams, rows, ticks, avg, sm, reasons, gpu: int,
              horizon_s: float) -> list[TwinSnapshot]:
    """Every second's forecast at once: the plant's state arrays hold one entry per second."""
    if not rows:
        return []
    b = np.array([r[1] for r in rows])
    a_c, a_m = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    power = np.array([r[4] for r in rows])
    x = np.array([r[5] for r in rows])
    capped = (reasons[b] & THROTTLE_SW_POWER_CAP) > 0
    sm_b = np.where(np.isfinite(sm[b]), sm[b], params.sm_max_mhz)
    avg_b = np.where(np.isfinite(avg[b]), avg[b], power)
    s = initial_state(params, x[:, 0], x[:, 1], x[:, 2], x[:, 3], sm_b, avg_b, shape=(len(rows),))
    s.die_sensor_c, s.hbm_sensor_c = x[:, 4].copy(), x[:, 5].copy()
    s.power_instant_w, s.cap_power_w = power.copy(), power.copy()
    s.power_req_mhz = np.where(capped, sm_b, params.sm_max_mhz)
    ambient = x[:, 6]
    n_steps = int(np.ceil(horizon_s / FORECAST_DT_S))
    die_peak, hbm_peak, power_peak = s.die_c.copy(), s.hbm_c.copy(), s.power_avg_w.copy()
    to_throttle = np.full(len(rows), np.nan)
    to_cap = np.full(len(rows), np.nan)
    for k in range(n_steps):
        advance(s, params, FORECAST_DT_S, a_c, a_m, ambient)
        np.maximum(die_peak, s.die_c, out=die_peak)
        np.maximum(hbm_peak, s.hbm_c, out=hbm_peak)
        np.maximum(power_peak, s.power_avg_w, out=power_peak)
        bits = throttle_reasons(s, params)
        ahead = (k + 1) * FORECAST_DT_S
        to_throttle[np.isnan(to_throttle) & ((bits & THERMAL_BITS) > 0)] = ahead
        to_cap[np.isnan(to_cap) & ((bits & THROTTLE_SW_POWER_CAP) > 0)] = ahead
    out = []
    for i, (k, _, _, _, _, _, std, tick_wall) in enumerate(rows):
        out.append(TwinSnapshot(
            gpu_index=gpu, t_monotonic_s=float(ticks[k]), t_wall_s=tick_wall,
            die_c=_r(x[i, 0]), hbm_c=_r(x[i, 1]), die_sensor_c=_r(x[i, 4]),
            ambient_c=_r(x[i, 6]), die_std_c=_r(std), forecast_horizon_s=horizon_s,
            die_peak_c=_r(die_peak[i]), hbm_peak_c=_r(hbm_peak[i]),
            power_peak_w=_r(power_peak[i]),
            time_to_throttle_s=None if np.isnan(to_throttle[i]) else _r(to_throttle[i]),
            time_to_power_cap_s=None if np.isnan(to_cap[i]) else _r(to_cap[i])))
    return out
