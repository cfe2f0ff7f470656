"""The online twin: the twin's slowly varying constants (`adapt_params`) learnt sample by
sample from the live NVML and engine streams, with the gating that keeps bad readings and
unidentifiable stretches out of them.

    twin = AdaptiveTwin(h100_params())          # or the constants saved for this GPU
    twin.on_engine_sample(step)                 # each engine step (the load it ran)
    twin.on_gpu_sample(sample)                  # each NVML poll
    twin.params()                               # TwinParams with the adapted constants
    twin.estimate()                             # the temperatures now (Estimate)

Three parts, each owning what it can identify:
- `StateFilter`: the temperatures and the inlet (a random walk), Kalman, every poll;
- `PowerMapRLS`: idle, compute and memory power, from the fast power channel;
- `ThermalTeacher`: R, C and the HBM heat split, from the open-loop error over the last
  seconds (a recursive prediction-error method), once a second.

A GPU sample waits (at most LOAD_WAIT_S) until the engine has reported the steps that ran up
to its time, since a step is reported when it ends; then, in time order:

1. predict over the interval, driven by the previous fast power reading (the instantaneous
   channel, else the energy counter's mean since its last refresh, else NVML's 1 s average),
   the HBM's share from the memory activity the steps ran;
2. each temperature reading, then the fast power reading (if the source refreshed it).
   A reading is rejected, and counted by reason (`rejected()`), when it is
   - `implausible`: not finite, or outside TEMP_RANGE_C / POWER_RANGE_W (a 200 °C spike);
   - `stuck`: unchanged for STUCK_AFTER_S while the smoothed power moved by
     STUCK_POWER_SPAN_W or more (a sensor no longer reading);
   - `innovation`: outside the chi-square gate on the filter's innovation.
   A sample at or before the previous one's time is `out_of_order` and dropped whole.
   When readings that move keep failing the gate for RESYNC_AFTER_S, the filter is the one
   that is wrong: the state's variance is inflated and the reading taken (`resyncs`).
3. teach the thermal constants when due.

Which constants may move, so that they do not drift where nothing identifies them:
- the thermal ones only while the power has moved: the 1 s smoothed power spans
  EXCITE_SPAN_W or more within the last EXCITE_WINDOW_S (the response to a step, the
  slow creep included, is still information for a few time constants after it). At a constant
  power the inlet and the resistances explain the same temperature; the inlet, for its part,
  walks only while they are frozen (INLET_VAR_STEADY);
- the compute and memory powers only while the engine ran a step within BUSY_WINDOW_S, the
  idle power only while it did not (busy, the three explain the same watts); neither from a
  reading taken while the load was still stepping (POWER_SETTLE_S) or in deep idle.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.adapt_params import (
    I_HBM_IDLE,
    I_MEMORY,
    I_SHARE,
    POWER,
    PRIOR_VAR,
    THERMAL,
    Units,
    clip_theta,
    compute_feature,
    engine_knee,
    params_from_theta,
    theta_from_params,
)
from ondo.twin.estimator import Estimate
from ondo.twin.load_window import LoadWindow
from ondo.twin.params import TwinParams
from ondo.twin.plant import voltage_frac
from ondo.twin.power_map import ENERGY_VAR_W2, POWER_VAR_W2, EnergyWindow, PowerMapRLS
from ondo.twin.state_filter import (
    I_DIE_SENSOR,
    I_HBM_SENSOR,
    Innovation,
    StateFilter,
    rest_state,
)
from ondo.twin.thermal_teacher import ThermalTeacher

LOAD_WAIT_S = 0.5
MAX_PREDICT_S = 1.0  # a longer gap between polls is predicted in parts
POWER_FEATURE_WINDOW_S = 0.1  # the fast power channel against the load of this much before it
# A power reading is learnt from only where no load step is in progress: the load of the
# last POWER_FEATURE_WINDOW_S (or of each half of an energy window) within these of the load
# over POWER_SETTLE_S, in time under load and in each activity (the readings lag a step).
POWER_SETTLE_S = 0.5
POWER_SETTLE_BUSY_TOL = 0.15
POWER_SETTLE_LOAD_TOL = 0.5
# With no load and the clock under this share of its maximum the GPU is in deep idle, a
# driver state the power map does not hold (the step trace opens in it at 69 W, 345 MHz).
DEEP_IDLE_CLOCK_FRAC = 0.5
EXCITE_SMOOTH_TAU_S = 1.0
EXCITE_WINDOW_S = 120.0  # a few of the slowest time constants after the power last moved
EXCITE_SAMPLE_S = 0.25
EXCITE_SPAN_W = 80.0
BUSY_WINDOW_S = 5.0
# The inlet's random walk [C^2/s]: still while the thermal constants learn (else it would
# absorb what they are learning), free while they are frozen.
INLET_VAR_EXCITED = 0.0
INLET_VAR_STEADY = 0.02
TEMP_RANGE_C = (-20.0, 130.0)
POWER_RANGE_W = (0.0, 3000.0)
RESYNC_AFTER_S = 2.0
STUCK_AFTER_S = 3.0
STUCK_POWER_SPAN_W = 200.0
ENGINE_LOAD_DELAY_S = 0.0  # engine steps are timed on the GPU's side of the host (they sync)
_I_IDLE, _I_COMPUTE, _I_MEMORY = 0, 1, 2  # in the power map's own vector


@dataclass
class GateCounts:
    """Readings of one channel: taken, and rejected by reason."""

    accepted: int = 0
    innovation: int = 0
    implausible: int = 0
    stuck: int = 0
    missing: int = 0
    resyncs: int = 0
    unsettled: int = 0  # power readings not learnt from: load stepping, or deep idle

    @property
    def rejected(self) -> int:
        return self.innovation + self.implausible + self.stuck


@dataclass
class _Channel:
    """Gating state of one temperature sensor."""

    index: int
    counts: GateCounts = field(default_factory=GateCounts)
    reading: float | None = None
    changed_at_s: float = -math.inf
    power_lo_w: float = math.inf
    power_hi_w: float = -math.inf
    run_start_s: float | None = None  # first of the readings the gate keeps rejecting
    run_lo: float = math.inf
    run_hi: float = -math.inf


class Excitation:
    """Whether the power has moved enough lately to identify the thermal constants: the span
    of the 1 s smoothed power over the last EXCITE_WINDOW_S is EXCITE_SPAN_W or more."""

    def __init__(self) -> None:
        self.smooth_w: float | None = None
        self._history: deque[tuple[float, float]] = deque()  # (t, smoothed power)

    def update(self, t_s: float, dt_s: float, power_w: float) -> None:
        if self.smooth_w is None:
            self.smooth_w = power_w
        else:
            self.smooth_w += -math.expm1(-dt_s / EXCITE_SMOOTH_TAU_S) * (power_w - self.smooth_w)
        h = self._history
        if not h or t_s - h[-1][0] >= EXCITE_SAMPLE_S:
            h.append((t_s, self.smooth_w))
        while h and h[0][0] < t_s - EXCITE_WINDOW_S:
            h.popleft()

    @property
    def span_w(self) -> float:
        if not self._history:
            return 0.0
        values = [w for _, w in self._history]
        return max(values) - min(values)

    @property
    def excited(self) -> bool:
        return self.span_w >= EXCITE_SPAN_W


def _plausible(value: float | None, lo: float, hi: float) -> tuple[float | None, bool]:
    """(value or None, whether a value was there but implausible)."""
    if value is None:
        return None, False
    v = float(value)
    if not math.isfinite(v) or not lo <= v <= hi:
        return None, True
    return v, False


class AdaptiveTwin:
    """The online twin of one GPU, fed sample by sample; see the module's docstring."""

    def __init__(self, base: TwinParams, units: Units = "engine",
                 theta: np.ndarray | None = None, theta_var: np.ndarray | None = None,
                 gpu_index: int = 0, load_delay_s: float | None = None) -> None:
        self.base = base
        self.units = units
        self.gpu_index = gpu_index
        self.knee = engine_knee(base) if units == "engine" else 0.0
        t0 = theta_from_params(base, units) if theta is None else clip_theta(
            np.asarray(theta, float))
        var0 = None
        if theta_var is not None:  # a resumed variance: finite, positive, not over the prior
            v = np.asarray(theta_var, float)
            var0 = np.where(np.isfinite(v) & (v > 0), np.minimum(v, PRIOR_VAR), PRIOR_VAR)
        self.theta0 = t0.copy()  # where it started (saved or the base's)
        self.teacher = ThermalTeacher(t0[THERMAL], None if var0 is None else var0[THERMAL])
        self.power = PowerMapRLS(t0[POWER], None if var0 is None else var0[POWER])
        self.energy = EnergyWindow()
        if load_delay_s is None:
            load_delay_s = ENGINE_LOAD_DELAY_S if units == "engine" else base.load_delay_s
        self.load_delay_s = load_delay_s
        self.window = LoadWindow(lambda c: float(compute_feature(units, self.knee, c, 1.0, 1.0)))
        self.filter: StateFilter | None = None
        self.excitation = Excitation()
        self.die = _Channel(I_DIE_SENSOR)
        self.hbm = _Channel(I_HBM_SENSOR)
        self.power_counts = GateCounts()
        self.out_of_order = 0
        self.samples = 0  # GPU samples the filter has taken
        self.t_s: float | None = None  # time of the filter's state
        self.excited_s = 0.0  # time during which the thermal constants were free
        self.latest: GpuSample | None = None
        # Called with each sample the filter has taken, after its updates (replay records).
        self.on_processed: Callable[[GpuSample], None] | None = None
        self._pending: deque[GpuSample] = deque()
        self._last_queued_s = -math.inf
        self._drive_w: float | None = None
        self._power_run_start_s: float | None = None
        self._energy: tuple[float, float] | None = None  # (time, counter) at its last refresh
        self._energy_w: float | None = None
        self._power_t_s: float | None = None
        self._params_key: bytes = b""
        self._params: TwinParams = base

    # ------------------------------------------------------------------ constants

    @property
    def theta(self) -> np.ndarray:
        t = np.empty(len(THERMAL) + len(POWER))
        t[THERMAL], t[POWER] = self.teacher.theta, self.power.theta
        return t

    @property
    def theta_var(self) -> np.ndarray:
        v = np.empty(len(THERMAL) + len(POWER))
        v[THERMAL], v[POWER] = np.diag(self.teacher.p), np.diag(self.power.p)
        return v

    def params(self) -> TwinParams:
        theta = self.theta
        key = theta.tobytes()
        if key != self._params_key:
            self._params = params_from_theta(self.base, theta, self.units, self.knee)
            self._params_key = key
        return self._params

    def _params_for_thermal(self, thermal: np.ndarray) -> TwinParams:
        theta = self.theta
        theta[THERMAL] = thermal
        return params_from_theta(self.base, theta, self.units, self.knee)

    def hbm_power_w(self, memory_activity: float) -> float:
        t = self.theta
        return float(t[I_HBM_IDLE] + t[I_SHARE] * t[I_MEMORY] * memory_activity)

    # ------------------------------------------------------------------ inputs

    def on_load(self, start_s: float, end_s: float, compute_activity: float,
                memory_activity: float) -> None:
        """A span of load on the GPU's clock (an engine step, a trace's phase segment)."""
        d = self.load_delay_s
        self.window.add(start_s + d, end_s + d, compute_activity, memory_activity)
        self._drain()

    def on_engine_sample(self, s: EngineSample) -> None:
        self.on_load(s.start_monotonic_s, s.end_monotonic_s, s.compute_activity,
                     s.memory_activity)

    def on_gpu_sample(self, s: GpuSample) -> None:
        if s.gpu_index != self.gpu_index:
            return
        if not s.t_monotonic_s > self._last_queued_s:
            self.out_of_order += 1
            return
        self._last_queued_s = s.t_monotonic_s
        self._pending.append(s)
        self._drain()

    def flush(self) -> None:
        """Take every waiting sample now (end of a trace)."""
        while self._pending:
            self._process(self._pending.popleft())

    def _drain(self) -> None:
        while self._pending:
            s = self._pending[0]
            if (self.window.covered_until_s < s.t_monotonic_s
                    and self._last_queued_s - s.t_monotonic_s < LOAD_WAIT_S):
                return
            self._process(self._pending.popleft())

    # ------------------------------------------------------------------ one sample

    def _process(self, s: GpuSample) -> None:
        t = s.t_monotonic_s
        temp, bad_temp = _plausible(s.temp_c, *TEMP_RANGE_C)
        mem, bad_mem = _plausible(s.mem_temp_c, *TEMP_RANGE_C)
        fast, fresh = self._fast_power(s)
        power, bad_power = _plausible(fast, *POWER_RANGE_W)
        if self.filter is None:
            if temp is None or power is None:
                return
            hbm_w = self.hbm_power_w(0.0)
            self.filter = StateFilter(rest_state(self.params(), temp,
                                                 mem if mem is not None else temp, power, hbm_w))
            self.t_s, self._drive_w = t, power
            self.excitation.update(t, 0.0, power)
            self._taken(s)
            return
        assert self.t_s is not None and self._drive_w is not None
        f = self.filter
        excited = self.excitation.excited
        t0, m_total = self.t_s, 0.0
        while t0 < t:
            step = min(t - t0, MAX_PREDICT_S)
            _, m = self.window.mean(t0, t0 + step)
            f.predict(self.params(), self._params_key, step, self._drive_w,
                      self.hbm_power_w(m), INLET_VAR_EXCITED if excited else INLET_VAR_STEADY)
            if excited:
                self.teacher.drift(step)
            m_total += m * step
            t0 += step
        if excited:
            self.excited_s += t - self.t_s
        if power is not None:
            self.excitation.update(t, t - self.t_s, power)
        die = self._sensor(self.die, temp, bad_temp, t)
        hbm = self._sensor(self.hbm, mem, bad_mem, t)
        self.teacher.record(self.t_s, t, self._drive_w, m_total / (t - self.t_s), die, hbm,
                            f.x, np.diag(f.p))
        window = self.energy.add(t, s.energy_j, "energy_j" not in s.stale, s.sm_mhz)
        if window is not None:
            self._power_window(*window)
        elif s.energy_j is None:  # no counter: the fast channel, reading by reading
            if bad_power:
                self.power_counts.implausible += 1
            elif power is None:
                self.power_counts.missing += 1
            elif fresh:
                self._power_instant(power, s, t)
        if power is not None:
            self._drive_w = power
        self.t_s = t
        if excited:
            self.teacher.teach(t, self._params_for_thermal, float(self.power.theta[_I_MEMORY]))
        self._taken(s)

    def _taken(self, s: GpuSample) -> None:
        self.latest = s
        self.samples += 1
        if self.on_processed is not None:
            self.on_processed(s)

    def _fast_power(self, s: GpuSample) -> tuple[float | None, bool]:
        """(the fastest power reading, whether the source refreshed it at this sample)."""
        if s.power_instant_w is not None:
            return s.power_instant_w, "power_instant_w" not in s.stale
        e = s.energy_j
        if e is not None and math.isfinite(e) and "energy_j" not in s.stale:
            last = self._energy
            self._energy = (s.t_monotonic_s, e)
            if last is not None and e >= last[1] and s.t_monotonic_s > last[0]:
                self._energy_w = (e - last[1]) / (s.t_monotonic_s - last[0])
                return self._energy_w, True
        if self._energy_w is not None:
            return self._energy_w, False
        return s.power_w, s.power_w is not None and "power_w" not in s.stale

    def _sensor(self, ch: _Channel, reading: float | None, implausible: bool,
                t: float) -> float | None:
        """Gate and take one temperature reading; returns it if the filter took it."""
        f = self.filter
        assert f is not None
        if implausible:
            ch.counts.implausible += 1
            return None
        if reading is None:
            ch.counts.missing += 1
            return None
        smooth = self.excitation.smooth_w or 0.0
        if reading != ch.reading:
            ch.reading, ch.changed_at_s = reading, t
            ch.power_lo_w = ch.power_hi_w = smooth
        else:
            ch.power_lo_w, ch.power_hi_w = min(ch.power_lo_w, smooth), max(ch.power_hi_w, smooth)
        if (t - ch.changed_at_s >= STUCK_AFTER_S
                and ch.power_hi_w - ch.power_lo_w >= STUCK_POWER_SPAN_W):
            ch.counts.stuck += 1
            return None
        inn = f.update_sensor(ch.index, reading)
        if inn.accepted:
            ch.counts.accepted += 1
            ch.run_start_s = None
            return reading
        ch.counts.innovation += 1
        if ch.run_start_s is None:
            ch.run_start_s, ch.run_lo, ch.run_hi = t, reading, reading
            return None
        ch.run_lo, ch.run_hi = min(ch.run_lo, reading), max(ch.run_hi, reading)
        if t - ch.run_start_s >= RESYNC_AFTER_S and ch.run_hi > ch.run_lo:
            self._resync(ch.index, inn)
            f.update_sensor(ch.index, reading, gate=False)
            ch.counts.resyncs += 1
            ch.run_start_s = None
        return None

    def _resync(self, sensor_index: int, inn: Innovation) -> None:
        f = self.filter
        assert f is not None
        f.inflate_level(sensor_index, inn.residual * inn.residual)

    def _power_window(self, t0: float, t1: float, power_w: float, sm_mhz: float | None) -> None:
        """The energy counter's mean power over (t0, t1] against the load's mean then."""
        p = self.base
        if not POWER_RANGE_W[0] <= power_w <= POWER_RANGE_W[1]:
            self.power_counts.implausible += 1
            return
        mid = 0.5 * (t0 + t1)
        first, second = self.window.mean(t0, mid), self.window.mean(mid, t1)
        c, m = self.window.mean(t0, t1)
        sm = sm_mhz if sm_mhz is not None and sm_mhz > 0 else p.sm_max_mhz
        stepped = (abs(first[0] - second[0]) > POWER_SETTLE_LOAD_TOL
                   or abs(first[1] - second[1]) > POWER_SETTLE_LOAD_TOL
                   or (c + m > 0) != self.window.busy(t0, mid)
                   or (c + m > 0) != self.window.busy(mid, t1))
        if stepped or (c == 0 and m == 0 and sm < DEEP_IDLE_CLOCK_FRAC * p.sm_max_mhz):
            self.power_counts.unsettled += 1  # a load step inside, or deep idle
            return
        self._learn_power(power_w, c, m, sm, t1, ENERGY_VAR_W2)

    def _power_instant(self, power_w: float, s: GpuSample, t: float) -> None:
        """A fast power reading against the load of the POWER_FEATURE_WINDOW_S before it."""
        p = self.base
        if not self.window.steady(t, POWER_FEATURE_WINDOW_S, POWER_SETTLE_S,
                                  POWER_SETTLE_BUSY_TOL, POWER_SETTLE_LOAD_TOL):
            self.power_counts.unsettled += 1
            return
        c, m = self.window.mean(t - POWER_FEATURE_WINDOW_S, t)
        sm = s.sm_mhz if s.sm_mhz is not None and s.sm_mhz > 0 else p.sm_max_mhz
        if c == 0 and m == 0 and sm < DEEP_IDLE_CLOCK_FRAC * p.sm_max_mhz:
            self.power_counts.unsettled += 1
            return
        self._learn_power(power_w, c, m, sm, t, POWER_VAR_W2)

    def _learn_power(self, power_w: float, c: float, m: float, sm_mhz: float, t: float,
                     var_w2: float) -> None:
        f = self.filter
        assert f is not None
        p = self.base
        v = float(voltage_frac(p, sm_mhz))
        feature = c * v * v * min(sm_mhz / p.sm_max_mhz, 1.0)
        leak_w = p.leak_w_per_c * (float(f.x[0]) - p.leak_ref_c)
        busy = self.window.busy(t - BUSY_WINDOW_S, t)
        free = np.array([not busy, busy, busy])
        self.power.drift(t - (self._power_t_s if self._power_t_s is not None else t), free)
        self._power_t_s = t
        inn = self.power.update(power_w, leak_w, feature, m, free, var_w2=var_w2)
        if inn.accepted:
            self.power_counts.accepted += 1
            self._power_run_start_s = None
            return
        self.power_counts.innovation += 1
        if self._power_run_start_s is None:
            self._power_run_start_s = t
        elif t - self._power_run_start_s >= RESYNC_AFTER_S:
            self.power.update(power_w, leak_w, feature, m, free, gate=False, var_w2=var_w2)
            self.power_counts.resyncs += 1
            self._power_run_start_s = None

    # ------------------------------------------------------------------ outputs

    @property
    def ready(self) -> bool:
        return self.filter is not None

    def estimate(self) -> Estimate:
        """The filter's temperatures now (call once `ready`)."""
        f = self.filter
        assert f is not None
        x = f.x
        params = self.params()
        power_w = self._drive_w or 0.0
        t = self.t_s or 0.0
        _, m = self.window.mean(t - 1.0, t)
        hbm_w = self.hbm_power_w(m)
        board = x[6] + params.board_amb_c_per_w * power_w
        sink = board + params.sink_board_c_per_w * power_w
        return Estimate(
            die_c=float(x[0]), hbm_c=float(x[1]), sink_c=float(x[2]), board_c=float(x[3]),
            die_sensor_c=float(x[4]), hbm_sensor_c=float(x[5]), ambient_c=float(x[6]),
            die_std_c=f.sensor_std_c(I_DIE_SENSOR), hbm_std_c=f.sensor_std_c(I_HBM_SENSOR),
            heading_temp_c=float(sink + params.die_sink_c_per_w * (power_w - hbm_w)),
            heading_mem_temp_c=float(sink + params.hbm_sink_c_per_w * hbm_w),
        )

    def rejected(self) -> dict[str, int]:
        """Readings rejected so far, by reason, over every channel."""
        chans = (self.die.counts, self.hbm.counts, self.power_counts)
        return {
            "innovation": sum(c.innovation for c in chans),
            "implausible": sum(c.implausible for c in chans),
            "stuck": sum(c.stuck for c in chans),
            "out_of_order": self.out_of_order,
        }

    @property
    def resyncs(self) -> int:
        return self.die.counts.resyncs + self.hbm.counts.resyncs + self.power_counts.resyncs
