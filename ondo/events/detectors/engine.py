"""Detectors over the engine's steps: preemption bursts, swap storms, KV-cache pressure and a
waiting-queue backlog.

Steps arrive only while the engine works; `tick(t)` (any record's time, or the live runner's
clock) lets time pass without one. Preemptions and swaps are counts, so a step-less stretch
is a stretch without them; levels (KV usage, waiting requests) hold the last step's value
until the engine has been idle for `IDLE_S`, then read as zero (an idle engine holds no
request and no block).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from ondo.events.config import DetectorConfig
from ondo.events.detectors.common import cleared, opened, step_ref
from ondo.events.detectors.gpu import LevelDetector
from ondo.events.hysteresis import CLEAR, CLOSED, OPENED, Hysteresis
from ondo.events.schema import EventDraft, EventKind
from ondo.telemetry.schema import EngineSample

IDLE_S = 2.0
ENGINE = {"engine": 0}


class PreemptionDetector:
    """A burst of preemptions: opened by the first step that preempts, closed after
    `preemption_release_s` without one. The mode is read off the swap pool: a step whose
    preemptions grew it swapped, otherwise it recomputes."""

    def __init__(self, config: DetectorConfig) -> None:
        self.machine = Hysteresis(1.0, 1.0, 0.0, config.preemption_release_s)
        self.swapped_blocks: int | None = None
        self.totals: dict[str, int] = {}
        self.last_ref = ""

    def feed(self, s: EngineSample) -> list[EventDraft]:
        delta = 0 if self.swapped_blocks is None else s.num_swapped_blocks - self.swapped_blocks
        self.swapped_blocks = s.num_swapped_blocks
        n = s.num_preemptions
        if not n and self.machine.state == CLEAR:
            return []
        transition = self.machine.update(s.end_monotonic_s, 1.0 if n else 0.0)
        mode = "swap" if delta > 0 else "recompute"
        if n and self.machine.active:
            for key, value in (("preemptions", n), (f"{mode}_steps", 1),
                               ("swapped_blocks_out", max(delta, 0))):
                self.totals[key] = self.totals.get(key, 0) + value
            self.last_ref = step_ref(s.step_index)
        if transition is OPENED:
            return [opened(EventKind.PREEMPTION, s.end_monotonic_s, s.t_wall_s, ENGINE,
                           {"preemptions": n, "mode": mode, "swapped_blocks_delta": delta,
                            "step_index": s.step_index, "num_waiting": s.num_waiting,
                            "num_running": s.num_running, "since_s": self.machine.onset_s},
                           (step_ref(s.step_index),))]
        if transition is CLOSED:
            return [self._cleared(s.end_monotonic_s, s.t_wall_s)]
        return []

    def tick(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        if self.machine.state == CLEAR:
            return []
        if self.machine.update(t_s, 0.0) is CLOSED:
            return [self._cleared(t_s, t_wall_s)]
        return []

    def _cleared(self, t_s: float, t_wall_s: float) -> EventDraft:
        summary, self.totals = self.totals, {}
        return cleared(EventKind.PREEMPTION, t_s, t_wall_s, ENGINE, self.machine.onset_s,
                       self.machine.since_s, summary, (self.last_ref,) if self.last_ref else ())


class SwapStormDetector:
    """Blocks moved over the host link (the swap pool's changes, both ways) within
    `swap_window_s`, as a share of the KV cache: a storm at `swap_storm_fraction`, over
    when below half of it for `swap_release_s`."""

    def __init__(self, config: DetectorConfig) -> None:
        self.window_s = config.swap_window_s
        on = config.swap_storm_fraction
        self.machine = Hysteresis(on, on / 2, 0.0, config.swap_release_s)
        self.moves: deque[tuple[float, int]] = deque()
        self.moved = 0
        self.swapped_blocks: int | None = None
        self.total_blocks = 0
        self.peak = 0.0

    def _fraction(self, t_s: float) -> float:
        while self.moves and self.moves[0][0] <= t_s - self.window_s:
            self.moved -= self.moves.popleft()[1]
        return self.moved / self.total_blocks if self.total_blocks else 0.0

    def feed(self, s: EngineSample) -> list[EventDraft]:
        self.total_blocks = s.num_kv_blocks_total
        if self.swapped_blocks is not None and s.num_swapped_blocks != self.swapped_blocks:
            moved = abs(s.num_swapped_blocks - self.swapped_blocks)
            self.moves.append((s.end_monotonic_s, moved))
            self.moved += moved
        self.swapped_blocks = s.num_swapped_blocks
        if not self.moves and self.machine.state == CLEAR:
            return []
        return self._update(s.end_monotonic_s, s.t_wall_s, step_ref(s.step_index))

    def tick(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        if not self.moves and self.machine.state == CLEAR:
            return []
        return self._update(t_s, t_wall_s, None)

    def _update(self, t_s: float, t_wall_s: float, ref: str | None) -> list[EventDraft]:
        fraction = self._fraction(t_s)
        transition = self.machine.update(t_s, fraction)
        if self.machine.active:
            self.peak = max(self.peak, fraction)
        evidence = (ref,) if ref else ()
        if transition is OPENED:
            return [opened(EventKind.SWAP_STORM, t_s, t_wall_s, ENGINE,
                           {"window_s": self.window_s, "swapped_blocks_moved": self.moved,
                            "kv_blocks_total": self.total_blocks, "fraction": fraction,
                            "since_s": self.machine.onset_s}, evidence)]
        if transition is CLOSED:
            peak, self.peak = self.peak, 0.0
            return [cleared(EventKind.SWAP_STORM, t_s, t_wall_s, ENGINE, self.machine.onset_s,
                            self.machine.since_s, {"peak_fraction": peak}, evidence)]
        return []


def _level(config_on: float, config_off: float, rise_s: float, fall_s: float, kind: EventKind,
           value, payload) -> LevelDetector:
    return LevelDetector(kind, ENGINE, Hysteresis(config_on, config_off, rise_s, fall_s),
                         value, payload, lambda s: step_ref(s.step_index))


class EngineDetectors:
    def __init__(self, config: DetectorConfig) -> None:
        self.preemption = PreemptionDetector(config)
        self.swap = SwapStormDetector(config)
        self.kv = _level(
            config.kv_pressure_on, config.kv_pressure_off, config.kv_pressure_rise_s,
            config.kv_pressure_release_s, EventKind.KV_CACHE_PRESSURE,
            lambda s: s.num_kv_blocks_used / s.num_kv_blocks_total if s.num_kv_blocks_total else None,
            lambda s, v, onset: {"kv_blocks_used": s.num_kv_blocks_used,
                                 "kv_blocks_total": s.num_kv_blocks_total, "usage": v,
                                 "threshold": config.kv_pressure_on, "since_s": onset})
        backlog = config.backlog_waiting
        self.backlog = _level(
            backlog, backlog / 2, config.backlog_rise_s, config.backlog_release_s,
            EventKind.QUEUE_BACKLOG, lambda s: s.num_waiting,
            lambda s, v, onset: {"num_waiting": s.num_waiting, "num_running": s.num_running,
                                 "threshold": backlog, "since_s": onset})
        self.last: EngineSample | None = None
        self._idle: tuple[EngineSample, EngineSample] | None = None  # (last step, idle view)

    def feed(self, s: EngineSample) -> list[EventDraft]:
        self.last = s
        out = self.preemption.feed(s)
        out += self.swap.feed(s)
        out += self.kv.feed(s.end_monotonic_s, s.t_wall_s, s)
        out += self.backlog.feed(s.end_monotonic_s, s.t_wall_s, s)
        return out

    def tick(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        out = self.preemption.tick(t_s, t_wall_s)
        out += self.swap.tick(t_s, t_wall_s)
        last = self.last
        if last is not None and t_s - last.end_monotonic_s >= IDLE_S:
            levels = [lv for lv in (self.kv, self.backlog) if lv.machine.state != CLEAR]
            if levels:
                if self._idle is None or self._idle[0] is not last:
                    self._idle = (last, _idle(last))
                for level in levels:
                    out += level.feed(t_s, t_wall_s, self._idle[1])
        return out


def _idle(last: EngineSample) -> EngineSample:
    """What an idle engine holds: no blocks in use, no request waiting or running."""
    return replace(last, num_kv_blocks_used=0, num_waiting=0, num_running=0)
