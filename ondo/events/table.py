"""The event log's tables in the telemetry SQLite file.

`events` holds one row per entry: the canonical body (what the hash covers), the chain
hashes, and a few columns copied from the body for queries. `event_log_head` holds the
count and the head hash in one row, moved by a trigger in the same transaction as each
insert, so that deleting the last entries is caught by `verify` (the head still names
them). Triggers refuse UPDATE and DELETE on `events`, an insert that does not extend the
head (a second writer, a replayed or forged entry), and any change to the head other than
one step forward.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondo.events.canonical import GENESIS_HASH
from ondo.events.log import EMPTY_HEAD, ChainHead
from ondo.events.schema import SCHEMA_VERSION, Event
from ondo.telemetry.store import RecordTable

EVENT_COLUMNS = ("seq", "t_monotonic_s", "t_wall_s", "kind", "severity", "gpu_index", "body",
                 "prev_hash", "hash")

DDL = f"""
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    t_monotonic_s REAL NOT NULL,
    t_wall_s REAL NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    gpu_index INTEGER,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_kind_t ON events (kind, t_monotonic_s);
CREATE TABLE IF NOT EXISTS event_log_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    count INTEGER NOT NULL,
    head_hash TEXT NOT NULL,
    schema_version INTEGER NOT NULL
);
INSERT OR IGNORE INTO event_log_head VALUES (1, 0, '{GENESIS_HASH}', {SCHEMA_VERSION});
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only: UPDATE is refused'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only: DELETE is refused'); END;
CREATE TRIGGER IF NOT EXISTS events_extend_head BEFORE INSERT ON events
WHEN NEW.seq != (SELECT count FROM event_log_head WHERE id = 1) + 1
  OR NEW.prev_hash != (SELECT head_hash FROM event_log_head WHERE id = 1)
BEGIN SELECT RAISE(ABORT, 'event log: the entry does not extend the head of the chain'); END;
CREATE TRIGGER IF NOT EXISTS events_move_head AFTER INSERT ON events
BEGIN UPDATE event_log_head SET count = NEW.seq, head_hash = NEW.hash WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS event_log_head_forward BEFORE UPDATE ON event_log_head
WHEN NEW.count != OLD.count + 1 OR NEW.id != OLD.id
BEGIN SELECT RAISE(ABORT, 'event log head: it only moves one entry forward'); END;
CREATE TRIGGER IF NOT EXISTS event_log_head_no_delete BEFORE DELETE ON event_log_head
BEGIN SELECT RAISE(ABORT, 'event log head: DELETE is refused'); END;
"""

INSERT = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"


def event_row(e: Event) -> tuple[Any, ...]:
    gpu = e.subject.get("gpu")
    return (e.seq, e.t_monotonic_s, e.t_wall_s, e.kind.value, e.severity.value,
            gpu if isinstance(gpu, int) else None, e.body, e.prev_hash, e.hash)


# Through the telemetry store's writer thread, in a lane that never drops.
EVENTS_TABLE = RecordTable(Event, DDL, INSERT, event_row, lossless=True)


def has_event_log(conn: sqlite3.Connection) -> bool:
    return conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'event_log_head'"
    ).fetchone() is not None


def read_head(db: str | Path) -> ChainHead:
    """The stored head of the log in `db` (the empty head where there is no log yet)."""
    if not Path(db).exists():
        return EMPTY_HEAD
    conn = sqlite3.connect(str(db), timeout=5.0)
    try:
        if not has_event_log(conn):
            return EMPTY_HEAD
        row = conn.execute("SELECT count, head_hash FROM event_log_head WHERE id = 1").fetchone()
    finally:
        conn.close()
    return ChainHead(int(row[0]), str(row[1])) if row else EMPTY_HEAD


@dataclass(frozen=True)
class EventQuery:
    kinds: tuple[str, ...] = ()
    since_monotonic_s: float | None = None
    since_wall_s: float | None = None
    since_seq: int | None = None
    gpu_index: int | None = None


def _where(q: EventQuery) -> tuple[str, list[Any]]:
    clauses, args = [], []
    if q.kinds:
        clauses.append(f"kind IN ({', '.join('?' * len(q.kinds))})")
        args += list(q.kinds)
    if q.since_monotonic_s is not None:
        clauses.append("t_monotonic_s >= ?")
        args.append(q.since_monotonic_s)
    if q.since_wall_s is not None:
        clauses.append("t_wall_s >= ?")
        args.append(q.since_wall_s)
    if q.since_seq is not None:
        clauses.append("seq > ?")
        args.append(q.since_seq)
    if q.gpu_index is not None:
        clauses.append("gpu_index = ?")
        args.append(q.gpu_index)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def read_events(conn: sqlite3.Connection, query: EventQuery = EventQuery(),
                last: int | None = None) -> Iterator[dict[str, Any]]:
    """Entries matching `query` in sequence order (the last `last` of them, if given), each
    as a dict: the body's fields plus the chain hashes (`prev_hash`, `hash`)."""
    where, args = _where(query)
    sql = f"SELECT seq, body, prev_hash, hash FROM events{where} ORDER BY seq"
    if last is not None:
        sql = f"SELECT * FROM (SELECT seq, body, prev_hash, hash FROM events{where} " \
              f"ORDER BY seq DESC LIMIT {int(last)}) ORDER BY seq"
    for _, body, prev_hash, digest in conn.execute(sql, args):
        entry = json.loads(body)
        entry["prev_hash"], entry["hash"] = prev_hash, digest
        yield entry
