"""The incident's facts: a few numbers, with units in their names, that deterministic code
reads off the telemetry window before the incident, the twin and the GPU's limits.

They fill the runbooks' parameter expressions (`0.9 * power_limit_w`), tell the rules apart
the cases that share events (a hot inlet, degraded cooling, a neighbour's load) and go into
the prompt. None means "not measured in this window" and is never guessed.

- limits: `power_limit_w`, `idle_power_w`, `die_limit_c`, `hbm_limit_c`, `fitted_inlet_c`
- GPU window: `power_w` (95th percentile of NVML's 1 s average), `power_max_w`, `die_max_c`,
  `die_min_c`, `hbm_max_c`, `die_margin_c`, `hbm_margin_c`, `sm_clock_ratio_min`,
  `gpu_busy_fraction` (samples above idle power + 25 %)
- heat: `idle_die_excess_c` (the coolest die reading of the window above the fitted plant's
  idle die at its fitted inlet: a hot inlet lifts it, load does not), `heating_excess_c` (the
  hottest die reading above the fitted plant's steady die at that power and the inlet the
  idle reading implies: worse cooling lifts it)
- twin: `twin_inlet_c`, `twin_die_peak_c`, `twin_time_to_throttle_s` (its latest snapshot)
- engine window: `engine_busy_fraction`, `num_running` (at the incident: what a cap is
  relative to), `num_running_max`, `num_waiting` (max),
  `kv_usage_max`, `preemptions`, `swapped_blocks_max`, `max_batched_tokens` (the largest
  step's tokens)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ondo.agent.actions import GpuLimits
from ondo.twin.params import TwinParams
from ondo.twin.plant import Load, steady_state

Facts = dict[str, float | None]
BUSY_POWER_FACTOR = 1.25
FACT_NAMES = frozenset({
    "power_limit_w", "idle_power_w", "die_limit_c", "hbm_limit_c", "fitted_inlet_c", "power_w",
    "power_max_w", "die_max_c", "die_min_c", "hbm_max_c", "die_margin_c", "hbm_margin_c",
    "sm_clock_ratio_min", "gpu_busy_fraction", "idle_die_excess_c", "heating_excess_c",
    "twin_inlet_c", "twin_die_peak_c", "twin_time_to_throttle_s", "engine_busy_fraction",
    "num_running", "num_running_max", "num_waiting", "kv_usage_max", "preemptions",
    "swapped_blocks_max", "max_batched_tokens"})


def _col(samples: Sequence[Any], name: str) -> np.ndarray:
    return np.array([np.nan if getattr(s, name, None) is None else float(getattr(s, name))
                     for s in samples], dtype=float)


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 3)


def _steady_die_c(params: TwinParams, power_w: float, inlet_c: float) -> float:
    """The fitted plant's steady die temperature at `power_w` (compute load), `inlet_c`."""
    lo, hi = 0.0, 1.0
    for _ in range(30):  # bisect the compute activity that draws power_w
        mid = (lo + hi) / 2
        s = steady_state(params, Load(compute_activity=mid), inlet_c)
        lo, hi = (mid, hi) if float(s.power_instant_w) < power_w else (lo, mid)
    return float(steady_state(params, Load(compute_activity=lo), inlet_c).die_c)


def gpu_facts(params: TwinParams, samples: Sequence[Any]) -> Facts:
    limits = GpuLimits.from_params(params)
    out: Facts = {"power_limit_w": limits.power_limit_w, "idle_power_w": limits.idle_power_w,
                  "die_limit_c": limits.die_limit_c, "hbm_limit_c": limits.hbm_limit_c,
                  "fitted_inlet_c": _num(params.ambient_c)}
    if not samples:
        return out
    power, temp = _col(samples, "power_w"), _col(samples, "temp_c")
    mem, ratio = _col(samples, "mem_temp_c"), _col(samples, "sm_clock_ratio")

    def q(x: np.ndarray, f) -> float | None:
        x = x[np.isfinite(x)]
        return _num(f(x)) if len(x) else None

    out.update(power_w=q(power, lambda x: np.percentile(x, 95)), power_max_w=q(power, np.max),
               die_max_c=q(temp, np.max), die_min_c=q(temp, np.min), hbm_max_c=q(mem, np.max),
               sm_clock_ratio_min=q(ratio, np.min))
    ok = np.isfinite(power)
    out["gpu_busy_fraction"] = _num(float(np.mean(power[ok] > BUSY_POWER_FACTOR *
                                                  params.idle_power_w))) if ok.any() else None
    if out["die_max_c"] is not None:
        out["die_margin_c"] = _num(limits.die_limit_c - out["die_max_c"])
    if out["hbm_max_c"] is not None:
        out["hbm_margin_c"] = _num(limits.hbm_limit_c - out["hbm_max_c"])
    if out["die_min_c"] is not None:
        idle_die = float(steady_state(params, Load(), params.ambient_c).die_c)
        out["idle_die_excess_c"] = _num(out["die_min_c"] - idle_die)
        if out["die_max_c"] is not None and ok.any():
            hot = int(np.nanargmax(np.where(np.isfinite(temp), temp, -np.inf)))
            p_hot = power[hot] if np.isfinite(power[hot]) else float(np.nanmax(power))
            inlet = params.ambient_c + out["idle_die_excess_c"]
            out["heating_excess_c"] = _num(out["die_max_c"] - _steady_die_c(params, p_hot, inlet))
    return out


def engine_facts(steps: Sequence[Any], window_s: float) -> Facts:
    if not steps:
        return {"engine_busy_fraction": None}
    dur = sum(max(0.0, float(s.end_monotonic_s) - float(s.start_monotonic_s)) for s in steps)
    kv = [s.num_kv_blocks_used / s.num_kv_blocks_total for s in steps if s.num_kv_blocks_total]
    return {
        "engine_busy_fraction": _num(min(1.0, dur / window_s)) if window_s > 0 else None,
        "num_running": float(steps[-1].num_running),
        "num_running_max": float(max(s.num_running for s in steps)),
        "num_waiting": float(max(s.num_waiting for s in steps)),
        "kv_usage_max": _num(max(kv)) if kv else None,
        "preemptions": float(sum(s.num_preemptions for s in steps)),
        "swapped_blocks_max": float(max(s.num_swapped_blocks for s in steps)),
        "max_batched_tokens": float(max(s.num_prefill_tokens + s.num_decode_tokens
                                        for s in steps)),
    }


def twin_facts(snapshot: Any | None) -> Facts:
    if snapshot is None:
        return {}
    ttt = getattr(snapshot, "time_to_throttle_s", None)
    return {"twin_inlet_c": _num(getattr(snapshot, "ambient_c", math.nan)),
            "twin_die_peak_c": _num(getattr(snapshot, "die_peak_c", math.nan)),
            "twin_time_to_throttle_s": None if ttt is None else _num(ttt)}


def incident_facts(params: TwinParams, gpu: Sequence[Any], steps: Sequence[Any],
                   twin: Any | None, window_s: float) -> Facts:
    return {**gpu_facts(params, gpu), **engine_facts(steps, window_s), **twin_facts(twin)}
