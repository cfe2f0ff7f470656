"""What a policy sees at each tick (`GovernorInputs`), gathered from the hub's samples by an
`InputTracker`: the GPU's latest readings, its energy counter over the last second and a
half, the twin's latest snapshot, the engine's load and queue, and the time per output
token of late."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.live import ActivityMap, EngineLoad, EngineLoadTracker, TwinSnapshot

POWER_HISTORY_S = 1.5
POWER_WINDOW_S = 1.0  # NVML's power average: ten 100 ms means
POWER_REFRESH_S = 0.1
TPOT_WINDOW_S = 5.0
LOAD_TAU_S = 0.3  # the engine load (the power bound acts on it within a period)


@dataclass(frozen=True)
class GovernorInputs:
    t_monotonic_s: float
    t_wall_s: float
    die_sensor_c: float | None  # latest readings
    hbm_sensor_c: float | None
    power_w: float | None  # NVML's 1 s average
    power_instant_w: float | None
    sm_mhz: float | None
    throttle_reasons: int
    energy_history: tuple[tuple[float, float], ...]  # (t_monotonic_s, energy_j) at refreshes
    engine: EngineLoad
    twin: TwinSnapshot | None
    tpot_p99_s: float | None  # p99 of the intervals between decoding steps, last TPOT_WINDOW_S
    gpu_index: int = 0  # the GPU these readings are of (the binding one, binding.py)
    binding: str = ""  # the constraint that made it bind; "" with one GPU and no choice
    # How old the newest GPU reading is at this tick (now - its read time): the poller's lag
    # as the policy suffers it; None before the first.
    gpu_sample_age_s: float | None = None
    # The engine's busy share over the window NVML's 1 s average covers (a boxcar ending at
    # the newest reading, less half a refresh), and that window's end: what the power
    # model's calibration regresses the reading on.
    busy_share_power_window: float | None = None
    power_window_end_s: float | None = None

    @property
    def engine_sample_age_s(self) -> float | None:
        """How long ago the newest engine step the policy knows of ended."""
        end = self.engine.last_step_end_s
        return None if end is None else max(0.0, self.t_monotonic_s - end)

    def as_dict(self) -> dict:
        """The record of what the policy saw (a decision's `inputs`)."""
        e, tw = self.engine, self.twin
        d = {
            "die_sensor_c": self.die_sensor_c, "hbm_sensor_c": self.hbm_sensor_c,
            "power_w": _round(self.power_w), "power_instant_w": _round(self.power_instant_w),
            "sm_mhz": self.sm_mhz, "throttle_reasons": self.throttle_reasons,
            "engine_busy_fraction": _round(e.busy_fraction, 3),
            "engine_compute_activity": _round(e.compute_activity, 4),
            "engine_memory_activity": _round(e.memory_activity, 4),
            "num_waiting": e.num_waiting, "num_waiting_tokens": e.num_waiting_tokens,
            "num_running": e.num_running, "tpot_p99_s": _round(self.tpot_p99_s, 4),
            "gpu_sample_age_s": _round(self.gpu_sample_age_s, 3),
            "engine_sample_age_s": _round(self.engine_sample_age_s, 3),
        }
        if self.binding:
            d.update({"binding_gpu": self.gpu_index, "binding_constraint": self.binding})
        if tw is not None:
            d.update({"twin_die_c": _round(tw.die_c, 2), "twin_hbm_c": _round(tw.hbm_c, 2),
                      "twin_ambient_c": _round(tw.ambient_c, 2),
                      "twin_die_std_c": _round(tw.die_std_c, 3),
                      "twin_time_to_throttle_s": tw.time_to_throttle_s})
        return d


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


class InputTracker:
    """Fold hub samples into `GovernorInputs`; one GPU (the engine's)."""

    def __init__(self, gpu_index: int = 0, activity_map: ActivityMap | None = None) -> None:
        """`activity_map`: the twin params' engine load map (the policies' power model is in
        the plant's units)."""
        self.gpu_index = gpu_index
        self.engine = EngineLoadTracker(tau_s=LOAD_TAU_S, activity_map=activity_map)
        self.gpu: GpuSample | None = None
        self.twin: TwinSnapshot | None = None
        self._energy: deque[tuple[float, float]] = deque()
        self._intervals: deque[tuple[float, float]] = deque()  # (end time, interval)
        self._last_end: float | None = None
        self.busy = BusySpans()

    def on_gpu_sample(self, s: GpuSample) -> None:
        if s.gpu_index != self.gpu_index:
            return
        self.gpu = s
        # The counter refreshes every ~100 ms: keep the readings where it moved.
        if s.energy_j is not None and (not self._energy or s.energy_j != self._energy[-1][1]):
            self._energy.append((s.t_monotonic_s, float(s.energy_j)))
            while len(self._energy) > 2 and self._energy[1][0] < s.t_monotonic_s - POWER_HISTORY_S:
                self._energy.popleft()

    def on_engine_sample(self, s: EngineSample) -> None:
        self.engine.add(s)
        self.busy.add(s.start_monotonic_s, s.end_monotonic_s)
        if s.num_decode_tokens > 0 and self._last_end is not None:
            self._intervals.append((s.end_monotonic_s, s.end_monotonic_s - self._last_end))
        self._last_end = s.end_monotonic_s if self._last_end is None else max(
            self._last_end, s.end_monotonic_s)
        while self._intervals and self._intervals[0][0] < s.end_monotonic_s - TPOT_WINDOW_S:
            self._intervals.popleft()

    def on_twin_snapshot(self, s: TwinSnapshot) -> None:
        if s.gpu_index == self.gpu_index:
            self.twin = s

    def on_sample(self, s) -> None:
        if isinstance(s, GpuSample):
            self.on_gpu_sample(s)
        elif isinstance(s, EngineSample):
            self.on_engine_sample(s)
        elif isinstance(s, TwinSnapshot):
            self.on_twin_snapshot(s)

    def inputs(self, now_s: float, t_wall_s: float) -> GovernorInputs:
        g = self.gpu
        window_end = share = None
        if g is not None:
            window_end = g.t_monotonic_s - POWER_REFRESH_S / 2
            share = self.busy.share(window_end - POWER_WINDOW_S, window_end)
        tpot = None
        if len(self._intervals) >= 10:
            tpot = p99(np.fromiter((i for _, i in self._intervals), float, len(self._intervals)))
        return GovernorInputs(
            t_monotonic_s=now_s, t_wall_s=t_wall_s,
            die_sensor_c=None if g is None else g.temp_c,
            hbm_sensor_c=None if g is None else g.mem_temp_c,
            power_w=None if g is None else g.power_w,
            power_instant_w=None if g is None else g.power_instant_w,
            sm_mhz=None if g is None else g.sm_mhz,
            throttle_reasons=0 if g is None or g.throttle_reasons is None else g.throttle_reasons,
            energy_history=tuple(self._energy), engine=self.engine.load(now_s), twin=self.twin,
            tpot_p99_s=tpot, gpu_index=self.gpu_index,
            gpu_sample_age_s=None if g is None else max(0.0, now_s - g.t_monotonic_s),
            busy_share_power_window=share, power_window_end_s=window_end,
        )


class BusySpans:
    """The engine's steps as disjoint spans of wall time, kept for POWER_HISTORY_S: its busy
    share over any recent window, exactly (with scheduling ahead a step's span overlaps the
    previous one's; only what it adds counts)."""

    def __init__(self) -> None:
        self._spans: deque[tuple[float, float]] = deque()
        self._last_end: float | None = None

    def add(self, start_s: float, end_s: float) -> None:
        if self._last_end is not None:
            start_s = max(start_s, self._last_end)
            self._last_end = max(self._last_end, end_s)
        else:
            self._last_end = end_s
        if end_s > start_s:
            self._spans.append((start_s, end_s))
        while self._spans and self._spans[0][1] < self._last_end - POWER_HISTORY_S:
            self._spans.popleft()

    def share(self, start_s: float, end_s: float) -> float:
        """The share of [start_s, end_s] covered by steps."""
        if end_s <= start_s:
            return 0.0
        covered = 0.0
        for s, e in reversed(self._spans):
            if e <= start_s:
                break
            covered += max(0.0, min(e, end_s) - max(s, start_s))
        return covered / (end_s - start_s)


def p99(x: np.ndarray) -> float:
    """np.percentile(x, 99) (linear interpolation) by a partial sort: a tenth of the time."""
    pos = 0.99 * (len(x) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(x) - 1)
    part = np.partition(x, (lo, hi))
    return float(part[lo] + (pos - lo) * (part[hi] - part[lo]))
