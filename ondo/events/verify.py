"""Walk the chain of a stored event log and name the first bad entry.

For each entry in sequence order: its seq is the next number; its prev_hash is the previous
entry's hash (the genesis for the first); its hash is sha256(prev_hash, newline, body); the
body is canonical JSON (re-encoding it gives the same text) of this schema's fields, and the
columns copied from it agree with it. Then the head row must name the last entry: its count
and its hash (entries deleted from the end leave the head pointing past them).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ondo.events.canonical import GENESIS_HASH, canonical_float, canonical_json, chain_hash
from ondo.events.table import has_event_log

BODY_FIELDS = {"schema_version", "seq", "t_monotonic_s", "t_wall_s", "kind", "severity",
               "subject", "payload", "evidence"}


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int  # entries checked and found good
    head_hash: str  # the hash of the last good entry
    bad_seq: int | None = None  # the first bad entry
    reason: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"ok: {self.entries} entries, head {self.head_hash}"
        return f"entry {self.bad_seq}: {self.reason} ({self.entries} entries before it are good)"


def _body_problem(seq: int, body: str, kind: str, severity: str, t_mono: float,
                  t_wall: float, gpu_index: object) -> str | None:
    try:
        data = json.loads(body)
    except ValueError as e:
        return f"its body is not JSON ({e})"
    if not isinstance(data, dict) or set(data) != BODY_FIELDS:
        return "its body does not have the schema's fields"
    try:
        if canonical_json(data) != body:
            return "its body is not in canonical form"
    except (TypeError, ValueError) as e:
        return f"its body is not in canonical form ({e})"
    if data["seq"] != seq:
        return f"its body says seq {data['seq']}"
    if data["kind"] != kind or data["severity"] != severity:
        return "its kind or severity column differs from its body"
    try:
        same_t = (canonical_float(t_mono) == canonical_float(data["t_monotonic_s"])
                  and canonical_float(t_wall) == canonical_float(data["t_wall_s"]))
    except (TypeError, ValueError):
        same_t = False
    if not same_t:
        return "its time columns differ from its body"
    subject = data["subject"]
    gpu = subject.get("gpu") if isinstance(subject, dict) else None
    if gpu_index != (gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else None):
        return "its gpu_index column differs from its body's subject"  # it would hide it from --gpu
    return None


def verify(db: str | Path) -> VerifyResult:
    """FileNotFoundError or ValueError (no event log in the file) where there is nothing to
    verify; otherwise the result, good or naming the first bad entry."""
    if not Path(db).exists():
        raise FileNotFoundError(f"{db}: no such database")
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    try:
        if not has_event_log(conn):
            raise ValueError(f"{db}: holds no event log (no event_log_head table)")
        head = conn.execute("SELECT count, head_hash FROM event_log_head WHERE id = 1").fetchone()
        if head is None:
            return VerifyResult(False, 0, GENESIS_HASH, 1, "the head row is missing")
        prev, expected = GENESIS_HASH, 1
        rows = conn.execute("SELECT seq, t_monotonic_s, t_wall_s, kind, severity, gpu_index, body, "
                            "prev_hash, hash FROM events ORDER BY seq")
        for seq, t_mono, t_wall, kind, severity, gpu_index, body, prev_hash, digest in rows:
            if seq != expected:
                return VerifyResult(False, expected - 1, prev, expected,
                                    f"it is missing (the next stored entry is {seq})")
            problem = None
            if prev_hash != prev:
                problem = "its prev_hash is not the previous entry's hash"
            elif chain_hash(prev_hash, body) != digest:
                problem = "its hash does not match its content"
            else:
                problem = _body_problem(seq, body, kind, severity, t_mono, t_wall, gpu_index)
            if problem:
                return VerifyResult(False, expected - 1, prev, seq, problem)
            prev, expected = digest, expected + 1
    finally:
        conn.close()
    count, head_hash = int(head[0]), str(head[1])
    last = expected - 1
    if count > last:
        return VerifyResult(False, last, prev, last + 1,
                            f"it is missing: the head records {count} entries, the log ends at {last}")
    if count < last:
        return VerifyResult(False, count, prev, count + 1,
                            f"it is past the head, which records {count} entries")
    if head_hash != prev:
        return VerifyResult(False, last - 1 if last else 0, prev, last or 1,
                            "the head hash is not this entry's hash")
    return VerifyResult(True, last, prev)
