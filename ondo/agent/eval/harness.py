"""`ondo agent eval`: every scripted incident end to end, and retrieval on the labelled set.

For each incident: its telemetry is replayed through the detectors into a fresh database
(`incidents.py`), the knowledge base is built in that file (runbooks, then the log), the
latest incident's context is read back from the file, the agent recommends (the model
under the schema where an endpoint is given, the rules otherwise or as the fallback), the
recommendation is appended to the log and the chain verified. Checked for each:

- valid: the final recommendation passes the same check a model's answer passes;
- cites: at least one evidence id, each an entry of that database, and a runbook section
  that exists;
- right: its action is the incident's expected action (the rules' answer is scored beside
  it: the baseline).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ondo.agent.actions import GpuLimits
from ondo.agent.agent import Agent, recommendation_draft
from ondo.agent.client import ModelEndpoint
from ondo.agent.context import context_from_db
from ondo.agent.eval.incidents import INCIDENTS, Incident
from ondo.agent.eval.retrieval_set import LABELLED, RetrievalScore, score_retrieval
from ondo.agent.knowledge import KnowledgeBase
from ondo.agent.recommendation import InvalidRecommendation, parse_recommendation
from ondo.agent.record import append_to_db
from ondo.agent.runbook import load_runbooks, runbook_by_id
from ondo.events.verify import verify
from ondo.twin.params import TwinParams, h100_params


@dataclass
class IncidentOutcome:
    name: str
    expected_action: str
    expected_runbook: str
    events: int
    incident_seq: int
    incident_kind: str
    retrieved: list[str]
    action: str
    runbook: str
    source: str
    fallback_reason: str | None
    rules_action: str
    rules_runbook: str
    valid: bool
    cites: bool
    right: bool
    rules_right: bool
    chain_ok: bool
    latency_s: float
    model_latency_s: float | None
    recommendation: dict[str, Any]


@dataclass
class EvalReport:
    endpoint: str | None
    outcomes: list[IncidentOutcome]
    retrieval: list[RetrievalScore]
    labelled_queries: int

    def summary(self) -> dict[str, Any]:
        n = len(self.outcomes)
        pct = lambda k: round(100.0 * sum(getattr(o, k) for o in self.outcomes) / n, 1)  # noqa
        lat = [o.latency_s for o in self.outcomes]
        return {
            "incidents": n, "endpoint": self.endpoint,
            "valid_pct": pct("valid"), "cites_pct": pct("cites"), "chain_ok_pct": pct("chain_ok"),
            "action_right_pct": pct("right"), "rules_action_right_pct": pct("rules_right"),
            "model_answered": sum(o.source == "model" for o in self.outcomes),
            "fallbacks": sum(o.source == "rules" for o in self.outcomes),
            "retrieval_hit_pct": round(100.0 * sum(o.expected_runbook in o.retrieved
                                                   for o in self.outcomes) / n, 1),
            "latency_s_p50": round(statistics.median(lat), 3) if lat else None,
            "latency_s_max": round(max(lat), 3) if lat else None,
            "retrieval_recall_at_3": {s.mode: round(s.recall_at_3, 3) for s in self.retrieval},
            "retrieval_recall_at_1": {s.mode: round(s.recall_at_1, 3) for s in self.retrieval},
            "labelled_queries": self.labelled_queries,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "incidents": [asdict(o) for o in self.outcomes],
                "retrieval": [asdict(s) for s in self.retrieval]}


def _entry_ids(db: Path) -> set[int]:
    import sqlite3

    conn = sqlite3.connect(str(db))
    try:
        return {int(r[0]) for r in conn.execute("SELECT seq FROM events")}
    finally:
        conn.close()


def trigger_seq(db: Path, kind: str) -> int:
    import sqlite3

    conn = sqlite3.connect(str(db))
    try:
        row = conn.execute("SELECT MAX(seq) FROM events WHERE kind = ?", (kind,)).fetchone()
    finally:
        conn.close()
    if row[0] is None:
        raise LookupError(f"{db}: the detectors found no {kind}")
    return int(row[0])


def run_incident(inc: Incident, folder: Path, endpoint: ModelEndpoint | None,
                 params: TwinParams) -> IncidentOutcome:
    db = folder / f"{inc.name}.db"
    summary = inc.build(db, params)
    limits = GpuLimits.from_params(params)
    # Read with sqlite3 before apsw opens the file: one process keeps one copy of SQLite on
    # a file at a time (process.py says why).
    ctx = context_from_db(db, trigger_seq(db, inc.trigger), params=params)
    kb = KnowledgeBase(db)
    try:
        kb.sync_runbooks()
        kb.index_log()
        result = Agent(kb, endpoint, limits).recommend(ctx)
    finally:
        kb.close()
    rec = result.recommendation
    books = runbook_by_id(load_runbooks())
    ids = _entry_ids(db)
    try:
        d = rec.as_dict()
        parse_recommendation({k: d[k] for k in ("runbook", "action", "params",
                                                "evidence_event_ids", "urgency",
                                                "confidence", "rationale")},
                             event_ids=ids, runbooks=books, limits=limits)
        valid = True
    except InvalidRecommendation:
        valid = False
    book = books.get(rec.runbook_id)
    cites = bool(rec.evidence_event_ids) and all(i in ids for i in rec.evidence_event_ids) \
        and book is not None and book.section(rec.runbook_section) is not None
    append_to_db(db, recommendation_draft(rec, ctx, float(ctx.incident["t_monotonic_s"]),
                                          float(ctx.incident["t_wall_s"])))
    chain_ok = verify(db).ok
    return IncidentOutcome(
        inc.name, inc.expected_action, inc.expected_runbook, summary.events,
        int(ctx.incident["seq"]), ctx.incident["kind"], result.runbooks, rec.action,
        rec.runbook_id, rec.source, rec.fallback_reason, result.rules.action,
        result.rules.runbook_id, valid, cites, rec.action == inc.expected_action,
        result.rules.action == inc.expected_action, chain_ok, result.latency_s,
        result.model_latency_s, rec.as_dict())


def run_eval(endpoint: ModelEndpoint | None, incidents: Sequence[Incident] = INCIDENTS,
             folder: str | Path | None = None, params: TwinParams | None = None,
             progress=None) -> EvalReport:
    params = params or h100_params()
    with tempfile.TemporaryDirectory(prefix="ondo-agent-eval-") as tmp:
        work = Path(folder) if folder else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        kb = KnowledgeBase(work / "retrieval.db")
        try:
            kb.sync_runbooks()
            retrieval = score_retrieval(kb)
        finally:
            kb.close()
        outcomes = []
        for inc in incidents:
            t0 = time.perf_counter()
            out = run_incident(inc, work, endpoint, params)
            outcomes.append(out)
            if progress is not None:
                progress(out, time.perf_counter() - t0)
    return EvalReport(None if endpoint is None else endpoint.base_url, outcomes, retrieval,
                      len(LABELLED))


def report_text(report: EvalReport) -> str:
    s = report.summary()
    lines = [f"{'incident':28s} {'expected':23s} {'agent':23s} {'src':5s} {'rules':23s} "
             f"{'ok':3s} {'top3':4s} {'s':>6s}"]
    for o in report.outcomes:
        top3 = "yes" if o.expected_runbook in o.retrieved else "no"
        lines.append(f"{o.name:28s} {o.expected_action:23s} {o.action:23s} {o.source:5s} "
                     f"{o.rules_action:23s} {'yes' if o.right else 'NO':3s} {top3:4s} "
                     f"{o.latency_s:6.2f}")
        if o.source == "rules" and o.fallback_reason and o.fallback_reason != "rules only":
            lines.append(f"{'':28s} fallback: {o.fallback_reason[:100]}")
    lines.append("")
    lines.append(f"{s['incidents']} incidents; endpoint {s['endpoint'] or 'none (rules only)'}")
    lines.append(f"schema-valid {s['valid_pct']}%, citing a real entry and a runbook "
                 f"{s['cites_pct']}%, chain verified {s['chain_ok_pct']}%")
    lines.append(f"expected action: agent {s['action_right_pct']}% "
                 f"({s['model_answered']} answered by the model, {s['fallbacks']} by the "
                 f"rules), rules alone {s['rules_action_right_pct']}%")
    lines.append(f"expected runbook among the 3 retrieved: {s['retrieval_hit_pct']}%")
    lines.append(f"latency: median {s['latency_s_p50']} s, max {s['latency_s_max']} s")
    lines.append(f"retrieval on {s['labelled_queries']} labelled queries:")
    for r in report.retrieval:
        lines.append(f"  {r.mode:7s} recall@1 {r.recall_at_1:.3f}  recall@3 {r.recall_at_3:.3f}")
    return "\n".join(lines)


def report_json(report: EvalReport) -> str:
    return json.dumps(report.as_dict(), default=str)
