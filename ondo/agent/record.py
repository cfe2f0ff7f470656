"""Appending a recommendation to the event log of a database when no server writes it
(`ondo agent recommend --db`): the head is read and the entry inserted in one
`BEGIN IMMEDIATE` transaction, so the chain continues from the stored head. While `ondo
serve` writes the same file its own agent records its recommendations; an entry appended
here meanwhile would move the head under the server's log, whose next entry the table's
triggers would then refuse: so the CLI does not append to a file whose latest sample is
younger than `LIVE_WRITER_S` (`--no-append` prints only)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ondo.events.log import ChainHead, EventLog
from ondo.events.schema import Event, EventDraft
from ondo.events.table import DDL, INSERT, event_row

LIVE_WRITER_S = 30.0


def latest_write_wall_s(db: str | Path) -> float | None:
    """The Unix time of the newest sample or entry in `db` (None: none)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        times = []
        for table, column in (("gpu_samples", "t_wall_s"), ("engine_steps", "t_wall_s"),
                              ("events", "t_wall_s")):
            if table in names:
                (t,) = conn.execute(f"SELECT MAX({column}) FROM {table}").fetchone()
                if t is not None:
                    times.append(float(t))
    finally:
        conn.close()
    return max(times) if times else None


def append_to_db(db: str | Path, draft: EventDraft) -> Event:
    """Append `draft` to the log in `db`; the entry. The triggers refuse it (IntegrityError)
    if another writer moved the head in between."""
    conn = sqlite3.connect(str(db), timeout=10.0, isolation_level=None)
    try:
        conn.executescript(DDL)
        conn.execute("BEGIN IMMEDIATE")
        try:
            count, head_hash = conn.execute(
                "SELECT count, head_hash FROM event_log_head WHERE id = 1").fetchone()
            written: list[Event] = []
            log = EventLog(sinks=[written.append], head=ChainHead(int(count), str(head_hash)),
                           recent=1)
            event = log.append(draft)
            conn.execute(INSERT, event_row(event))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return event
