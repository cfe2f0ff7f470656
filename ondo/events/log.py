"""The event log: numbers, chains and hands on events, in order, under one lock.

    log = EventLog(sinks=[hub.publish])          # live: the hub carries entries to the store
    event = log.append(draft)                     # seq, prev_hash, hash assigned here
    log.head                                      # ChainHead(count, hash)

Appending is the only operation. Sequence numbers start at 1 and have no gaps; each entry's
hash covers its canonical body and the previous entry's hash (`ondo/events/canonical.py`).
Sinks are called under the lock, so every sink sees entries in sequence order; a sink must be
quick and must not drop (the store gives the event table a lane that never drops). The last
`recent` entries stay in memory for readers without a database (/metrics, a live stream).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ondo.events.canonical import GENESIS_HASH, canonical_float, canonical_json, chain_hash
from ondo.events.schema import (
    KIND_SPECS,
    SCHEMA_VERSION,
    Event,
    EventDraft,
    EventKind,
    Severity,
    checked_payload,
    checked_subject,
)

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


@dataclass(frozen=True)
class ChainHead:
    count: int  # entries so far = the last entry's seq
    hash: str  # the last entry's hash (GENESIS_HASH for an empty log)


EMPTY_HEAD = ChainHead(0, GENESIS_HASH)


def _rounded(x: float) -> float:
    return float(canonical_float(float(x)))


class EventLog:
    def __init__(self, sinks: Sequence[Sink] = (), head: ChainHead = EMPTY_HEAD,
                 recent: int = 1000) -> None:
        self._sinks = list(sinks)
        self._head = head
        self._lock = threading.Lock()
        self._recent: deque[Event] = deque(maxlen=recent)
        self._open: dict[str, int] = {}  # episode key -> seq of the event that opened it
        self.counts: Counter[str] = Counter()  # appended entries by kind
        self.sink_errors = 0

    @property
    def head(self) -> ChainHead:
        with self._lock:
            return self._head

    def recent(self, n: int | None = None) -> list[Event]:
        with self._lock:
            items = list(self._recent)
        return items if n is None else items[-n:]

    def append(self, draft: EventDraft) -> Event:
        """Check, number, chain and hand on one event; SchemaError (nothing appended) if the
        draft does not match its kind."""
        kind = EventKind(draft.kind)
        severity = Severity(draft.severity or KIND_SPECS[kind].severity)
        t_monotonic_s, t_wall_s = _rounded(draft.t_monotonic_s), _rounded(draft.t_wall_s)
        with self._lock:
            payload = dict(draft.payload)
            evidence = tuple(draft.evidence)
            onset = self._open.get(draft.closes, 0) if draft.closes is not None else None
            if onset is not None:
                payload["onset_seq"] = onset
                if onset:
                    evidence = (f"event:{onset}", *evidence)
            subject = checked_subject(kind, draft.subject)
            payload = checked_payload(kind, payload)
            seq = self._head.count + 1
            body = canonical_json({
                "schema_version": SCHEMA_VERSION,
                "seq": seq,
                "t_monotonic_s": t_monotonic_s,
                "t_wall_s": t_wall_s,
                "kind": kind.value,
                "severity": severity.value,
                "subject": subject,
                "payload": payload,
                "evidence": list(evidence),
            })
            digest = chain_hash(self._head.hash, body)
            parsed = json.loads(body)  # floats at the canonical precision, as a reader sees them
            event = Event(seq, t_monotonic_s, t_wall_s, kind, severity, parsed["subject"],
                          parsed["payload"], evidence, SCHEMA_VERSION, self._head.hash, digest,
                          body)
            self._head = ChainHead(seq, digest)
            if draft.closes is not None:
                self._open.pop(draft.closes, None)
            if draft.opens is not None:
                self._open[draft.opens] = seq
            self._recent.append(event)
            self.counts[kind.value] += 1
            for sink in self._sinks:
                try:
                    sink(event)
                except Exception:
                    self.sink_errors += 1
                    log.exception("event sink %r failed for entry %d", sink, seq)
        return event
