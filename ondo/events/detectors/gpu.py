"""Detectors over one GPU's samples: throttle episodes by NVML reason, a sustained power cap,
the power budget, thermal and HBM margins as measured, stale and failed sensors, gaps.

Each is a deterministic fold: `feed(sample)` updates its own state and returns the events
that sample completes; nothing else is read or written. Time is the sample's monotonic time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ondo.events.config import DetectorConfig
from ondo.events.detectors.common import cleared, episode_key, gpu_ref, opened
from ondo.events.hysteresis import CLEAR, CLOSED, OPENED, Hysteresis, Transition
from ondo.events.schema import EventDraft, EventKind, Severity
from ondo.telemetry.schema import REFRESHED_COLUMNS, GpuSample, ThrottleReason

# The reasons that slow the clocks (idle, application clocks, sync boost and display clock
# settings are states, not throttles).
THROTTLE_REASONS: tuple[ThrottleReason, ...] = (
    ThrottleReason.SW_POWER_CAP,
    ThrottleReason.HW_SLOWDOWN,
    ThrottleReason.SW_THERMAL_SLOWDOWN,
    ThrottleReason.HW_THERMAL_SLOWDOWN,
    ThrottleReason.HW_POWER_BRAKE_SLOWDOWN,
)
THERMAL_REASON_BITS = (ThrottleReason.SW_THERMAL_SLOWDOWN | ThrottleReason.HW_THERMAL_SLOWDOWN
                       | ThrottleReason.HW_SLOWDOWN).value


def _name(reason: ThrottleReason) -> str:
    return str(reason.name).lower()


@dataclass
class _Episode:
    """A throttle episode's figures while it is open."""

    min_sm_mhz: float | None = None
    max_power_w: float | None = None
    max_temp_c: float | None = None

    def add(self, s: GpuSample) -> None:
        if s.sm_mhz is not None:
            self.min_sm_mhz = s.sm_mhz if self.min_sm_mhz is None else min(self.min_sm_mhz, s.sm_mhz)
        if s.power_w is not None:
            self.max_power_w = s.power_w if self.max_power_w is None else max(self.max_power_w, s.power_w)
        if s.temp_c is not None:
            self.max_temp_c = s.temp_c if self.max_temp_c is None else max(self.max_temp_c, s.temp_c)


class ThrottleDetector:
    """One episode per reason: opened by the first sample that reports it (the GPU itself
    says it throttled), ended once it has been clear for `throttle_release_s`."""

    def __init__(self, config: DetectorConfig, gpu_index: int) -> None:
        self.gpu = gpu_index
        self.machines = {r: Hysteresis(1.0, 1.0, 0.0, config.throttle_release_s)
                         for r in THROTTLE_REASONS}
        self.episodes: dict[ThrottleReason, _Episode] = {}
        self.active_bits = 0  # reasons inside an episode now

    def feed(self, s: GpuSample) -> list[EventDraft]:
        bits = s.throttle_reasons
        if bits is None:
            return []
        out: list[EventDraft] = []
        for reason, machine in self.machines.items():
            on = bits & reason.value
            if not on and machine.state == CLEAR:
                continue
            transition = machine.update(s.t_monotonic_s, 1.0 if on else 0.0)
            if on and machine.active:
                self.episodes.setdefault(reason, _Episode()).add(s)
            if transition is OPENED:
                self.active_bits |= reason.value
                out.append(self._started(reason, s, machine.onset_s))
            elif transition is CLOSED:
                self.active_bits &= ~reason.value
                out.append(self._ended(reason, s, machine.onset_s, machine.since_s))
        return out

    def _subject(self, reason: ThrottleReason) -> dict:
        return {"gpu": self.gpu, "reason": _name(reason)}

    def _started(self, reason: ThrottleReason, s: GpuSample, onset_s: float) -> EventDraft:
        severity = Severity.WARNING if reason is ThrottleReason.SW_POWER_CAP else Severity.CRITICAL
        return opened(EventKind.THROTTLE_STARTED, s.t_monotonic_s, s.t_wall_s,
                      self._subject(reason),
                      {"reason": _name(reason), "reason_bit": reason.value, "since_s": onset_s,
                       "sm_mhz": s.sm_mhz, "power_w": s.power_w, "temp_c": s.temp_c},
                      (gpu_ref(self.gpu, s.t_monotonic_s),), severity)

    def _ended(self, reason: ThrottleReason, s: GpuSample, onset_s: float,
               ended_s: float) -> EventDraft:
        ep = self.episodes.pop(reason, _Episode())
        subject = self._subject(reason)
        return EventDraft(
            EventKind.THROTTLE_ENDED, s.t_monotonic_s, s.t_wall_s, subject,
            {"reason": _name(reason), "reason_bit": reason.value, "started_s": onset_s,
             "ended_s": ended_s, "duration_s": ended_s - onset_s, "min_sm_mhz": ep.min_sm_mhz,
             "max_power_w": ep.max_power_w, "max_temp_c": ep.max_temp_c},
            (gpu_ref(self.gpu, s.t_monotonic_s),),
            closes=episode_key(EventKind.THROTTLE_STARTED, subject))


class PowerCapSustainedDetector:
    """The SW power cap's episode (as above) once it has lasted `power_cap_sustain_s`."""

    def __init__(self, config: DetectorConfig, gpu_index: int) -> None:
        self.gpu = gpu_index
        self.machine = Hysteresis(1.0, 1.0, config.power_cap_sustain_s, config.throttle_release_s)
        self.min_sm_mhz: float | None = None

    def feed(self, s: GpuSample) -> list[EventDraft]:
        if s.throttle_reasons is None:
            return []
        on = s.throttle_reasons & ThrottleReason.SW_POWER_CAP.value
        if not on and self.machine.state == CLEAR:
            return []
        transition = self.machine.update(s.t_monotonic_s, 1.0 if on else 0.0)
        if on and self.machine.active and s.sm_mhz is not None:
            self.min_sm_mhz = s.sm_mhz if self.min_sm_mhz is None else min(self.min_sm_mhz, s.sm_mhz)
        subject = {"gpu": self.gpu}
        if transition is OPENED:
            return [opened(EventKind.POWER_CAP_SUSTAINED, s.t_monotonic_s, s.t_wall_s, subject,
                           {"since_s": self.machine.onset_s,
                            "held_s": s.t_monotonic_s - self.machine.onset_s,
                            "sm_mhz": s.sm_mhz, "sm_clock_ratio": s.sm_clock_ratio},
                           (gpu_ref(self.gpu, s.t_monotonic_s),))]
        if transition is CLOSED:
            summary = {"min_sm_mhz": self.min_sm_mhz}
            self.min_sm_mhz = None
            return [cleared(EventKind.POWER_CAP_SUSTAINED, s.t_monotonic_s, s.t_wall_s, subject,
                            self.machine.onset_s, self.machine.since_s, summary)]
        return []


class LevelDetector:
    """A level crossing a threshold with hysteresis, for one subject: `value(sample)` is the
    signal, `payload(sample, value, onset_s)` the opening event's payload. The closing event
    carries the peak (or, falling, the lowest) value of the episode."""

    def __init__(self, kind: EventKind, subject: dict, machine: Hysteresis, value, payload,
                 ref) -> None:
        self.kind, self.subject, self.machine = kind, subject, machine
        self.value, self.payload, self.ref = value, payload, ref
        self.extreme: float | None = None

    def feed(self, t_s: float, t_wall_s: float, record) -> list[EventDraft]:
        v = self.value(record)
        if v is None:
            return []
        m = self.machine
        if m.state == CLEAR and ((v < m.on) if m.rising else (v > m.on)):
            return []  # quiet, and nothing open: the common case, kept cheap
        transition = m.update(t_s, v)
        if self.machine.active:
            better = max if self.machine.rising else min
            self.extreme = v if self.extreme is None else better(self.extreme, v)
        if transition is OPENED:
            return [opened(self.kind, t_s, t_wall_s, self.subject,
                           self.payload(record, v, self.machine.onset_s), (self.ref(record),))]
        if transition is CLOSED:
            summary = {"peak" if self.machine.rising else "lowest": self.extreme}
            self.extreme = None
            return [cleared(self.kind, t_s, t_wall_s, self.subject, self.machine.onset_s,
                            self.machine.since_s, summary, (self.ref(record),))]
        return []


def power_budget_detector(config: DetectorConfig, gpu: int, budget: float) -> LevelDetector:
    return LevelDetector(
        EventKind.POWER_BUDGET_EXCEEDED, {"gpu": gpu},
        Hysteresis(budget, budget * (1 - config.power_budget_band), config.power_budget_rise_s,
                   config.power_budget_release_s),
        lambda s: s.power_w,
        lambda s, v, onset: {"power_w": v, "budget_w": budget, "since_s": onset},
        lambda s: gpu_ref(gpu, s.t_monotonic_s))


def margin_detector(config: DetectorConfig, gpu: int, hbm: bool, basis: str,
                    temp_of, ref) -> LevelDetector:
    """Margin = limit - temperature; low at or below margin_low_c, fine again at margin_ok_c.
    `temp_of(record)` reads the temperature (measured, or a forecast peak)."""
    limit = config.hbm_limit_c if hbm else config.die_limit_c
    kind = EventKind.HBM_MARGIN_LOW if hbm else EventKind.THERMAL_MARGIN_LOW
    rise_s = config.margin_rise_s if basis == "measured" else 0.0

    def margin(record) -> float | None:
        t = temp_of(record)
        return None if t is None else limit - t

    return LevelDetector(
        kind, {"gpu": gpu, "basis": basis},
        Hysteresis(config.margin_low_c, config.margin_ok_c, rise_s, config.margin_release_s,
                   rising=False),
        margin,
        lambda r, v, onset: {"temp_c": limit - v, "limit_c": limit, "margin_c": v,
                             "threshold_c": config.margin_low_c, "since_s": onset},
        ref)


class SensorDetector:
    """Stale: a reading the source refreshes on its own (power, energy) unchanged for
    `stale_after_s`. Failed: reads of a field fail; one failure opens. Both end after
    `sensor_release_s` of good readings."""

    def __init__(self, config: DetectorConfig, gpu_index: int) -> None:
        self.config = config
        self.gpu = gpu_index
        self.last_t: float | None = None
        self.stale_since: dict[str, float] = {}  # field -> its last fresh reading's time
        self.stale = {f: Hysteresis(config.stale_after_s, config.stale_after_s, 0.0,
                                    config.sensor_release_s) for f in REFRESHED_COLUMNS}
        self.failed: dict[str, Hysteresis] = {}
        self.quiet = True  # nothing stale, nothing failed, no episode open

    def feed(self, s: GpuSample) -> list[EventDraft]:
        t, last_t = s.t_monotonic_s, self.last_t
        self.last_t = t
        if self.quiet and not s.stale and not s.failed:
            return []
        out: list[EventDraft] = []
        for f, machine in self.stale.items():
            if getattr(s, f) is None:
                continue
            if f in s.stale:
                since = self.stale_since.setdefault(f, t if last_t is None else last_t)
                age_s = t - since
            else:
                since = self.stale_since.pop(f, t)
                age_s = 0.0
            if age_s == 0.0 and machine.state == CLEAR:
                continue
            out += self._transition(EventKind.SENSOR_STALE, f, machine, s,
                                    machine.update(t, age_s), since)
        for f in s.failed:
            if f not in self.failed:
                self.failed[f] = Hysteresis(1.0, 1.0, 0.0, self.config.sensor_release_s)
        for f, machine in self.failed.items():
            transition = machine.update(t, 1.0 if f in s.failed else 0.0)
            out += self._transition(EventKind.SENSOR_FAILED, f, machine, s, transition,
                                    machine.onset_s)
        self.quiet = (not self.stale_since
                      and all(m.state == CLEAR for m in self.stale.values())
                      and all(m.state == CLEAR for m in self.failed.values()))
        return out

    def _transition(self, kind: EventKind, f: str, machine: Hysteresis, s: GpuSample,
                    transition: Transition | None, since_s: float) -> list[EventDraft]:
        subject = {"gpu": self.gpu, "field": f}
        ref = (gpu_ref(self.gpu, s.t_monotonic_s),)
        if transition is OPENED:
            return [opened(kind, s.t_monotonic_s, s.t_wall_s, subject,
                           {"field": f, "since_s": since_s}, ref)]
        if transition is CLOSED:
            return [cleared(kind, s.t_monotonic_s, s.t_wall_s, subject, since_s,
                            machine.since_s, {}, ref)]
        return []


class GapDetector:
    """A gap between two samples of a GPU longer than max(gap_periods * period, gap_min_s):
    one event, with the samples it is missing; further gaps within `gap_merge_s` of the last
    event are counted into the next one."""

    def __init__(self, config: DetectorConfig, gpu_index: int) -> None:
        self.config = config
        self.gpu = gpu_index
        self.last_t: float | None = None
        self.last_event_t = float("-inf")
        self.suppressed = 0
        self.suppressed_missing = 0

    def feed(self, s: GpuSample) -> list[EventDraft]:
        t, last = s.t_monotonic_s, self.last_t
        self.last_t = t
        if last is None:
            return []
        gap_s = t - last
        period_s = s.period_s if s.period_s > 0 else self.config.gap_min_s
        if gap_s <= max(self.config.gap_periods * period_s, self.config.gap_min_s):
            return []
        missing = max(int(round(gap_s / period_s)) - 1, 1)
        if t - self.last_event_t < self.config.gap_merge_s:
            self.suppressed += 1
            self.suppressed_missing += missing
            return []
        payload = {"stage": "samples", "gpu": self.gpu, "gap_s": gap_s, "period_s": period_s,
                   "dropped": missing + self.suppressed_missing, "suppressed": self.suppressed}
        self.last_event_t, self.suppressed, self.suppressed_missing = t, 0, 0
        return [EventDraft(EventKind.TELEMETRY_GAP, t, s.t_wall_s,
                           {"stage": "samples", "gpu": self.gpu}, payload,
                           (gpu_ref(self.gpu, last), gpu_ref(self.gpu, t)))]


class GpuDetectors:
    """Every detector of one GPU, in a fixed order."""

    def __init__(self, config: DetectorConfig, gpu_index: int) -> None:
        self.throttle = ThrottleDetector(config, gpu_index)
        self.power_cap = PowerCapSustainedDetector(config, gpu_index)
        self.sensors = SensorDetector(config, gpu_index)
        self.gap = GapDetector(config, gpu_index)
        ref = lambda s: gpu_ref(gpu_index, s.t_monotonic_s)  # noqa: E731
        self.levels = [
            margin_detector(config, gpu_index, False, "measured", lambda s: s.temp_c, ref),
            margin_detector(config, gpu_index, True, "measured", lambda s: s.mem_temp_c, ref),
        ]
        if config.power_budget_w is not None:
            self.levels.append(power_budget_detector(config, gpu_index, config.power_budget_w))

    def feed(self, s: GpuSample) -> list[EventDraft]:
        out = self.gap.feed(s)
        out += self.throttle.feed(s)
        out += self.power_cap.feed(s)
        for level in self.levels:
            out += level.feed(s.t_monotonic_s, s.t_wall_s, s)
        out += self.sensors.feed(s)
        return out
