"""The engine's load descriptor in the plant's units, and its fit on a serving trace.

ondo's engine reports each step's load as achieved rate over spec peak (FLOP/s over peak
FLOP/s, modelled bytes/s over peak bandwidth, over the whole step: `e_c`, `e_m`); the plant's
1.0 is what a full matmul / a full device copy drew on the shared traces. The map:

    a_c = g_c e_c (1 - exp(-x)) / x,   x = g_c s e_c     (saturates at 1/s; s = 0: a_c = g_c e_c)
    a_m = g_m e_m

Decode kernels keep the SMs busy, and drawing power, at a few percent of peak FLOP/s, so the
compute gain is large near zero; a prefill step's higher FLOP rate does not draw
proportionally more, hence the saturation.

`refit_thermal` refits, on serving traces, what fit.py's thermal stage identifies on the shared
traces (capacitances, resistances, sensor lags, the HBM heat split, the inlet), driven the same
way by the measured fast power. The packaged constants are one H100's; a twin beside another
GPU needs its own. The power model and the power-limit controller stay the base's.

`fit_engine_load` fits (g_c, s, g_m) on serving traces and keeps every other constant:
- power: the plant's power at the measured clock and die temperature against the fast power
  channel, on rows with an engine step in progress;
- heat split: die and HBM sensors simulated from the measured fast power, the HBM's share set
  by the mapped memory activity. Power alone cannot tell compute from memory in steady decode;
  the HBM-die temperature difference can. Per trace, the inlet and starting heatsink
  temperatures are free (nuisance) parameters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

from ondo.twin.fit import (
    SPLIT_NAMES,
    THERMAL_NAMES,
    apply_facts,
    fit_thermal,
    simulate_thermal,
)
from ondo.twin.params import TwinParams
from ondo.twin.plant import largest_stable_step_s, power_split_w
from ondo.twin.traces import Trace

ENGINE_LOAD_NAMES = ("engine_compute_gain", "engine_compute_inv_max", "engine_memory_gain")
POWER_SCALE_W = 20.0  # residual weights: about the power fit's RMS and the sensors' resolution
TEMP_SCALE_C = 0.5


def plant_activity(
    params: TwinParams, compute_activity: ArrayLike, memory_activity: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """(compute, memory) activity in the plant's units for the engine's load descriptor."""
    e_c = np.asarray(compute_activity, dtype=float)
    g_c = params.engine_compute_gain
    x = g_c * params.engine_compute_inv_max * e_c
    saturation = np.where(x > 1e-9, -np.expm1(-x) / np.maximum(x, 1e-12), 1.0)
    return g_c * e_c * saturation, params.engine_memory_gain * np.asarray(memory_activity, float)


def in_plant_units(params: TwinParams, tr: Trace) -> Trace:
    """The trace with its load in the plant's units (unchanged if it already is)."""
    if tr.load_units == "plant":
        return tr
    if tr.load_units != "engine":
        raise ValueError(f"{tr.name}: unknown load units {tr.load_units!r}")
    a_c, a_m = plant_activity(params, tr.compute_activity, tr.memory_activity)
    return dataclasses.replace(tr, compute_activity=a_c, memory_activity=a_m, load_units="plant")


def _busy_power_w(p: TwinParams, tr: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(plant power, measured fast power) on the rows with a step in progress."""
    e_c, e_m = tr.load_at(tr.t_s, p.load_delay_s)
    busy = (e_c > 0) | (e_m > 0)
    a_c, a_m = plant_activity(p, e_c[busy], e_m[busy])
    total_w, _ = power_split_w(p, a_c, a_m, tr.sm_mhz[busy], tr.temp_c[busy])
    return total_w, tr.power_fast_w[busy]


def refit_thermal(
    base: TwinParams, traces: list[Trace], facts: dict | None = None
) -> tuple[TwinParams, dict[str, float]]:
    """`base` with fit.py's thermal stage refitted on `traces` (serving traces, engine units);
    residuals by name. `facts`: NVML facts of the GPU (thresholds, limits), if known.

    The HBM's part of the measured power needs the memory activity in the plant's units: it is
    mapped through the base's engine load map (the packaged identity map if none was fitted)."""
    from ondo.twin.replay import FORWARD_DT_S

    for tr in traces:
        if tr.load_units != "engine":
            raise ValueError(f"{tr.name}: the thermal refit takes serving traces")
    if facts:
        base = apply_facts(base, facts)
    p, per_trace, residuals = fit_thermal(base, [in_plant_units(base, tr) for tr in traces])
    inlet_c = {name: v[0] for name, v in per_trace.items()}
    p = p.replace(ambient_c=float(np.mean(list(inlet_c.values()))))
    # The plant steps the heatsink and board nodes explicitly (ondo/twin/plant.py).
    max_step_s = largest_stable_step_s(p)
    if max_step_s < FORWARD_DT_S:
        raise ValueError(
            f"the refitted thermal network needs plant steps under {max_step_s * 1e3:.1f} ms; "
            f"forecasts step {FORWARD_DT_S * 1e3:g} ms"
        )
    notes = dict(base.notes)
    notes["thermal_refit"] = {
        "fitted_on": [tr.name for tr in traces],
        "fitted": list(THERMAL_NAMES + SPLIT_NAMES) + ["ambient_c"],
        "input": "the measured fast power (power_instant_w); the HBM's part "
        "hbm_idle_power_w + hbm_share_of_memory * memory_power_w * a_m, a_m the engine's "
        "memory activity through the base's engine load map",
        "residuals": residuals,
        "trace_ambient_c": inlet_c,
        "largest_stable_plant_step_s": max_step_s,
        "replaces": "the thermal constants of the base fit: notes.fitted_on and notes.residuals "
        "now stand for its power and power-limit controller stages only",
    }
    source = (
        f"NVML facts of this GPU ({facts.get('name', 'facts given')})"
        if facts
        else "the base's NVML facts (h100_facts.json for the packaged params), as no facts "
        "were given"
    )
    notes["thresholds"] = (
        "sw_thermal_c, hw_slowdown_c, mem_max_c and power_limit_w are not fitted (a serving "
        f"trace does not reach them): they are {source}. hw_slowdown_frac, hw_hysteresis_c and "
        "the sw_thermal gains are assumed."
    )
    return p.replace(notes=notes), residuals


def fit_engine_load(base: TwinParams, traces: list[Trace]) -> tuple[TwinParams, dict[str, float]]:
    """`base` with the engine load map fitted on `traces` (engine units); residuals by name."""
    for tr in traces:
        if tr.load_units != "engine":
            raise ValueError(f"{tr.name}: the engine load map is fitted on serving traces")
    k = len(ENGINE_LOAD_NAMES)
    x0 = [getattr(base, n) for n in ENGINE_LOAD_NAMES]
    for tr in traces:
        x0 += [base.ambient_c, float(tr.temp_c[0]) - 5.0]
    lo = [0.0, 0.0, 0.0] + [-np.inf] * (2 * len(traces))
    hi = [100.0, 20.0, 10.0] + [np.inf] * (2 * len(traces))

    def with_map(x) -> TwinParams:
        return base.replace(**{n: float(v) for n, v in zip(ENGINE_LOAD_NAMES, x[:k])})

    def residual(x) -> np.ndarray:
        p = with_map(x)
        res = []
        for i, tr in enumerate(traces):
            model_w, meas_w = _busy_power_w(p, tr)
            die, hbm = simulate_thermal(p, in_plant_units(p, tr), x[k + 2 * i], x[k + 2 * i + 1])
            res += [
                (model_w - meas_w) / POWER_SCALE_W,
                (die - tr.temp_c) / TEMP_SCALE_C,
                (hbm - tr.mem_temp_c) / TEMP_SCALE_C,
            ]
        return np.concatenate(res)

    sol = least_squares(residual, np.clip(x0, lo, hi), bounds=(lo, hi), loss="soft_l1", f_scale=2.0)
    p = with_map(sol.x)
    residuals: dict[str, float] = {}
    inlet_c: dict[str, float] = {}
    for i, tr in enumerate(traces):
        model_w, meas_w = _busy_power_w(p, tr)
        die, hbm = simulate_thermal(
            p, in_plant_units(p, tr), sol.x[k + 2 * i], sol.x[k + 2 * i + 1]
        )
        residuals[f"{tr.name} fast power RMS, steps running [W]"] = _rms(model_w - meas_w)
        residuals[f"{tr.name} fast power mean error, steps running [W]"] = float(
            np.mean(model_w - meas_w)
        )
        residuals[f"{tr.name} temp_c RMS [C]"] = _rms(die - tr.temp_c)
        residuals[f"{tr.name} mem_temp_c RMS [C]"] = _rms(hbm - tr.mem_temp_c)
        inlet_c[tr.name] = float(sol.x[k + 2 * i])
    notes = dict(base.notes)
    notes["engine_load"] = {
        "fitted_on": [tr.name for tr in traces],
        "map": "a_c = g_c e_c (1 - exp(-x)) / x with x = g_c s e_c; a_m = g_m e_m "
        "(g_c = engine_compute_gain, s = engine_compute_inv_max, g_m = engine_memory_gain)",
        "residuals": residuals,
        "trace_ambient_c": inlet_c,
        "kept": "every other constant is the base's: "
        + (
            "thermal from notes.thermal_refit, the rest from notes.fitted_on"
            if "thermal_refit" in base.notes
            else "notes.fitted_on"
        ),
    }
    return p.replace(notes=notes), residuals


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else float("nan")
