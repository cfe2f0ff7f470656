"""The detectors inside `ondo serve`: a hub subscriber with a thread of its own.

The hub hands every record to a bounded queue (publishing never waits; a full queue drops
its oldest record, counted, and the loss becomes a `telemetry_gap` event). The thread feeds
the records to the detectors and appends what they find to the log, whose sink is the hub
again: the store (when there is a database) writes entries through its lane that never
drops, and any other subscriber (the console, a live stream) sees them. Without a database
the log lives in memory (its last entries) and on /metrics. When the queue is idle the
thread lets time pass for the detectors that need it (an engine gone quiet ends a
preemption burst).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ondo.events.config import DetectorConfig
from ondo.events.detectors import DetectorSet
from ondo.events.log import EMPTY_HEAD, EventLog
from ondo.events.schema import EventDraft, EventKind
from ondo.events.table import read_head
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import request_sample_from_output
from ondo.telemetry.store import TelemetryStore

log = logging.getLogger(__name__)

DROP_CHECK_S = 1.0
DROP_MERGE_S = 5.0


class LiveEvents:
    def __init__(self, hub: TelemetryHub, config: DetectorConfig | None = None,
                 store: TelemetryStore | None = None, registry: CollectorRegistry | None = None,
                 queue_size: int = 65_536, recent: int = 1000) -> None:
        self.hub = hub
        self.store = store
        head = read_head(store.path) if store is not None else EMPTY_HEAD
        self.log = EventLog(sinks=[hub.publish], head=head, recent=recent)
        self.detectors = DetectorSet(config or DetectorConfig.from_params())
        self.append_errors = 0
        self.cpu_s = 0.0  # thread CPU time spent detecting and appending
        self._drops = {"event detectors": 0, "store": 0}
        self._drops_unreported = {"event detectors": 0, "store": 0}
        self._last_drop_event = float("-inf")
        self._stop = threading.Event()
        self._sub = hub.subscribe(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="ondo-event-detectors",
                                        daemon=True)
        if registry is not None:
            registry.register(_EventCollector(self))  # type: ignore[arg-type]
        self._thread.start()
        log.info("event detectors on%s (log head: %d entries)",
                 f", log in {store.path}" if store is not None else ", log in memory",
                 head.count)

    @property
    def dropped(self) -> int:
        """Records the detectors never saw because their queue was full."""
        return self._sub.queue.dropped if self._sub.queue is not None else 0

    def _append(self, drafts: list[EventDraft]) -> None:
        for d in drafts:
            try:
                self.log.append(d)
            except (TypeError, ValueError):
                self.append_errors += 1
                log.exception("event %s refused by the schema; skipped", d.kind)

    def _run(self) -> None:
        queue = self._sub.queue
        assert queue is not None
        last_check = time.monotonic()
        while not self._stop.is_set() or len(queue):
            batch = queue.get_batch(512, timeout=0.5)
            t0 = time.thread_time()
            for record in batch:
                self._append(self.detectors.feed(record))
            now = time.monotonic()
            if not batch:
                self._append(self.detectors.tick(now, time.time()))
            if now - last_check >= DROP_CHECK_S:
                last_check = now
                self._check_drops(now)
            self.cpu_s += time.thread_time() - t0

    def _check_drops(self, now: float) -> None:
        counts = {"event detectors": self.dropped,
                  "store": self.store.dropped if self.store is not None else 0}
        for stage, n in counts.items():
            self._drops_unreported[stage] += n - self._drops[stage]
            self._drops[stage] = n
        if now - self._last_drop_event < DROP_MERGE_S:
            return
        for stage, n in self._drops_unreported.items():
            if n > 0:
                self._append([EventDraft(EventKind.TELEMETRY_GAP, now, time.time(),
                                         {"stage": stage}, {"stage": stage, "dropped": n})])
                self._drops_unreported[stage] = 0
                self._last_drop_event = now

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking records, feed the detectors what is queued, stop the thread."""
        self._sub.close()
        self._stop.set()
        self._thread.join(timeout_s)


class _EventCollector:
    def __init__(self, live: LiveEvents) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily("ondo:events", "Events appended to the log, by kind",
                                     labels=["kind"])
        for kind, n in sorted(self.live.log.counts.items()):
            counts.add_metric([kind], n)
        yield counts
        head = GaugeMetricFamily("ondo:event_log_entries", "Entries in the event log (its head)")
        head.add_metric([], self.live.log.head.count)
        yield head
        dropped = CounterMetricFamily("ondo:event_detector_records_dropped",
                                      "Records the event detectors never saw (queue full)")
        dropped.add_metric([], self.live.dropped)
        yield dropped


def request_listener(hub: TelemetryHub):
    """A finished request's output -> a RequestSample on the hub (for the SLO detector)."""
    def on_finished(out: Any) -> None:
        try:
            sample = request_sample_from_output(out, time.monotonic(), time.time())
        except Exception:  # never let a malformed output stop the engine's side
            log.exception("no request sample for %r", getattr(out, "request_id", out))
            return
        hub.publish(sample)
    return on_finished


def start_events(config: DetectorConfig | None, telemetry: Any,
                 registry: CollectorRegistry | None, async_llm: Any) -> LiveEvents | None:
    """The live detectors of `ondo serve` on `telemetry`'s hub (None: events off)."""
    if config is None or telemetry is None:
        return None
    events = LiveEvents(telemetry.hub, config, telemetry.store, registry)
    async_llm.add_request_listener(request_listener(telemetry.hub))
    return events
