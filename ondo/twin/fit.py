"""Identify `TwinParams` from NVML traces, in three stages that each see only their part.

1. power: idle, leakage, compute (through V(f)^2 f) and memory power against the fast power
   channel, given the measured clock and die temperature;
2. thermal: capacitances, resistances, HBM heat split and sensor lags against the integer
   temperature readings, driven by the measured fast power (per trace: inlet temperature and
   the heatsink's starting temperature, since the traces do not start from rest);
3. power-limit controller: filter time constant, gain and slew rates against the SM clock,
   driven by the fitted power model.
Thermal-safety thresholds are never reached in the traces: they come from NVML's facts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import expm
from scipy.optimize import least_squares

from ondo.twin.params import TwinParams
from ondo.twin.plant import power_split_w
from ondo.twin.traces import Trace

log = logging.getLogger(__name__)

THERMAL_GRID_S = 0.05
CONTROL_GRID_S = 0.01
SETTLE_S = 0.4  # rows this close to a load change are left out of the power fit


@dataclass
class FitReport:
    residuals: dict[str, float] = field(default_factory=dict)  # name -> RMS, in the unit named
    trace_ambient_c: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"{k:38s} {v:8.3f}" for k, v in self.residuals.items()]


def _delayed_load(tr: Trace, t_s: np.ndarray, delay_s: float):
    return tr.load_at(t_s, delay_s)


# ---------------------------------------------------------------- 1. power


def _power_rows(tr: Trace, delay_s: float):
    a_c, a_m = _delayed_load(tr, tr.t_s, delay_s)
    change_t = tr.t_s[np.flatnonzero(np.diff(tr.compute_activity + 2 * tr.memory_activity)) + 1]
    near = np.zeros(len(tr), dtype=bool)
    for c in change_t:
        near |= np.abs(tr.t_s - c - delay_s) < SETTLE_S
    # The step trace opens in deep idle (345 MHz), a driver state the model does not hold.
    deep_idle = (tr.sm_mhz < 1000) & (a_c == 0)
    keep = ~near & ~deep_idle
    return a_c[keep], a_m[keep], tr.sm_mhz[keep], tr.temp_c[keep], tr.power_fast_w[keep]


def fit_power(base: TwinParams, traces: list[Trace]) -> tuple[TwinParams, float]:
    rows = [_power_rows(tr, base.load_delay_s) for tr in traces]
    a_c, a_m, f, temp, meas = (np.concatenate(x) for x in zip(*rows, strict=True))
    names = ("idle_power_w", "leak_w_per_c", "compute_power_w", "memory_power_w", "volt_min_frac")

    def model(x):
        p = base.replace(**dict(zip(names, x, strict=True)))
        return power_split_w(p, a_c, a_m, f, temp)[0]

    x0 = [getattr(base, n) for n in names]
    sol = least_squares(
        lambda x: model(x) - meas,
        x0,
        bounds=([0, 0, 100, 0, 0.3], [400, 5, 5000, 1000, 1.0]),
        loss="soft_l1",
        f_scale=30.0,
    )
    fitted = base.replace(**dict(zip(names, sol.x, strict=True)))
    rms = float(np.sqrt(np.mean((model(sol.x) - meas) ** 2)))
    return fitted, rms


# ---------------------------------------------------------------- 2. thermal

THERMAL_NAMES = (
    "die_c_j_per_c",
    "hbm_c_j_per_c",
    "sink_c_j_per_c",
    "board_c_j_per_c",
    "die_sink_c_per_w",
    "hbm_sink_c_per_w",
    "sink_board_c_per_w",
    "board_amb_c_per_w",
    "temp_sensor_tau_s",
    "mem_temp_sensor_tau_s",
)
SPLIT_NAMES = ("hbm_idle_power_w", "hbm_share_of_memory")


N_THERMAL = 6  # [die, hbm, sink, board, die_sensor, hbm_sensor]


def thermal_ab(p: TwinParams) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (A, B) of the thermal network: dx/dt = A x + B u,
    x = [die, hbm, sink, board, die_sensor, hbm_sensor], u = [P_die, P_hbm, T_amb]."""
    a = np.zeros((N_THERMAL, N_THERMAL))
    b = np.zeros((N_THERMAL, 3))
    g_ds, g_hs = 1 / p.die_sink_c_per_w, 1 / p.hbm_sink_c_per_w
    g_sb, g_ba = 1 / p.sink_board_c_per_w, 1 / p.board_amb_c_per_w
    cd, ch, cs, cb = p.die_c_j_per_c, p.hbm_c_j_per_c, p.sink_c_j_per_c, p.board_c_j_per_c
    a[0, 0], a[0, 2] = -g_ds / cd, g_ds / cd
    a[1, 1], a[1, 2] = -g_hs / ch, g_hs / ch
    a[2, 0], a[2, 1], a[2, 2], a[2, 3] = g_ds / cs, g_hs / cs, -(g_ds + g_hs + g_sb) / cs, g_sb / cs
    a[3, 2], a[3, 3] = g_sb / cb, -(g_sb + g_ba) / cb
    a[4, 0], a[4, 4] = 1 / p.temp_sensor_tau_s, -1 / p.temp_sensor_tau_s
    a[5, 1], a[5, 5] = 1 / p.mem_temp_sensor_tau_s, -1 / p.mem_temp_sensor_tau_s
    b[0, 0], b[1, 1], b[3, 2] = 1 / cd, 1 / ch, g_ba / cb
    return a, b


def thermal_matrices(p: TwinParams, dt_s: float):
    """Continuous (A, B) and exact discrete (Phi, Gamma) matrices of the thermal network.

    x = [die, hbm, sink, board, die_sensor, hbm_sensor], u = [P_die, P_hbm, T_amb]."""
    a, b = thermal_ab(p)
    n = N_THERMAL
    m = np.zeros((n + 3, n + 3))
    m[:n, :n], m[:n, n:] = a * dt_s, b * dt_s
    e = expm(m)
    return a, b, e[:n, :n], e[:n, n:]


def _thermal_inputs(p: TwinParams, tr: Trace, grid: np.ndarray, ambient_c: float):
    idx = np.clip(np.searchsorted(tr.t_s, grid, side="right") - 1, 0, len(tr) - 1)
    total = tr.power_fast_w[idx]
    _, a_m = _delayed_load(tr, grid, p.load_delay_s)
    hbm = p.hbm_idle_power_w + p.hbm_share_of_memory * p.memory_power_w * a_m
    return np.stack([total - hbm, hbm, np.full(len(grid), ambient_c)], axis=1)


def simulate_thermal(
    p: TwinParams, tr: Trace, ambient_c: float, sink0_c: float, grid_s=THERMAL_GRID_S
):
    """Sensor temperatures (die, HBM) at the trace's rows, driven by its measured fast power."""
    grid = np.arange(tr.t_s[0], tr.t_s[-1] + grid_s, grid_s)
    u = _thermal_inputs(p, tr, grid, ambient_c)
    _, _, phi, gam = thermal_matrices(p, grid_s)
    die0 = sink0_c + p.die_sink_c_per_w * u[0, 0]
    hbm0 = sink0_c + p.hbm_sink_c_per_w * u[0, 1]
    # The board starts on the line between the sink and ambient it would hold at rest.
    board0 = ambient_c + (sink0_c - ambient_c) * p.board_amb_c_per_w / (
        p.board_amb_c_per_w + p.sink_board_c_per_w
    )
    x = np.array([die0, hbm0, sink0_c, board0, die0, hbm0])
    out = np.empty((len(grid), 2))
    drive = u @ gam.T
    for k in range(len(grid)):
        out[k] = x[4], x[5]
        x = phi @ x + drive[k]
    idx = np.clip(np.searchsorted(grid, tr.t_s), 0, len(grid) - 1)
    return out[idx, 0], out[idx, 1]


def fit_thermal(base: TwinParams, traces: list[Trace]) -> tuple[TwinParams, dict, dict]:
    names = THERMAL_NAMES + SPLIT_NAMES
    n = len(names)
    x0 = [np.log(getattr(base, k)) for k in THERMAL_NAMES] + [getattr(base, k) for k in SPLIT_NAMES]
    for tr in traces:
        x0 += [base.ambient_c, float(tr.temp_c[0]) - 5.0]
    # Lower bounds keep the nodes and sensors above what the 100 ms data can resolve; without
    # one, a capacitance can collapse towards zero (a node no longer there, and a network too
    # stiff for the plant's explicit 10 ms steps).
    floor = {
        "die_c_j_per_c": 1.0,
        "hbm_c_j_per_c": 1.0,
        "sink_c_j_per_c": 1.0,
        "temp_sensor_tau_s": 0.02,
        "mem_temp_sensor_tau_s": 0.02,
    }
    lo = (
        [np.log(floor.get(k, 1e-6)) for k in THERMAL_NAMES]
        + [0.0, 0.0]
        + [-np.inf] * (2 * len(traces))
    )
    hi = [np.inf] * len(THERMAL_NAMES) + [200.0, 1.0] + [np.inf] * (2 * len(traces))
    x0 = list(np.clip(x0, lo, hi))

    def unpack(x):
        vals = [float(np.exp(v)) for v in x[: len(THERMAL_NAMES)]] + [
            float(v) for v in x[len(THERMAL_NAMES) : n]
        ]
        return base.replace(**dict(zip(names, vals, strict=True)))

    def residual(x):
        p = unpack(x)
        res = []
        for i, tr in enumerate(traces):
            die, hbm = simulate_thermal(p, tr, x[n + 2 * i], x[n + 2 * i + 1])
            res += [die - tr.temp_c, hbm - tr.mem_temp_c]
        return np.concatenate(res)

    sol = least_squares(residual, x0, bounds=(lo, hi), x_scale="jac", max_nfev=200)
    p = unpack(sol.x)
    per_trace = {
        tr.name: (float(sol.x[n + 2 * i]), float(sol.x[n + 2 * i + 1]))
        for i, tr in enumerate(traces)
    }
    rms = {}
    for tr in traces:
        amb, sink0 = per_trace[tr.name]
        die, hbm = simulate_thermal(p, tr, amb, sink0)
        rms[f"{tr.name} temp_c RMS [C]"] = float(np.sqrt(np.mean((die - tr.temp_c) ** 2)))
        rms[f"{tr.name} mem_temp_c RMS [C]"] = float(np.sqrt(np.mean((hbm - tr.mem_temp_c) ** 2)))
    return p, per_trace, rms


# ---------------------------------------------------------------- 3. power-limit controller

CONTROL_NAMES = (
    "cap_filter_tau_s",
    "cap_gain_mhz_per_w_s",
    "cap_slew_down_mhz_per_s",
    "cap_slew_up_mhz_per_s",
)


def simulate_clock(params_list: list[TwinParams], tr: Trace, dt_s: float = CONTROL_GRID_S):
    """SM clock and power-cap flag at the trace's rows for several parameter sets at once.

    Driven by the delayed load and the measured die temperature (for leakage)."""
    grid = np.arange(tr.t_s[0], tr.t_s[-1] + dt_s, dt_s)
    a_c, a_m = _delayed_load(tr, grid, params_list[0].load_delay_s)
    idx = np.clip(np.searchsorted(tr.t_s, grid, side="right") - 1, 0, len(tr) - 1)
    temp = tr.temp_c[idx]
    p0 = params_list[0]
    k = len(params_list)
    tau = np.array([p.cap_filter_tau_s for p in params_list])
    gain = np.array([p.cap_gain_mhz_per_w_s for p in params_list])
    down = np.array([p.cap_slew_down_mhz_per_s for p in params_list])
    up = np.array([p.cap_slew_up_mhz_per_s for p in params_list])
    alpha = -np.expm1(-dt_s / tau)
    req = np.full(k, float(tr.sm_mhz[0]) if tr.sm_mhz[0] > 1000 else p0.sm_max_mhz)
    filt = np.full(k, float(tr.power_fast_w[0]))
    f_out = np.empty((len(grid), k))
    for j in range(len(grid)):
        f_out[j] = req
        total, _ = power_split_w(p0, a_c[j], a_m[j], req, temp[j])
        filt = filt + (total - filt) * alpha
        df = np.clip(gain * (p0.power_limit_w - filt) * dt_s, -down * dt_s, up * dt_s)
        req = np.clip(req + df, p0.sm_min_mhz, p0.sm_max_mhz)
    rows = np.clip(np.searchsorted(grid, tr.t_s), 0, len(grid) - 1)
    f = f_out[rows]
    return f, f < p0.sm_max_mhz - 0.5 * p0.sm_step_mhz


def fit_controller(base: TwinParams, traces: list[Trace]) -> tuple[TwinParams, dict]:
    x0 = np.log([getattr(base, n) for n in CONTROL_NAMES])
    masks = [tr.sm_mhz > 1000 for tr in traces]  # deep idle at 345 MHz is not the controller

    def sets(xs):
        return [base.replace(**dict(zip(CONTROL_NAMES, np.exp(x), strict=True))) for x in xs]

    def residual_many(xs):
        ps = sets(xs)
        out = []
        for tr, m in zip(traces, masks, strict=True):
            f, _ = simulate_clock(ps, tr)
            out.append(((f - tr.sm_mhz[:, None]) / 100.0)[m])
        return np.concatenate(out).T

    def fun(x):
        return residual_many([x])[0]

    def jac(x):
        h = 0.02
        xs = [x] + [x + h * np.eye(len(x))[i] for i in range(len(x))]
        r = residual_many(xs)
        return ((r[1:] - r[0]) / h).T

    lo = np.log([0.005, 0.1, 100.0, 100.0])
    hi = np.log([1.0, 1000.0, 1e5, 1e5])
    sol = least_squares(fun, np.clip(x0, lo, hi), jac=jac, bounds=(lo, hi), max_nfev=30)
    p = sets([sol.x])[0]
    rms = {}
    for tr, m in zip(traces, masks, strict=True):
        f, cap = simulate_clock([p], tr)
        rms[f"{tr.name} sm_mhz RMS [MHz]"] = float(np.sqrt(np.mean((f[:, 0] - tr.sm_mhz)[m] ** 2)))
        meas_cap = (tr.throttle_reasons & 0x4) > 0
        rms[f"{tr.name} power-cap state wrong [%]"] = float(100 * np.mean(cap[:, 0] != meas_cap))
    return p, rms


# ---------------------------------------------------------------- all stages


def apply_facts(p: TwinParams, facts: dict) -> TwinParams:
    """Thresholds and limits read from NVML (a facts JSON such as h100_facts.json)."""
    return p.replace(
        sw_thermal_c=float(facts.get("thr_gpu_max", p.sw_thermal_c)),
        hw_slowdown_c=float(facts.get("thr_slowdown", p.hw_slowdown_c)),
        mem_max_c=float(facts.get("thr_mem_max", p.mem_max_c)),
        power_limit_w=float(facts.get("enforced_limit_mw", p.power_limit_w * 1e3)) / 1e3,
        sm_max_mhz=float(facts.get("max_sm_clock", p.sm_max_mhz)),
        mem_mhz=float(facts.get("max_mem_clock", p.mem_mhz)),
    )


def fit_params(
    traces: list[Trace], base: TwinParams | None = None, facts: dict | None = None
) -> tuple[TwinParams, FitReport]:
    for tr in traces:
        if tr.load_units != "plant":
            raise ValueError(
                f"{tr.name}: the plant is fitted on phase-labelled traces; a serving trace "
                "fits the engine load map (`ondo twin fit --engine-load`)"
            )
    p = base or TwinParams()
    if facts:
        p = apply_facts(p, facts)
    report = FitReport()
    p, power_rms = fit_power(p, traces)
    report.residuals["fast power RMS [W]"] = power_rms
    log.info("power fitted: rms %.1f W", power_rms)
    p, per_trace, thermal_rms = fit_thermal(p, traces)
    report.residuals.update(thermal_rms)
    report.trace_ambient_c = {k: v[0] for k, v in per_trace.items()}
    p = p.replace(ambient_c=float(np.mean([v[0] for v in per_trace.values()])))
    log.info("thermal fitted")
    p, ctrl_rms = fit_controller(p, traces)
    report.residuals.update(ctrl_rms)
    notes = {
        "fitted_on": [tr.name for tr in traces],
        "trace_ambient_c": report.trace_ambient_c,
        "residuals": report.residuals,
        "thresholds": "sw_thermal_c, hw_slowdown_c, mem_max_c and power_limit_w are NVML facts "
        "(h100_facts.json), not fitted: the traces never reach the thermal thresholds. "
        "hw_slowdown_frac, hw_hysteresis_c and the sw_thermal gains are assumed.",
        "not_fitted": "sm_min_mhz, sm_step_mhz, power_window_s, power_update_s, load_delay_s "
        "are read off the traces by eye.",
    }
    return p.replace(notes=notes), report
