"""The governor beside a serving engine: inputs from the telemetry hub, limits to the engine.

It lives in the server process, where the hub, the GPU telemetry and the live twin are: the
engine only receives a `SchedulerLimits` command when the limits change, the same way with
the engine on a thread or in a process of its own (`AsyncLLM.set_scheduler_limits`), and its
stepping never waits on the governor. A thread of its own drains a bounded hub subscription
(GPU samples, engine steps, twin snapshots) and ticks the policy every `period_s` on the
inputs of the engine's binding GPU (the one with the least slack, binding.py); each
decision is applied, then published on the hub (the telemetry store keeps it). The limits in
force are sent again every `REAPPLY_S` (an idempotent command), so that an engine its
supervisor restarted gets them too.

    service = GovernorService(hub, governor, async_llm.set_scheduler_limits).start()
    service.set_policy("reactive")            # what the console calls
    service.set_objectives(objectives)
    service.set_caps(SchedulerLimits(max_num_seqs=32))
    service.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from ondo.control.binding import binding_gpu
from ondo.control.decision import GovernorDecision
from ondo.control.governor import Governor
from ondo.control.inputs import GovernorInputs, InputTracker
from ondo.control.objectives import Objectives
from ondo.engine.scheduler_limits import SchedulerLimits
from ondo.telemetry.hub import Subscription, TelemetryHub
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.engine_load import plant_activity
from ondo.twin.live import TwinSnapshot

log = logging.getLogger(__name__)

REAPPLY_S = 5.0


class GovernorService:
    def __init__(self, hub: TelemetryHub, governor: Governor,
                 apply_limits: Callable[[SchedulerLimits], None], maxsize: int = 4096,
                 gpu_indices: Sequence[int] | None = None) -> None:
        """`gpu_indices`: the engine's GPUs (default: the governor's one); with several, each
        tick governs by the binding one (binding.py)."""
        self.hub = hub
        self.governor = governor
        self.apply_limits = apply_limits
        params = governor.params
        indices = list(gpu_indices) if gpu_indices else [governor.gpu_index]
        self.trackers = {i: InputTracker(
            i, activity_map=lambda c, m: tuple(float(x) for x in plant_activity(params, c, m)))
            for i in indices}
        self.tracker = self.trackers[indices[0]]
        self.ticks = 0
        self.apply_errors = 0
        self.last_decision: GovernorDecision | None = None
        self._sub: Subscription = hub.subscribe(
            maxsize=maxsize, kinds=(GpuSample, EngineSample, TwinSnapshot))
        self._stop = threading.Event()
        self._applied_s = time.monotonic()
        self._lock = threading.Lock()  # decisions leave in the order they were made
        self._thread = threading.Thread(target=self._run, name="ondo-governor", daemon=True)

    def start(self) -> GovernorService:
        self._emit(self.governor.set_policy(self.governor.policy_name))
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._sub.close()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- the console's setters --------------------------------------------------------
    def set_policy(self, name: str) -> GovernorDecision:
        """Switch policy now (ValueError naming the choices for an unknown one)."""
        decision = self.governor.set_policy(name)
        self._emit(decision)
        return decision

    def set_objectives(self, objectives: Objectives) -> GovernorDecision:
        decision = self.governor.set_objectives(objectives)
        self._emit(decision)
        return decision

    def set_caps(self, caps: SchedulerLimits) -> GovernorDecision:
        decision = self.governor.set_caps(caps)
        self._emit(decision)
        return decision

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        queue = self._sub.queue
        assert queue is not None
        next_t = time.monotonic()
        self._applied_s = next_t
        while not self._stop.is_set():
            timeout = max(0.0, next_t - time.monotonic())
            for sample in queue.get_batch(1024, timeout=timeout):
                for tracker in self.trackers.values():
                    tracker.on_sample(sample)
            now = time.monotonic()
            if now < next_t:
                continue
            next_t = max(next_t + self.governor.period_s, now)
            self.ticks += 1
            decision = self.governor.tick(self.inputs(now, time.time()))
            if decision is not None:
                self._emit(decision)
            elif now - self._applied_s >= REAPPLY_S:
                with self._lock:
                    self._apply()

    def inputs(self, now_s: float, t_wall_s: float) -> GovernorInputs:
        """The binding GPU's inputs (the only GPU's, with one)."""
        if len(self.trackers) == 1:
            return self.tracker.inputs(now_s, t_wall_s)
        by_gpu = {i: t.inputs(now_s, t_wall_s) for i, t in self.trackers.items()}
        b = binding_gpu(by_gpu, self.governor.objectives, self.governor.params)
        return replace(by_gpu[b.gpu_index], binding=b.constraint)

    def _emit(self, decision: GovernorDecision) -> None:
        with self._lock:
            self._apply()
            self.last_decision = decision
            self.hub.publish(decision)

    def _apply(self) -> None:
        self._applied_s = time.monotonic()
        try:
            self.apply_limits(self.governor.limits)
        except Exception:  # the engine has stopped: the decision is still recorded
            self.apply_errors += 1
            if self.apply_errors == 1:
                log.exception("could not send the governor's limits to the engine")
