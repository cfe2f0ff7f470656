"""The agent inside `ondo serve`: a hub subscriber with a thread of its own.

It keeps the last `WINDOW_S` of GPU samples, engine steps, twin snapshots and log entries
from the hub (a bounded queue: publishing never waits; a full queue drops its oldest
record). When the detectors open an incident it waits `settle_s` for the entries that come
with it, then recommends on the latest incident: at most one recommendation per
`interval_s` (incidents in between are folded into the next one, counted in
`coalesced`). The knowledge base lives in the telemetry database (in memory without one),
reached only from a process of its own (`process.py`: the store writes the same file with
another copy of SQLite), started on the first incident, so a server that never has one
never loads the embedding model; every log entry is indexed as it arrives from then on.
With `preload` it starts with the server instead (the thread's first work), so the first
incident does not wait seconds for the embedding model and the runbooks' vectors.
The recommendation is appended to the server's own event log (`recommendation_issued`).

The model is asked over HTTP from that process with a deadline, while this thread waits:
the engine and the server's event loop never wait on the agent. By default it asks the
server it runs in (its own embedded model), so a recommendation costs one short request on
the engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ondo.agent.actions import GpuLimits
from ondo.agent.agent import AgentResult, recommendation_draft
from ondo.agent.client import ModelEndpoint
from ondo.agent.context import WINDOW_S, build_context, is_incident
from ondo.agent.process import AgentProcess
from ondo.agent.serve import DEFAULT_INTERVAL_S
from ondo.events.detectors.twin import is_twin_snapshot
from ondo.events.log import EventLog
from ondo.events.schema import Event
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.params import TwinParams, h100_params

log = logging.getLogger(__name__)

DEFAULT_SETTLE_S = 1.0
UNINDEXED_MAX = 10_000  # entries kept for the knowledge base until an incident builds it


class LiveAgent:
    def __init__(self, hub: TelemetryHub, events: EventLog, endpoint: ModelEndpoint | None,
                 db_path: str | None = None, params: TwinParams | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, settle_s: float = DEFAULT_SETTLE_S,
                 registry: CollectorRegistry | None = None, queue_size: int = 65_536,
                 preload: bool = False) -> None:
        if interval_s < 0 or settle_s < 0:
            raise ValueError("--agent-interval-s and the settle time must be >= 0")
        self.events = events
        self.endpoint = endpoint
        self.db_path = db_path
        self.params = params or h100_params()
        self.limits = GpuLimits.from_params(self.params)
        self.interval_s, self.settle_s = interval_s, settle_s
        self.counts: Counter[str] = Counter()  # recommendations by source; errors, coalesced
        self.last: AgentResult | None = None
        self._gpu: dict[int, deque[GpuSample]] = {}
        self._steps: deque[EngineSample] = deque()
        self._entries: deque[dict[str, Any]] = deque()
        self._unindexed: deque[dict[str, Any]] = deque(maxlen=UNINDEXED_MAX)
        self._twin: dict[int, Any] = {}
        self._pending: dict[str, Any] | None = None
        self._pending_since = 0.0
        self._last_run = float("-inf")
        self.preload = preload
        self.knowledge_ready_s: float | None = None  # seconds the knowledge base took to start
        self.last_latency_s: float | None = None  # the last incident to its recommendation
        self._process = AgentProcess(db_path, endpoint, self.limits)  # started on first use
        self._stop = threading.Event()
        self._sub = hub.subscribe(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="ondo-agent", daemon=True)
        if registry is not None:
            registry.register(_AgentCollector(self))  # type: ignore[arg-type]
        self._thread.start()
        log.info("agent on: recommendations from %s, at most one per %.0f s",
                 endpoint.base_url if endpoint else "the rules", interval_s)

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        queue = self._sub.queue
        assert queue is not None
        if self.preload:
            self._index()
        while not self._stop.is_set():
            for record in queue.get_batch(1024, timeout=0.25):
                self._keep(record)
            now = time.monotonic()
            self._trim(now)
            if self._pending is not None and now - self._pending_since >= self.settle_s \
                    and now - self._last_run >= self.interval_s and not self._stop.is_set():
                incident, self._pending = self._pending, None
                self._last_run = now
                try:
                    self._recommend(incident)
                except Exception:  # the agent must never take the server down
                    self.counts["errors"] += 1
                    log.exception("agent: no recommendation for entry %s", incident["seq"])

    def _keep(self, record: Any) -> None:
        if isinstance(record, GpuSample):
            self._gpu.setdefault(record.gpu_index, deque()).append(record)
        elif isinstance(record, EngineSample):
            self._steps.append(record)
        elif isinstance(record, Event):
            entry = json.loads(record.body)
            self._entries.append(entry)
            self._unindexed.append(entry)
            if is_incident(entry):
                if self._pending is not None:
                    self.counts["coalesced"] += 1
                self._pending, self._pending_since = entry, time.monotonic()
        elif is_twin_snapshot(record):
            self._twin[int(record.gpu_index)] = record

    def _trim(self, now: float) -> None:
        t0 = now - WINDOW_S
        for samples in self._gpu.values():
            while samples and samples[0].t_monotonic_s < t0:
                samples.popleft()
        while self._steps and self._steps[0].end_monotonic_s < t0:
            self._steps.popleft()
        while self._entries and float(self._entries[0]["t_monotonic_s"]) < t0:
            self._entries.popleft()

    def _index(self) -> None:
        """What the store has written (older than the buffer too), and what it may not have
        yet; the first call starts the process and loads the embedding model."""
        t0 = time.monotonic()
        try:
            self._process.index(list(self._unindexed))
        except Exception:
            if self.knowledge_ready_s is None and self.preload:
                # Preloading failed: the first incident tries again (and counts the error).
                log.exception("agent: the knowledge base did not start; the first incident "
                              "will try again")
                return
            raise
        self._unindexed.clear()
        if self.knowledge_ready_s is None:
            self.knowledge_ready_s = time.monotonic() - t0
            log.info("agent: knowledge base ready in %.1f s (%s)", self.knowledge_ready_s,
                     "at start" if self.preload else "on the first incident")

    def _recommend(self, incident: dict[str, Any]) -> None:
        self._index()
        if self._stop.is_set():  # the server is stopping: loading took that long
            return
        gpu_index = incident["subject"].get("gpu")
        gpus = self._gpu.get(gpu_index) if isinstance(gpu_index, int) else None
        if gpus is None and self._gpu:
            gpus = self._gpu[min(self._gpu)]
        gpu = list(gpus or [])
        twin = self._twin.get(gpu[0].gpu_index) if gpu else None
        if twin is None and gpu:
            from ondo.agent.context import replay_twin_snapshot

            twin = replay_twin_snapshot(self.params, gpu, list(self._steps))
        ctx = build_context(incident, list(self._entries), gpu, list(self._steps), twin,
                            self.params)
        result = self._process.recommend(ctx)
        self.last = result
        rec = result.recommendation
        self.events.append(recommendation_draft(rec, ctx, time.monotonic(), time.time()))
        self.counts[rec.source] += 1
        self.last_latency_s = time.monotonic() - float(incident["t_monotonic_s"])
        log.info("agent: entry %s (%s) -> %s %s [%s%s] in %.1f s (%.1f s after the incident)",
                 incident["seq"], incident["kind"], rec.action, rec.params, rec.source,
                 f": {rec.fallback_reason}" if rec.fallback_reason else "", result.latency_s,
                 self.last_latency_s)

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop taking records, let a recommendation under way finish (its model call has a
        deadline), then stop the knowledge base's process (it closes the file)."""
        self._sub.close()
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # it waits on the process: stop that without a word
            log.warning("agent: still busy after %.0f s at shutdown", timeout_s)
            self._process.kill()
        else:
            self._process.close()


class _AgentCollector:
    def __init__(self, live: LiveAgent) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        recs = CounterMetricFamily("ondo:agent_recommendations",
                                   "Recommendations the agent issued, by source (model, rules)",
                                   labels=["source"])
        for source in ("model", "rules"):
            recs.add_metric([source], self.live.counts[source])
        yield recs
        for name, key, doc in (
                ("ondo:agent_incidents_coalesced", "coalesced",
                 "Incidents folded into a later recommendation (rate limit)"),
                ("ondo:agent_errors", "errors", "Incidents the agent failed on")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], self.live.counts[key])
            yield c
        ready = GaugeMetricFamily("ondo:agent_knowledge_base_ready",
                                  "1 once the knowledge base (embedding model, runbook vectors) "
                                  "is up, else 0")
        ready.add_metric([], float(self.live.knowledge_ready_s is not None))
        yield ready
        if self.live.last_latency_s is not None:
            last = GaugeMetricFamily("ondo:agent_incident_to_recommendation_seconds",
                                     "From the last incident recommended on to its "
                                     "recommendation in the log (the settle wait included)")
            last.add_metric([], self.live.last_latency_s)
            yield last
