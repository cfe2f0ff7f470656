"""The knowledge base: runbook sections, past events, recommendations and operator decisions,
indexed for retrieval in the telemetry SQLite file itself.

Tables (beside `gpu_samples`, `engine_steps`, `events`, ...):

- `kb_docs`: one row per document: `kind` (runbook, event, recommendation, decision), `ref`
  (`runbook:power-cap-sustained#actions`, `event:17`), title, body, JSON `meta`, a digest of
  the text (a changed runbook is re-indexed), the time it happened.
- `kb_fts`: FTS5 over title and body (porter stemming), rowid = the doc's id: BM25.
- `kb_vec`: sqlite-vec `vec0` of the doc's all-MiniLM-L6-v2 embedding (cosine), with the
  doc's kind as a metadata column so a KNN query can keep to one kind.
- `kb_state`: how far the event log has been indexed, and which embedding model made the
  vectors.

The standard `sqlite3` module here cannot load extensions, so this connection is apsw's
(its own SQLite, FTS5 built in, `load_extension` for sqlite-vec). The telemetry store writes
the same WAL-mode file from its own thread with the stdlib module: both wait on each other
through busy timeouts, and every write here is one short transaction. Event documents are
added as the log grows (live: from the hub; offline: from the `events` table), so the
knowledge grows with operation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import sqlite_vec

from ondo.agent.embedding import EMBED_DIM, MODEL_NAME, Embedder, shared_embedder
from ondo.agent.runbook import Runbook, load_runbooks

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
DOC_KINDS = ("runbook", "event", "recommendation", "decision")
# Entries not indexed: closings say nothing on their own (their opening entries are
# indexed), and the governor's decisions come every few seconds while it works (the agent
# reads the recent ones from the log with each incident).
_SKIPPED_EVENT_KINDS = {"condition_cleared", "throttle_ended", "governor_decision"}

DDL = f"""
CREATE TABLE IF NOT EXISTS kb_docs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    meta TEXT NOT NULL,
    digest TEXT NOT NULL,
    t_wall_s REAL
);
CREATE INDEX IF NOT EXISTS kb_docs_kind ON kb_docs (kind);
CREATE VIRTUAL TABLE IF NOT EXISTS kb_fts USING fts5(title, body, tokenize='porter unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS kb_vec USING vec0(
    embedding float[{EMBED_DIM}] distance_metric=cosine, kind text);
CREATE TABLE IF NOT EXISTS kb_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Doc:
    kind: str
    ref: str
    title: str
    body: str
    meta: dict[str, Any]
    t_wall_s: float | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.title}\n{self.body}".encode()).hexdigest()

    @property
    def text(self) -> str:
        return f"{self.title}. {self.body}"


def connect(path: str | Path) -> apsw.Connection:
    """An apsw connection to `path` with sqlite-vec loaded, WAL, and a busy timeout."""
    conn = apsw.Connection(str(path))
    conn.setbusytimeout(BUSY_TIMEOUT_MS)
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.enable_load_extension(False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def runbook_docs(books: Iterable[Runbook]) -> list[Doc]:
    docs = []
    for b in books:
        for s in b.sections:
            body = s.text
            if s.section == "symptoms":
                body = f"{body} Symptoms: {'; '.join(b.symptoms)}. Events: " \
                       f"{', '.join(k.replace('_', ' ') for k in b.event_kinds)}."
            docs.append(Doc("runbook", f"runbook:{s.ref}", f"{b.title}: {s.heading}", body,
                            {"runbook": b.id, "section": s.section}))
    return docs


def _words(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_words(v)}" for k, v in sorted(value.items()))
    return str(value).replace("_", " ")


def event_doc(entry: dict[str, Any], recommendations: dict[str, dict[str, Any]]) -> Doc | None:
    """The document for one log entry (a dict as `ondo.events.table.read_events` gives it),
    or None for entries that say nothing on their own. `recommendations` maps a
    recommendation id to its entry's payload, so a decision is indexed with what it decided."""
    kind, seq, p = entry["kind"], int(entry["seq"]), entry["payload"]
    if kind in _SKIPPED_EVENT_KINDS:
        return None
    meta = {"seq": seq, "event_kind": kind}
    wall = float(entry.get("t_wall_s", 0.0))
    if kind == "recommendation_issued":
        meta["recommendation_id"] = p["recommendation_id"]
        body = f"proposed {_words(p['action'])} {_words(p['parameters'])}: {p['rationale']}"
        return Doc("recommendation", f"event:{seq}", f"recommendation {_words(p['action'])}",
                   body, {**meta, "action": p["action"]}, wall)
    if kind == "operator_decision":
        rec = recommendations.get(p["recommendation_id"], {})
        what = _words(rec.get("action", "an action"))
        body = f"operator {p['operator']} {p['decision']}d {what} " \
               f"{_words(rec.get('parameters', {}))}. Reason: {p.get('comment', 'none given')}." \
               f" Proposal: {rec.get('rationale', '')}"
        return Doc("decision", f"event:{seq}", f"operator {p['decision']} {what}", body,
                   {**meta, "decision": p["decision"], "action": rec.get("action")}, wall)
    if kind == "action_outcome" and "recommendation_id" in p:
        rec = recommendations.get(p["recommendation_id"], {})
        what = _words(p.get("action") or rec.get("action", "an action"))
        body = f"outcome of approved {what} {_words(rec.get('parameters', {}))}: " \
               f"{p['outcome']}. Measured: {_words(p['metrics'])}."
        return Doc("decision", f"event:{seq}", f"outcome {what}", body,
                   {**meta, "outcome": p["outcome"], "action": rec.get("action")}, wall)
    subject = ", ".join(f"{k} {_words(v)}" for k, v in sorted(entry["subject"].items()))
    body = f"{_words(kind)} ({entry['severity']}) {subject}: {_words(p)}"
    return Doc("event", f"event:{seq}", _words(kind), body, meta, wall)


class KnowledgeBase:
    """The knowledge base in `path` (created, with its tables, if need be)."""

    def __init__(self, path: str | Path, embedder: Embedder | None = None) -> None:
        self.path = Path(path)
        if str(path) != ":memory:" and not self.path.parent.is_dir():
            raise FileNotFoundError(f"--db {self.path}: the folder {self.path.parent} does not "
                                    "exist")
        self.embedder = embedder or shared_embedder()
        self._lock = threading.Lock()
        self._recs: dict[str, dict[str, Any]] = {}  # recommendation payloads seen, by id
        self.conn = connect(self.path)
        with self.conn:
            self.conn.execute(DDL)
            self._set_state_default("embedding_model", MODEL_NAME)
        model = self.state("embedding_model")
        if model != MODEL_NAME:
            raise RuntimeError(f"{self.path}: its vectors were made by {model}, not {MODEL_NAME}")

    def close(self) -> None:
        self.conn.close()

    def _set_state_default(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO kb_state VALUES (?, ?)", (key, value))

    def state(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM kb_state WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def count(self, kind: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM kb_docs", ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        return int(self.conn.execute(sql, args).fetchone()[0])

    # --- writing -------------------------------------------------------------------------

    def add(self, docs: list[Doc]) -> int:
        """Index `docs` (a doc whose ref exists with the same text is left alone; with other
        text it is replaced). Returns how many were written."""
        with self._lock:
            todo = []
            for d in docs:
                row = self.conn.execute("SELECT id, digest FROM kb_docs WHERE ref = ?",
                                        (d.ref,)).fetchone()
                if row is None or row[1] != d.digest:
                    todo.append((d, None if row is None else int(row[0])))
            if not todo:
                return 0
            vectors = self.embedder.embed([d.text for d, _ in todo])  # outside the transaction
            with self.conn:
                for (d, old), vec in zip(todo, vectors):
                    if old is not None:
                        self._delete(old)
                    self.conn.execute(
                        "INSERT INTO kb_docs (kind, ref, title, body, meta, digest, t_wall_s) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (d.kind, d.ref, d.title, d.body, json.dumps(d.meta, sort_keys=True),
                         d.digest, d.t_wall_s))
                    rowid = self.conn.last_insert_rowid()
                    self.conn.execute("INSERT INTO kb_fts (rowid, title, body) VALUES (?, ?, ?)",
                                      (rowid, d.title, d.body))
                    self.conn.execute("INSERT INTO kb_vec (rowid, embedding, kind) "
                                      "VALUES (?, ?, ?)",
                                      (rowid, np.asarray(vec, np.float32).tobytes(), d.kind))
            return len(todo)

    def _delete(self, doc_id: int) -> None:
        self.conn.execute("DELETE FROM kb_fts WHERE rowid = ?", (doc_id,))
        self.conn.execute("DELETE FROM kb_vec WHERE rowid = ?", (doc_id,))
        self.conn.execute("DELETE FROM kb_docs WHERE id = ?", (doc_id,))

    def sync_runbooks(self, books: Iterable[Runbook] | None = None) -> int:
        """Index the runbooks' sections (new or changed ones), drop sections no longer there."""
        docs = runbook_docs(load_runbooks() if books is None else books)
        written = self.add(docs)
        keep = {d.ref for d in docs}
        with self._lock, self.conn:
            stale = [int(i) for i, ref in self.conn.execute(
                "SELECT id, ref FROM kb_docs WHERE kind = 'runbook'") if ref not in keep]
            for doc_id in stale:
                self._delete(doc_id)
        return written + len(stale)

    def index_entries(self, entries: Iterable[dict[str, Any]]) -> int:
        """Index log entries (dicts with seq, kind, severity, subject, payload, t_wall_s) not
        indexed yet; moves `last_event_seq`. Returns the number of documents written."""
        last = int(self.state("last_event_seq", "0") or 0)
        fresh = [e for e in entries if int(e["seq"]) > last]
        if not fresh:
            return 0
        recs = {**self._recommendations(), **self._recs}
        docs = []
        for e in fresh:
            if e["kind"] == "recommendation_issued":
                recs[e["payload"]["recommendation_id"]] = e["payload"]
                self._recs[e["payload"]["recommendation_id"]] = e["payload"]
            d = event_doc(e, recs)
            if d is not None:
                docs.append(d)
        n = self.add(docs)
        with self._lock, self.conn:
            self.conn.execute("INSERT OR REPLACE INTO kb_state VALUES ('last_event_seq', ?)",
                              (str(max(int(e["seq"]) for e in fresh)),))
        return n

    def index_log(self) -> int:
        """Index the entries of this file's `events` table past `last_event_seq`."""
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() \
                is None:
            return 0
        last = int(self.state("last_event_seq", "0") or 0)
        rows = self.conn.execute("SELECT body FROM events WHERE seq > ? ORDER BY seq", (last,))
        return self.index_entries([json.loads(b) for (b,) in rows])

    def _recommendations(self) -> dict[str, dict[str, Any]]:
        """Recommendation payloads by id, from the indexed recommendation docs' events."""
        out: dict[str, dict[str, Any]] = {}
        has_events = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is not None
        if not has_events:
            return out
        for (body,) in self.conn.execute(
                "SELECT body FROM events WHERE kind = 'recommendation_issued'"):
            p = json.loads(body)["payload"]
            out[p["recommendation_id"]] = p
        return out

    # --- reading -------------------------------------------------------------------------

    def docs(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(ids)
        if not ids:
            return {}
        rows = self.conn.execute(
            f"SELECT id, kind, ref, title, body, meta, t_wall_s FROM kb_docs WHERE id IN "
            f"({', '.join('?' * len(ids))})", ids)
        return {int(r[0]): {"id": int(r[0]), "kind": r[1], "ref": r[2], "title": r[3],
                            "body": r[4], "meta": json.loads(r[5]), "t_wall_s": r[6]}
                for r in rows}
