"""The GPU plant: thermal RC network, DVFS power, sensors and the driver's clock controllers.

Use it as a simulated GPU:

    plant = GpuPlant(h100_params())
    reading = plant.step(0.01, Load(compute_activity=1.0, memory_activity=0.0), ambient_c=25.0)
    reading.temp_c, reading.power_w, reading.sm_mhz, reading.throttle_reasons

`Load` is what the engine runs (fractions of compute- and memory-bound work, each in [0, 1]);
`ambient_c` is the inlet air temperature. `PlantReading` is what NVML would report: integer
temperatures after a first-order sensor lag, power as a 1 s moving average refreshed every
100 ms (`power_w`) plus the instantaneous channel (`power_instant_w`), the energy counter,
clocks, utilisation and throttle-reason bits with NVML's values (`THROTTLE_*`).

Model (each step of dt seconds; die and HBM nodes implicit, so they stay stable at any dt):
  thermal   C_die dT_die/dt = P_die - (T_die - T_sink)/R_die_sink
            C_hbm dT_hbm/dt = P_hbm - (T_hbm - T_sink)/R_hbm_sink
            C_sink dT_sink/dt = (T_die - T_sink)/R_die_sink + (T_hbm - T_sink)/R_hbm_sink
                                - (T_sink - T_board)/R_sink_board
            C_board dT_board/dt = (T_sink - T_board)/R_sink_board - (T_board - T_amb)/R_board_amb
  power     P = P_idle + k_leak (T_die - T_ref) + P_comp a_c (V(f)/V_max)^2 f/f_max + P_mem a_m
            P_hbm = P_hbm_idle + s_mem P_mem a_m, P_die = P - P_hbm
  clocks    f = min(f_power, f_sw_thermal, f_hw) where
            f_power: integral controller on filtered power vs the limit, rate-limited (0x4)
            f_sw_thermal: integral controller holding T_die at the max operating temp (0x20)
            f_hw: hard step to hw_slowdown_frac * f_max above the slowdown threshold or the
            HBM limit, released with hysteresis (0x40 | 0x8)

`PlantState` holds numpy arrays, so `advance` steps many independent GPUs (or many forecasts
from different starting states) at once; `GpuPlant` is the one-GPU wrapper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ondo.twin.params import TwinParams

THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_HW_SLOWDOWN = 0x8
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_GPU_IDLE = 0x1  # nothing running: NVML reports it beside the clock reasons
THERMAL_BITS = THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL


@dataclass(frozen=True)
class Load:
    compute_activity: float = 0.0  # fraction of the SMs busy with compute-bound work
    memory_activity: float = 0.0  # fraction of HBM bandwidth in use


@dataclass(frozen=True)
class PlantReading:
    temp_c: int
    mem_temp_c: int
    power_w: float  # 1 s moving average, refreshed every power_update_s
    power_instant_w: float
    energy_j: float  # refreshed with power_w
    sm_mhz: float
    mem_mhz: float
    throttle_reasons: int
    util_pct: float


@dataclass
class PlantState:
    """True and sensor state; every field is an array of the same shape (one entry per GPU)."""

    die_c: np.ndarray
    hbm_c: np.ndarray
    sink_c: np.ndarray
    board_c: np.ndarray
    die_sensor_c: np.ndarray
    hbm_sensor_c: np.ndarray
    cap_power_w: np.ndarray  # the power controller's filtered power
    power_req_mhz: np.ndarray
    thermal_req_mhz: np.ndarray
    hw_slowdown: np.ndarray  # bool
    sm_mhz: np.ndarray
    power_instant_w: np.ndarray
    power_window_w: np.ndarray  # shape (..., n_window): last power_update_s averages
    tick_energy_j: np.ndarray  # energy since the last sensor refresh
    tick_elapsed_s: np.ndarray
    power_avg_w: np.ndarray
    energy_j: np.ndarray
    energy_reported_j: np.ndarray

    def copy(self) -> PlantState:
        return PlantState(
            **{f.name: np.array(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def take(self, index) -> PlantState:
        return PlantState(
            **{f.name: np.array(getattr(self, f.name)[index]) for f in dataclasses.fields(self)}
        )


def window_len(params: TwinParams) -> int:
    return max(1, round(params.power_window_s / params.power_update_s))


def voltage_frac(params: TwinParams, sm_mhz):
    span = params.sm_max_mhz - params.sm_min_mhz
    x = np.clip((np.asarray(sm_mhz, dtype=float) - params.sm_min_mhz) / span, 0.0, 1.0)
    return params.volt_min_frac + (1.0 - params.volt_min_frac) * x


def power_split_w(params: TwinParams, compute_activity, memory_activity, sm_mhz, die_c):
    """(total power, power dissipated in the HBM) for a load at a clock and die temperature."""
    v = voltage_frac(params, sm_mhz)
    compute_w = (
        params.compute_power_w
        * np.asarray(compute_activity)
        * v
        * v
        * (np.asarray(sm_mhz) / params.sm_max_mhz)
    )
    memory_w = params.memory_power_w * np.asarray(memory_activity)
    idle_w = params.idle_power_w + params.leak_w_per_c * (np.asarray(die_c) - params.leak_ref_c)
    total_w = idle_w + compute_w + memory_w
    hbm_w = params.hbm_idle_power_w + params.hbm_share_of_memory * memory_w
    return total_w, hbm_w


def steady_state(params: TwinParams, load: Load, ambient_c: float, shape=()) -> PlantState:
    """The state the plant settles to under a constant load, power-cap clock included."""
    sm = params.sm_max_mhz
    die = hbm = sink = board = ambient_c
    for _ in range(60):
        total, hbm_w = power_split_w(params, load.compute_activity, load.memory_activity, sm, die)
        if total > params.power_limit_w:
            sm = _cap_clock_mhz(params, load, die)
            total, hbm_w = power_split_w(
                params, load.compute_activity, load.memory_activity, sm, die
            )
        board = ambient_c + params.board_amb_c_per_w * total
        sink = board + params.sink_board_c_per_w * total
        die = sink + params.die_sink_c_per_w * (total - hbm_w)
        hbm = sink + params.hbm_sink_c_per_w * hbm_w
    return initial_state(
        params, float(die), float(hbm), float(sink), float(board), float(sm), float(total), shape
    )


def _cap_clock_mhz(params: TwinParams, load: Load, die_c: float) -> float:
    lo, hi = params.sm_min_mhz, params.sm_max_mhz
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        total, _ = power_split_w(params, load.compute_activity, load.memory_activity, mid, die_c)
        lo, hi = (mid, hi) if total < params.power_limit_w else (lo, mid)
    return lo


def initial_state(
    params: TwinParams,
    die_c,
    hbm_c,
    sink_c,
    board_c,
    sm_mhz,
    power_w,
    shape=(),
) -> PlantState:
    """A state with the given temperatures, clock and power, sensors agreeing with them."""

    def full(x):
        return np.broadcast_to(np.asarray(x, dtype=float), shape).copy()

    n = window_len(params)
    power = full(power_w)
    return PlantState(
        die_c=full(die_c),
        hbm_c=full(hbm_c),
        sink_c=full(sink_c),
        board_c=full(board_c),
        die_sensor_c=full(die_c),
        hbm_sensor_c=full(hbm_c),
        cap_power_w=power.copy(),
        power_req_mhz=full(sm_mhz),
        thermal_req_mhz=full(params.sm_max_mhz),
        hw_slowdown=np.zeros(shape, dtype=bool),
        sm_mhz=full(sm_mhz),
        power_instant_w=power.copy(),
        power_window_w=np.repeat(power[..., None], n, axis=-1),
        tick_energy_j=full(0.0),
        tick_elapsed_s=full(0.0),
        power_avg_w=power.copy(),
        energy_j=full(0.0),
        energy_reported_j=full(0.0),
    )


def advance(
    s: PlantState, p: TwinParams, dt_s, compute_activity, memory_activity, ambient_c
) -> None:
    """Step every GPU in `s` by dt_s seconds (scalar or per-GPU array) in place."""
    dt = np.asarray(dt_s, dtype=float)
    a_c = np.asarray(compute_activity, dtype=float)
    a_m = np.asarray(memory_activity, dtype=float)

    # Clock: the lowest request wins.
    f = np.minimum(s.power_req_mhz, s.thermal_req_mhz)
    f = np.where(s.hw_slowdown, np.minimum(f, p.hw_slowdown_frac * p.sm_max_mhz), f)
    s.sm_mhz = np.clip(f, p.sm_min_mhz, p.sm_max_mhz)

    total_w, hbm_w = power_split_w(p, a_c, a_m, s.sm_mhz, s.die_c)
    die_w = total_w - hbm_w
    s.power_instant_w = total_w

    # Thermal network: the small die and HBM nodes implicit against the sink, the rest explicit.
    g_die = dt / (p.die_c_j_per_c * p.die_sink_c_per_w)
    g_hbm = dt / (p.hbm_c_j_per_c * p.hbm_sink_c_per_w)
    s.die_c = (s.die_c + dt * die_w / p.die_c_j_per_c + g_die * s.sink_c) / (1 + g_die)
    s.hbm_c = (s.hbm_c + dt * hbm_w / p.hbm_c_j_per_c + g_hbm * s.sink_c) / (1 + g_hbm)
    q_die = (s.die_c - s.sink_c) / p.die_sink_c_per_w
    q_hbm = (s.hbm_c - s.sink_c) / p.hbm_sink_c_per_w
    q_board = (s.sink_c - s.board_c) / p.sink_board_c_per_w
    q_amb = (s.board_c - ambient_c) / p.board_amb_c_per_w
    s.sink_c = s.sink_c + dt * (q_die + q_hbm - q_board) / p.sink_c_j_per_c
    s.board_c = s.board_c + dt * (q_board - q_amb) / p.board_c_j_per_c

    # Temperature sensors: first-order lag (exact discretisation, so any dt is stable).
    s.die_sensor_c = s.die_sensor_c + (s.die_c - s.die_sensor_c) * -np.expm1(
        -dt / p.temp_sensor_tau_s
    )
    s.hbm_sensor_c = s.hbm_sensor_c + (s.hbm_c - s.hbm_sensor_c) * -np.expm1(
        -dt / p.mem_temp_sensor_tau_s
    )

    # Power sensor: 1 s moving average of 100 ms means, refreshed every 100 ms.
    s.energy_j = s.energy_j + total_w * dt
    s.tick_energy_j = s.tick_energy_j + total_w * dt
    s.tick_elapsed_s = s.tick_elapsed_s + dt
    tick = s.tick_elapsed_s >= p.power_update_s - 1e-9
    if np.any(tick):
        mean_w = s.tick_energy_j / np.maximum(s.tick_elapsed_s, 1e-9)
        rolled = np.concatenate([s.power_window_w[..., 1:], mean_w[..., None]], axis=-1)
        s.power_window_w = np.where(tick[..., None], rolled, s.power_window_w)
        s.power_avg_w = np.where(tick, s.power_window_w.mean(axis=-1), s.power_avg_w)
        s.energy_reported_j = np.where(tick, s.energy_j, s.energy_reported_j)
        s.tick_energy_j = np.where(tick, 0.0, s.tick_energy_j)
        s.tick_elapsed_s = np.where(tick, 0.0, s.tick_elapsed_s)

    # Power-limit controller: integral on its own filtered power, rate-limited both ways.
    s.cap_power_w = s.cap_power_w + (total_w - s.cap_power_w) * -np.expm1(-dt / p.cap_filter_tau_s)
    df = p.cap_gain_mhz_per_w_s * (p.power_limit_w - s.cap_power_w) * dt
    df = np.clip(df, -p.cap_slew_down_mhz_per_s * dt, p.cap_slew_up_mhz_per_s * dt)
    s.power_req_mhz = np.clip(s.power_req_mhz + df, p.sm_min_mhz, p.sm_max_mhz)

    # SW thermal controller: integral on the die sensor above the max operating temperature.
    over_c = s.die_sensor_c - p.sw_thermal_c
    df_t = np.clip(
        -p.sw_thermal_gain_mhz_per_c_s * over_c * dt,
        -p.sw_thermal_slew_mhz_per_s * dt,
        p.sw_thermal_slew_mhz_per_s * dt,
    )
    s.thermal_req_mhz = np.clip(s.thermal_req_mhz + df_t, p.sm_min_mhz, p.sm_max_mhz)

    # HW thermal slowdown: hard step at the threshold, released with hysteresis.
    trip = (s.die_sensor_c >= p.hw_slowdown_c) | (s.hbm_sensor_c >= p.mem_max_c)
    release = (s.die_sensor_c < p.hw_slowdown_c - p.hw_hysteresis_c) & (
        s.hbm_sensor_c < p.mem_max_c - p.hw_hysteresis_c
    )
    s.hw_slowdown = trip | (s.hw_slowdown & ~release)


def throttle_reasons(s: PlantState, p: TwinParams) -> np.ndarray:
    """NVML clocks-event-reason bits for the state's current controller requests."""
    limit = p.sm_max_mhz - 0.5 * p.sm_step_mhz
    bits = np.where(s.power_req_mhz < limit, THROTTLE_SW_POWER_CAP, 0)
    bits = bits | np.where(s.thermal_req_mhz < limit, THROTTLE_SW_THERMAL, 0)
    bits = bits | np.where(s.hw_slowdown, THROTTLE_HW_THERMAL | THROTTLE_HW_SLOWDOWN, 0)
    return bits.astype(int)


def reported_sm_mhz(s: PlantState, p: TwinParams) -> np.ndarray:
    return np.round(s.sm_mhz / p.sm_step_mhz) * p.sm_step_mhz


def plant_step_matrix(p: TwinParams, dt_s: float) -> np.ndarray:
    """The linear part of one step of `advance` on [die, hbm, sink, board]:
    the die and HBM nodes implicit against the sink, the sink and board explicit, leakage
    on the die's previous temperature (its only feedback)."""
    g_d = dt_s / (p.die_c_j_per_c * p.die_sink_c_per_w)
    g_h = dt_s / (p.hbm_c_j_per_c * p.hbm_sink_c_per_w)
    die = np.array([1 + dt_s * p.leak_w_per_c / p.die_c_j_per_c, 0.0, g_d, 0.0]) / (1 + g_d)
    hbm = np.array([0.0, 1.0, g_h, 0.0]) / (1 + g_h)
    sink = np.array([0.0, 0.0, 1.0, 0.0])
    board = np.array([0.0, 0.0, 0.0, 1.0])
    q_die = (die - sink) / p.die_sink_c_per_w
    q_hbm = (hbm - sink) / p.hbm_sink_c_per_w
    q_board = (sink - board) / p.sink_board_c_per_w
    q_amb = board / p.board_amb_c_per_w
    return np.stack(
        [
            die,
            hbm,
            sink + dt_s * (q_die + q_hbm - q_board) / p.sink_c_j_per_c,
            board + dt_s * (q_board - q_amb) / p.board_c_j_per_c,
        ]
    )


def largest_stable_step_s(p: TwinParams, hi_s: float = 1.0) -> float:
    """The longest step (to 1 %) with which the plant's thermal network still decays."""

    def stable(dt_s: float) -> bool:
        return float(np.max(np.abs(np.linalg.eigvals(plant_step_matrix(p, dt_s))))) < 1.0

    if stable(hi_s):
        return hi_s
    lo_s = 0.0
    while hi_s - lo_s > 0.01 * hi_s:
        mid = 0.5 * (lo_s + hi_s)
        lo_s, hi_s = (mid, hi_s) if stable(mid) else (lo_s, mid)
    return lo_s


class GpuPlant:
    """One simulated GPU; `step` advances it and returns what NVML would read."""

    def __init__(
        self, params: TwinParams, ambient_c: float | None = None, state: PlantState | None = None
    ):
        self.params = params
        amb = params.ambient_c if ambient_c is None else ambient_c
        self.state = state if state is not None else steady_state(params, Load(), amb)
        self.time_s = 0.0
        self._util_pct = 0.0
        # A step longer than the thermal network allows is taken in stable parts.
        self.max_step_s = 0.9 * largest_stable_step_s(params)

    def step(self, dt_s: float, load: Load, ambient_c: float | None = None) -> PlantReading:
        amb = self.params.ambient_c if ambient_c is None else ambient_c
        parts = max(1, int(np.ceil(dt_s / self.max_step_s)))
        for _ in range(parts):
            advance(self.state, self.params, dt_s / parts, load.compute_activity, load.memory_activity, amb)
        self.time_s += dt_s
        self._util_pct = 100.0 * max(load.compute_activity, load.memory_activity)
        return self.reading()

    def reading(self) -> PlantReading:
        s, p = self.state, self.params
        return PlantReading(
            temp_c=int(np.round(s.die_sensor_c)),
            mem_temp_c=int(np.round(s.hbm_sensor_c)),
            power_w=float(s.power_avg_w),
            power_instant_w=float(s.power_instant_w),
            energy_j=float(s.energy_reported_j),
            sm_mhz=float(reported_sm_mhz(s, p)),
            mem_mhz=p.mem_mhz,
            throttle_reasons=int(throttle_reasons(s, p)) | (THROTTLE_GPU_IDLE if self._util_pct == 0 else 0),
            util_pct=self._util_pct,
        )
