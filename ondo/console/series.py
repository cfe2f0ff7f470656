"""The overview's series: everything the hub carries, folded into one point per second.

A `SeriesBuilder` subscribes to the hub (a bounded queue: publishing never waits) and, on a
thread of its own, folds GPU samples, engine steps, finished requests, twin snapshots and
governor decisions into `ConsolePoint`s, one per second of wall time (a second is closed
`LATE_S` after it ends, so records that arrive late still count). It keeps the last hour in
memory for the live overview and the outcome of actions, and hands each point to the
telemetry store (`POINTS_TABLE`, `console_points_1s`), so that the twin, the engine and the
governor can be shown over a day from the database (the GPU's own columns are the store's
`gpu_samples` and `gpu_samples_1s`, read from there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ondo.control.decision import GovernorDecision
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import EngineSample, GpuSample, RequestSample
from ondo.telemetry.store import RecordTable
from ondo.twin.live import TwinSnapshot

log = logging.getLogger(__name__)

LATE_S = 1.5
KEEP_S = 3600


@dataclass(frozen=True)
class ConsolePoint:
    """One second (`t_wall_s` is its start). None where nothing of that kind arrived."""

    t_wall_s: int
    # GPU (the mean or extreme over the second's samples); in memory only, see the module doc
    gpu_samples: int = 0
    temp_c: float | None = None
    temp_max_c: float | None = None
    mem_temp_c: float | None = None
    power_w: float | None = None  # NVML's 1 s average, mean over the second
    power_max_w: float | None = None
    sm_mhz: float | None = None
    sm_min_mhz: float | None = None
    throttle_reasons: int | None = None  # bitwise OR over the second
    # The twin's latest snapshot in the second: the die sensor it estimates, the peak it
    # forecasts within its horizon, and the state a what-if starts from.
    twin_die_c: float | None = None
    twin_peak_c: float | None = None
    twin_horizon_s: float | None = None
    twin_time_to_throttle_s: float | None = None
    twin_state: dict[str, float] | None = None
    # The engine: tokens out, steps, and the largest KV use and queues in the second.
    output_tokens: int = 0
    steps: int = 0
    kv_usage: float | None = None
    num_waiting: int | None = None
    num_running: int | None = None
    preemptions: int = 0
    # Requests finished in the second.
    requests: int = 0
    ttft_n: int = 0
    ttft_sum_s: float = 0.0
    ttft_max_s: float | None = None
    tpot_n: int = 0
    tpot_sum_s: float = 0.0
    tpot_max_s: float | None = None
    # The governor in force at the end of the second.
    policy: str | None = None
    duty_cycle: float | None = None
    power_budget_w: float | None = None
    temp_target_c: float | None = None


TWIN_STATE_FIELDS = ("die_c", "hbm_c", "sink_c", "board_c", "die_sensor_c", "hbm_sensor_c",
                     "ambient_c", "power_w", "power_instant_w", "sm_mhz", "compute_activity",
                     "memory_activity", "throttle_reasons")
STORED_COLUMNS: tuple[str, ...] = (
    "t_wall_s", "twin_die_c", "twin_peak_c", "twin_horizon_s", "twin_time_to_throttle_s",
    *(f"state_{f}" for f in TWIN_STATE_FIELDS),
    "output_tokens", "steps", "kv_usage", "num_waiting", "num_running", "preemptions",
    "requests", "ttft_n", "ttft_sum_s", "ttft_max_s", "tpot_n", "tpot_sum_s", "tpot_max_s", "policy",
    "duty_cycle", "power_budget_w", "temp_target_c")
_DDL = f"""
CREATE TABLE IF NOT EXISTS console_points_1s ({", ".join(STORED_COLUMNS)});
CREATE INDEX IF NOT EXISTS console_points_1s_t ON console_points_1s (t_wall_s);
"""


def _stored_row(p: ConsolePoint) -> tuple[Any, ...]:
    state = p.twin_state or {}
    row: list[Any] = []
    for c in STORED_COLUMNS:
        if c.startswith("state_"):
            row.append(state.get(c[6:]))
        else:
            row.append(getattr(p, c))
    return tuple(row)


POINTS_TABLE = RecordTable(
    ConsolePoint, _DDL,
    f"INSERT INTO console_points_1s VALUES ({', '.join('?' * len(STORED_COLUMNS))})",
    _stored_row)


def twin_state_from_row(row: dict[str, Any]) -> dict[str, float] | None:
    """The what-if's starting state from a stored row (None where the twin was not running)."""
    state = {f: row.get(f"state_{f}") for f in TWIN_STATE_FIELDS}
    if any(v is None for v in state.values()):
        return None
    return {k: float(v) for k, v in state.items()}  # type: ignore[arg-type]


class _Bucket:
    def __init__(self, t: int) -> None:
        self.t = t
        self.temps: list[float] = []
        self.mem_temps: list[float] = []
        self.powers: list[float] = []
        self.sms: list[float] = []
        self.gpu = 0
        self.bits: int | None = None
        self.twin: TwinSnapshot | None = None
        self.tokens = self.steps = self.preemptions = 0
        self.kv: float | None = None
        self.waiting: int | None = None
        self.running: int | None = None
        self.requests = self.ttft_n = self.tpot_n = 0
        self.ttft_sum = self.tpot_sum = 0.0
        self.ttft_max: float | None = None
        self.tpot_max: float | None = None

    def add(self, r: Any) -> None:
        if isinstance(r, GpuSample):
            self.gpu += 1
            for values, v in ((self.temps, r.temp_c), (self.mem_temps, r.mem_temp_c),
                              (self.powers, r.power_w), (self.sms, r.sm_mhz)):
                if v is not None and math.isfinite(v):
                    values.append(float(v))
            if r.throttle_reasons is not None:
                self.bits = (self.bits or 0) | int(r.throttle_reasons)
        elif isinstance(r, EngineSample):
            self.steps += 1
            self.tokens += r.num_output_tokens
            self.preemptions += r.num_preemptions
            kv = r.num_kv_blocks_used / max(1, r.num_kv_blocks_total)
            self.kv = kv if self.kv is None else max(self.kv, kv)
            self.waiting = max(self.waiting or 0, r.num_waiting)
            self.running = max(self.running or 0, r.num_running)
        elif isinstance(r, RequestSample):
            self.requests += 1
            if r.ttft_s is not None:
                self.ttft_n += 1
                self.ttft_sum += r.ttft_s
                self.ttft_max = max(self.ttft_max or 0.0, r.ttft_s)
            if r.tpot_s is not None:
                self.tpot_n += 1
                self.tpot_sum += r.tpot_s
                self.tpot_max = max(self.tpot_max or 0.0, r.tpot_s)
        elif isinstance(r, TwinSnapshot):
            self.twin = r

    def point(self, governor: dict[str, Any]) -> ConsolePoint:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        tw = self.twin
        state = None
        if tw is not None:
            state = {f: float(getattr(tw, f)) for f in TWIN_STATE_FIELDS}
            if not all(math.isfinite(v) for v in state.values()):
                state = None
        return ConsolePoint(
            self.t, self.gpu, mean(self.temps), max(self.temps, default=None),
            max(self.mem_temps, default=None), mean(self.powers),
            max(self.powers, default=None), mean(self.sms), min(self.sms, default=None),
            self.bits,
            None if tw is None else float(tw.die_sensor_c),
            None if tw is None else float(tw.die_peak_c),
            None if tw is None else float(tw.forecast_horizon_s),
            None if tw is None else tw.time_to_throttle_s, state,
            self.tokens, self.steps, self.kv, self.waiting, self.running, self.preemptions,
            self.requests, self.ttft_n, self.ttft_sum, self.ttft_max, self.tpot_n, self.tpot_sum,
            self.tpot_max, governor.get("policy"), governor.get("duty_cycle"),
            governor.get("power_budget_w"), governor.get("temp_target_c"))


def governor_state(decision: GovernorDecision | None, governor: Any = None) -> dict[str, Any]:
    """Policy, duty cycle and objectives from a decision (or a live governor)."""
    if decision is not None:
        return {"policy": decision.policy, "duty_cycle": decision.limits.get("duty_cycle"),
                "power_budget_w": decision.objectives.get("power_budget_w"),
                "temp_target_c": decision.objectives.get("temp_target_c")}
    if governor is not None:
        return {"policy": governor.policy_name, "duty_cycle": governor.limits.duty_cycle,
                "power_budget_w": governor.objectives.power_budget_w,
                "temp_target_c": governor.objectives.temp_target_c}
    return {}


class SeriesBuilder:
    def __init__(self, hub: TelemetryHub, store: Any = None, governor: Any = None,
                 keep_s: int = KEEP_S, gpu_index: int = 0, queue_size: int = 65_536) -> None:
        self.store = store  # a TelemetryStore with POINTS_TABLE registered, or None
        self.gpu_index = gpu_index
        self._governor = governor_state(None, governor)
        self._open: dict[int, _Bucket] = {}
        self._points: deque[ConsolePoint] = deque(maxlen=keep_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sub = hub.subscribe(maxsize=queue_size, kinds=(
            GpuSample, EngineSample, RequestSample, TwinSnapshot, GovernorDecision))
        self._thread = threading.Thread(target=self._run, name="ondo-console-series",
                                        daemon=True)
        self._thread.start()

    def points(self, after_t: float | None = None, since_t: float | None = None
               ) -> list[ConsolePoint]:
        """Closed points, oldest first: those after `after_t` (exclusive) or since `since_t`."""
        with self._lock:
            pts = list(self._points)
        if after_t is not None:
            pts = [p for p in pts if p.t_wall_s > after_t]
        if since_t is not None:
            pts = [p for p in pts if p.t_wall_s >= since_t]
        return pts

    @property
    def dropped(self) -> int:
        return self._sub.queue.dropped if self._sub.queue is not None else 0

    def fold(self, records: list[Any]) -> None:
        for r in records:
            if isinstance(r, GovernorDecision):
                self._governor = governor_state(r)
                continue
            if isinstance(r, (GpuSample, TwinSnapshot)) and r.gpu_index != self.gpu_index:
                continue
            t = int(math.floor(r.t_wall_s))
            bucket = self._open.get(t)
            if bucket is None:
                if self._points and t <= self._points[-1].t_wall_s:
                    continue  # too late: that second is closed
                bucket = self._open[t] = _Bucket(t)
            bucket.add(r)

    def close_before(self, t_wall_s: float) -> list[ConsolePoint]:
        """Close the seconds that ended before `t_wall_s` - LATE_S; the new points."""
        done = sorted(t for t in self._open if t + 1 + LATE_S <= t_wall_s)
        new = [self._open.pop(t).point(self._governor) for t in done]
        with self._lock:
            self._points.extend(new)
        if self.store is not None:
            for p in new:
                self.store.submit(p)
        return new

    def _run(self) -> None:
        queue = self._sub.queue
        assert queue is not None
        while not self._stop.is_set():
            self.fold(queue.get_batch(4096, timeout=0.25))
            self.close_before(time.time())

    def close(self, timeout_s: float = 5.0) -> None:
        self._sub.close()
        self._stop.set()
        self._thread.join(timeout_s)
        self.fold(self._sub.queue.drain() if self._sub.queue is not None else [])
        self.close_before(float("inf"))


def point_dict(p: ConsolePoint) -> dict[str, Any]:
    return dataclasses.asdict(p)
