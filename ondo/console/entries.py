"""The event log as the console reads it: the database's `events` table and, on a live server,
the log's latest entries in memory (an entry is there the moment it is appended; the store
writes it a moment later). Entries are dicts as `ondo.events.table.read_events` gives them:
the canonical body's fields plus `prev_hash` and `hash`.

Sequence numbers have no gaps, so a reader that asks for the entries after seq N gets
N + 1, N + 2, ... in order and only a run without holes: this is what lets the live stream
resume from `Last-Event-ID` without losing or repeating an entry.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ondo.events.log import EventLog
from ondo.events.schema import Event


def entry_dict(e: Event) -> dict[str, Any]:
    d = json.loads(e.body)
    d["prev_hash"], d["hash"] = e.prev_hash, e.hash
    return d


class EntrySource:
    """`db`: the telemetry database (None: none); `log`: the live log (None: offline)."""

    def __init__(self, db: str | Path | None, log: EventLog | None = None) -> None:
        self.db = None if db is None else Path(db)
        self.log = log

    def _conn(self) -> sqlite3.Connection | None:
        if self.db is None or not self.db.exists():
            return None
        conn = sqlite3.connect(f"file:{self.db.resolve()}?mode=ro", uri=True, timeout=5.0)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is None:
            conn.close()
            return None
        return conn

    def _db_rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        conn = self._conn()
        if conn is None:
            return []
        try:
            rows = conn.execute(sql, list(args)).fetchall()
        finally:
            conn.close()
        out = []
        for body, prev_hash, digest in rows:
            d = json.loads(body)
            d["prev_hash"], d["hash"] = prev_hash, digest
            out.append(d)
        return out

    def _recent(self) -> list[dict[str, Any]]:
        return [entry_dict(e) for e in self.log.recent()] if self.log is not None else []

    def head_seq(self) -> int:
        if self.log is not None:
            return self.log.head.count
        conn = self._conn()
        if conn is None:
            return 0
        try:
            (n,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        finally:
            conn.close()
        return int(n)

    def after(self, seq: int, limit: int = 500) -> list[dict[str, Any]]:
        """Entries seq + 1, seq + 2, ... (at most `limit`), stopping at the first hole."""
        recent = self._recent()
        if recent and recent[0]["seq"] <= seq + 1:
            got = [e for e in recent if e["seq"] > seq]
        else:
            got = self._db_rows("SELECT body, prev_hash, hash FROM events WHERE seq > ? "
                                "ORDER BY seq LIMIT ?", (seq, limit))
            last = got[-1]["seq"] if got else seq
            got += [e for e in recent if e["seq"] > last]
        out = []
        for e in got[:limit]:
            if e["seq"] != seq + 1 + len(out):
                break
            out.append(e)
        return out

    def get(self, seq: int) -> dict[str, Any] | None:
        for e in self._recent():
            if e["seq"] == seq:
                return e
        rows = self._db_rows("SELECT body, prev_hash, hash FROM events WHERE seq = ?", (seq,))
        return rows[0] if rows else None

    def query(self, kinds: Sequence[str] = (), severity: str | None = None,
              before_seq: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest entries matching, newest first."""
        where, args = [], []
        if kinds:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args += list(kinds)
        if severity:
            where.append("severity = ?")
            args.append(severity)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = "SELECT body, prev_hash, hash FROM events" + \
              (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        rows = self._db_rows(sql, (*args, limit))
        top = rows[0]["seq"] if rows else 0

        def keep(e: dict[str, Any]) -> bool:
            return (not kinds or e["kind"] in kinds) and (not severity or
                                                          e["severity"] == severity) \
                and (before_seq is None or e["seq"] < before_seq) and e["seq"] > top

        fresh = sorted((e for e in self._recent() if keep(e)), key=lambda e: -e["seq"])
        return (fresh + rows)[:limit]

    def of_kinds(self, kinds: Sequence[str]) -> list[dict[str, Any]]:
        """Every entry of these kinds, oldest first."""
        rows = self._db_rows(f"SELECT body, prev_hash, hash FROM events WHERE kind IN "
                             f"({', '.join('?' * len(kinds))}) ORDER BY seq", kinds)
        top = rows[-1]["seq"] if rows else 0
        return rows + [e for e in self._recent() if e["kind"] in kinds and e["seq"] > top]
