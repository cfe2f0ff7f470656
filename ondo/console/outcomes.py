"""The loop's far end: after an action has run for `after_s`, its observed effect becomes an
`action_outcome` entry; each decision and outcome is then indexed into the agent's knowledge
base, so that the next similar incident retrieves how the last one was judged.

The outcome is measured once the window's last second is a closed point (`CLOSE_S` after
it). A thread of its own waits for the due outcomes and does the indexing (the embedding model
loads on the first document, off the request path). Outcomes still due at shutdown are
measured over the seconds there were, and say so (`window_cut_s`).
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondo.console import OUTCOME_AFTER_S as DEFAULT_AFTER_S
from ondo.console.outcome import measure_outcome
from ondo.console.series import LATE_S, ConsolePoint
from ondo.events.log import EventLog
from ondo.events.schema import Event, EventDraft, EventKind

log = logging.getLogger(__name__)

CLOSE_S = 1.0 + LATE_S  # the last second of the window is a point this long after it starts



@dataclass(order=True)
class _Due:
    due_monotonic_s: float
    action_id: str = field(compare=False)
    recommendation_id: str = field(compare=False)
    action: str = field(compare=False)
    params: dict[str, Any] = field(compare=False)
    applied_seq: int = field(compare=False)
    applied_t_wall_s: float = field(compare=False)


class OutcomeLoop:
    """`points(since_t)`: the console's 1 s points; `kb_path`: where to index (None: the
    agent indexes from the log on its next incident)."""

    def __init__(self, log_: EventLog, points: Callable[[float], list[ConsolePoint]],
                 after_s: float = DEFAULT_AFTER_S, kb_path: str | Path | None = None,
                 recommendations: Callable[[], dict[str, dict[str, Any]]] | None = None) -> None:
        if not after_s > 0:
            raise ValueError(f"--console-outcome-s must be > 0, got {after_s}")
        self.log = log_
        self.points = points
        self.after_s = after_s
        self.kb_path = None if kb_path is None else str(kb_path)
        self.recommendations = recommendations or dict
        self.recorded = 0
        self.indexed = 0
        self.index_errors = 0
        self._due: list[_Due] = []
        self._to_index: list[Event] = []
        self._kb: Any = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ondo-console-outcomes",
                                        daemon=True)
        self._thread.start()

    def schedule(self, applied: Event, recommendation_id: str, action: str,
                 params: dict[str, Any]) -> None:
        p = applied.payload
        with self._cond:
            due_s = time.monotonic() + self.after_s + CLOSE_S
            heapq.heappush(self._due, _Due(due_s, p["action_id"],
                                           recommendation_id, action, dict(params),
                                           applied.seq, applied.t_wall_s))
            self._cond.notify()

    def index(self, entry: Event) -> None:
        if self.kb_path is None:
            return
        with self._cond:
            self._to_index.append(entry)
            self._cond.notify()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._due)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._to_index and not (
                        self._due and self._due[0].due_monotonic_s <= time.monotonic()):
                    wait = None if not self._due else \
                        max(0.0, self._due[0].due_monotonic_s - time.monotonic())
                    self._cond.wait(wait)
                if self._stop:
                    return
                due = heapq.heappop(self._due) if self._due and \
                    self._due[0].due_monotonic_s <= time.monotonic() else None
                todo, self._to_index = self._to_index, []
            if due is not None:
                self._record(due)
            if todo:
                self._index(todo)

    def _record(self, due: _Due, cut: bool = False) -> Event | None:
        pts = self.points(due.applied_t_wall_s - self.after_s - 2)
        outcome, metrics = measure_outcome(due.action, due.params, pts, due.applied_t_wall_s,
                                           self.after_s)
        if cut:
            metrics["window_cut_s"] = round(time.time() - due.applied_t_wall_s, 3)
        draft = EventDraft(EventKind.ACTION_OUTCOME, time.monotonic(), time.time(),
                           {"action_id": due.action_id, "recommendation_id":
                            due.recommendation_id},
                           {"action_id": due.action_id, "outcome": outcome, "metrics": metrics,
                            "recommendation_id": due.recommendation_id, "action": due.action},
                           (f"event:{due.applied_seq}",))
        try:
            event = self.log.append(draft)
        except Exception:
            log.exception("console: the outcome of %s could not be recorded", due.action_id)
            return None
        self.recorded += 1
        log.info("console: outcome of %s (%s): %s", due.action_id, due.action, outcome)
        self.index(event)
        return event

    def _index(self, entries: list[Event]) -> None:
        try:
            from ondo.agent.knowledge import KnowledgeBase, event_doc

            if self._kb is None:
                self._kb = KnowledgeBase(self.kb_path)  # type: ignore[arg-type]
            recs = self.recommendations()
            docs = [event_doc(json.loads(e.body), recs) for e in entries]
            self.indexed += self._kb.add([d for d in docs if d is not None])
        except Exception:
            self.index_errors += 1
            log.exception("console: decisions not indexed into the knowledge base")

    def close(self, timeout_s: float = 30.0) -> None:
        """Record what is still due (cut short), index it, stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            due, self._due = sorted(self._due), []
            todo, self._to_index = self._to_index, []
        for d in due:
            self._record(d, cut=True)
        with self._cond:
            todo += self._to_index
            self._to_index = []
        if todo and self._kb is not None:  # else the agent indexes them from the log later
            self._index(todo)
        if self._kb is not None:
            self._kb.close()
