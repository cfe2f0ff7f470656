"""What the agent knows about an incident: the entry that opened it, the log's entries
around it, the telemetry window before it (as facts), the twin's latest snapshot and the
governor's decisions.

`build_context` is pure: the live agent calls it with what it kept from the hub,
`context_from_db` with what it reads from a telemetry database (the twin's snapshot there is
computed from the window's samples, as `ondo events replay` computes them).

An incident is an opening entry of warning or critical severity from the detectors (not the
agent's, the console's or the governor's own entries, and not a closing one).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondo.agent.facts import Facts, incident_facts
from ondo.events.table import has_event_log
from ondo.telemetry.schema import ENGINE_COLUMNS, EngineSample, GpuSample
from ondo.telemetry.store import GPU_COLUMNS
from ondo.twin.params import TwinParams, h100_params

WINDOW_S = 300.0  # telemetry and entries this long before the incident
MAX_EVENTS = 24  # entries shown to the model (the incident and the latest before it)
NOT_INCIDENTS = frozenset({"condition_cleared", "throttle_ended", "governor_decision",
                           "recommendation_issued", "operator_decision", "action_applied",
                           "action_outcome"})


def is_incident(entry: dict[str, Any]) -> bool:
    return entry["kind"] not in NOT_INCIDENTS and entry["severity"] in ("warning", "critical")


@dataclass(frozen=True)
class IncidentContext:
    incident: dict[str, Any]  # the entry that opened it (a log entry as a dict)
    events: tuple[dict[str, Any], ...]  # entries in the window, seq order, the incident last
    facts: Facts
    governor: tuple[dict[str, Any], ...]  # governor decisions in the window (payloads)
    window_s: float

    @property
    def event_ids(self) -> tuple[int, ...]:
        return tuple(int(e["seq"]) for e in self.events)

    @property
    def kinds(self) -> set[str]:
        return {e["kind"] for e in self.events}

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] in kinds]


def build_context(incident: dict[str, Any], entries: Sequence[dict[str, Any]],
                  gpu: Sequence[Any], steps: Sequence[Any], twin: Any | None,
                  params: TwinParams, window_s: float = WINDOW_S) -> IncidentContext:
    """`entries`: log entries up to the incident (any order, any span: the window is cut
    here); `gpu`, `steps`: the telemetry window of the incident's GPU and engine."""
    t1 = float(incident["t_monotonic_s"])
    seq1 = int(incident["seq"])
    window = sorted((e for e in entries if int(e["seq"]) <= seq1
                     and float(e["t_monotonic_s"]) >= t1 - window_s), key=lambda e: e["seq"])
    governor = tuple(e["payload"] for e in window if e["kind"] == "governor_decision")
    shown = [e for e in window if e["kind"] != "recommendation_issued"][-MAX_EVENTS:]
    if not shown or shown[-1]["seq"] != seq1:
        shown = [*shown[-(MAX_EVENTS - 1):], incident]
    starts = [float(gpu[0].t_monotonic_s)] if gpu else []
    starts += [float(steps[0].start_monotonic_s)] if steps else []
    span_s = t1 - max(t1 - window_s, min(starts)) if starts else window_s
    facts = incident_facts(params, gpu, steps, twin, span_s)
    return IncidentContext(incident, tuple(shown), facts, governor, window_s)


# --- from a database ---------------------------------------------------------------------

def _entries(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [json.loads(b) for (b,) in conn.execute(f"SELECT body FROM events {where}", args)]


def latest_incident(conn: sqlite3.Connection) -> dict[str, Any] | None:
    rows = _entries(conn, "WHERE severity IN ('warning', 'critical') ORDER BY seq DESC "
                          "LIMIT 200", ())
    return next((e for e in rows if is_incident(e)), None)


def incident_entry(conn: sqlite3.Connection, seq: int | None) -> dict[str, Any]:
    """The entry `seq` (which must be an incident), or the latest incident; LookupError."""
    if seq is None:
        found = latest_incident(conn)
        if found is None:
            raise LookupError("the log has no incident (no opening warning or critical entry)")
        return found
    rows = _entries(conn, "WHERE seq = ?", (seq,))
    if not rows:
        raise LookupError(f"--incident {seq}: the log has no entry {seq}")
    if not is_incident(rows[0]):
        raise LookupError(f"--incident {seq}: entry {seq} is a {rows[0]['kind']} "
                          f"({rows[0]['severity']}), not an incident")
    return rows[0]


def _gpu_samples(conn: sqlite3.Connection, gpu: int | None, t0: float,
                 t1: float) -> list[GpuSample]:
    where = "t_monotonic_s BETWEEN ? AND ?" + ("" if gpu is None else " AND gpu_index = ?")
    args: tuple[Any, ...] = (t0, t1) if gpu is None else (t0, t1, gpu)
    out = []
    for row in conn.execute(f"SELECT {', '.join(GPU_COLUMNS)} FROM gpu_samples WHERE {where} "
                            "ORDER BY t_monotonic_s", args):
        d = dict(zip(GPU_COLUMNS, row))
        d["stale"] = frozenset(x for x in (d["stale"] or "").split(",") if x)
        d["failed"] = frozenset(x for x in (d["failed"] or "").split(",") if x)
        out.append(GpuSample(**d))
    if gpu is None and out:
        first = out[0].gpu_index
        out = [s for s in out if s.gpu_index == first]
    return out


def _engine_steps(conn: sqlite3.Connection, t0: float, t1: float) -> list[EngineSample]:
    rows = conn.execute(f"SELECT {', '.join(ENGINE_COLUMNS)} FROM engine_steps WHERE "
                        "end_monotonic_s BETWEEN ? AND ? ORDER BY end_monotonic_s", (t0, t1))
    return [EngineSample(**dict(zip(ENGINE_COLUMNS, r))) for r in rows]


def replay_twin_snapshot(params: TwinParams, gpu: list[GpuSample],
                         steps: list[EngineSample]) -> Any | None:
    """The twin's latest snapshot computed from the window (where no live twin published
    one): the estimator over the samples and a forecast, as `ondo events replay` does."""
    from ondo.events.replay_twin import replay_snapshots

    snaps = replay_snapshots(params, gpu, [None] * len(gpu), steps)
    return snaps[-1] if snaps else None


def context_from_db(db: str | Path, incident_seq: int | None = None,
                    params: TwinParams | None = None,
                    window_s: float = WINDOW_S) -> IncidentContext:
    """The context of incident `incident_seq` (default: the latest) in `db`; LookupError if
    there is none, FileNotFoundError if `db` does not exist or holds no event log."""
    if not Path(db).exists():
        raise FileNotFoundError(f"--db {db}: no such file")
    params = params or h100_params()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        if not has_event_log(conn):
            raise FileNotFoundError(f"--db {db}: no event log in this database")
        incident = incident_entry(conn, incident_seq)
        t1 = float(incident["t_monotonic_s"])
        entries = _entries(conn, "WHERE seq <= ? AND t_monotonic_s >= ? ORDER BY seq",
                           (int(incident["seq"]), t1 - window_s))
        gpu_index = incident["subject"].get("gpu")
        gpu = _gpu_samples(conn, gpu_index if isinstance(gpu_index, int) else None,
                           t1 - window_s, t1)
        steps = _engine_steps(conn, t1 - window_s, t1)
    finally:
        conn.close()
    return build_context(incident, entries, gpu, steps, replay_twin_snapshot(params, gpu, steps),
                         params, window_s)
