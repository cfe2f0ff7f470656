"""What the console's pages and endpoints read and do, in one object.

Live (`ondo serve`): the server's event log, hub, governor and live twin; the series builder
on the hub; decisions appended to the log and applied to the governor; outcomes measured
after `outcome_after_s`. Offline (`ondo console --db`): the database alone, read-only.

Decisions are serialized by one lock: the proposal's state is folded from the log, checked,
and the decision appended before the next one is looked at, so two operators cannot both
approve the same proposal.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from ondo.console.actuate import (
    ActionRefused,
    Change,
    apply_change,
    checked_params,
    governor_view,
    plan_change,
)
from ondo.console.auth import Principal, Role, TokenStore
from ondo.console.entries import EntrySource, entry_dict
from ondo.console.history import (
    DEFAULT_MAX_POINTS,
    chart_from_db,
    chart_from_points,
    data_span,
    latest_governor,
    open_db,
    twin_state_at,
)
from ondo.console.outcomes import DEFAULT_AFTER_S, OutcomeLoop
from ondo.console.proposals import (
    APPLIED_ACTIONS,
    PROPOSAL_KINDS,
    DecisionRefused,
    Proposal,
    check_decision,
    fold_proposals,
    revision_id,
)
from ondo.console.series import SeriesBuilder
from ondo.console.whatif import LoadContext, what_if
from ondo.events.canonical import chain_hash
from ondo.events.log import EventLog
from ondo.events.schema import Event, EventDraft, EventKind
from ondo.events.verify import verify
from ondo.telemetry.schema import throttle_reason_names
from ondo.twin.params import TwinParams, h100_params

log = logging.getLogger(__name__)

WINDOW_AROUND_S = 60.0
MAX_RANGE_S = 7 * 86400.0


class ConsoleService:
    def __init__(self, *, db: str | Path | None, log_: EventLog | None = None,
                 hub: Any = None, governor: Any = None, twin: Any = None, store: Any = None,
                 async_llm: Any = None, params: TwinParams | None = None,
                 outcome_after_s: float = DEFAULT_AFTER_S, index_knowledge: bool = True) -> None:
        self.db = None if db is None else Path(db)
        self.live = log_ is not None or hub is not None
        self.log = log_
        self.governor = governor  # a ServerGovernor (set_policy/set_objectives/set_caps)
        self.twin = twin  # a LiveTwin (its latest snapshot)
        self.async_llm = async_llm
        self.params = params or (governor.governor.params if governor is not None
                                 else h100_params())
        self.tokens = TokenStore(self.db)
        self.entries = EntrySource(self.db, log_)
        self.series = SeriesBuilder(hub, store, governor.governor if governor else None) \
            if hub is not None else None
        self.outcomes = None
        if log_ is not None:
            self.outcomes = OutcomeLoop(
                log_, lambda t: self.series.points(since_t=t) if self.series else [],
                outcome_after_s, self.db if index_knowledge else None,
                lambda: {p.recommendation_id: _rec_payload(p) for p in self.proposals().values()})
        self._lock = threading.Lock()
        self._closing = False
        self._verified: tuple[int, dict[str, Any]] | None = None

    def serving(self) -> bool:
        """False once the server drains: live streams end so that shutdown need not wait."""
        a = self.async_llm
        return not self._closing and (a is None or bool(getattr(a, "is_accepting", True)))

    # -- reading ------------------------------------------------------------------------
    def now(self) -> float:
        """Wall time of "now": the clock live, the newest data offline."""
        if self.live or self.db is None:
            return time.time()
        conn = open_db(self.db)
        try:
            span = data_span(conn)
        finally:
            conn.close()
        return span[1] if span else time.time()

    def proposals(self) -> dict[str, Proposal]:
        return fold_proposals(self.entries.of_kinds(PROPOSAL_KINDS))

    def governor_state(self) -> dict[str, Any] | None:
        if self.governor is not None:
            return governor_view(self.governor)
        if self.db is None or not self.db.exists():
            return None
        conn = open_db(self.db)
        try:
            return latest_governor(conn)
        finally:
            conn.close()

    def chart(self, t0: float, t1: float, max_points: int = DEFAULT_MAX_POINTS
              ) -> tuple[int, dict[str, list[Any]]]:
        """From memory where it holds the whole range, else from the database."""
        if self.series is not None:
            pts = self.series.points()
            if pts and pts[0].t_wall_s <= t0 + 1 or self.db is None:
                return chart_from_points(pts, t0, t1, max_points)
        if self.db is None or not self.db.exists():
            return chart_from_points([], t0, t1, max_points)
        conn = open_db(self.db)
        try:
            return chart_from_db(conn, t0, t1, max_points)
        finally:
            conn.close()

    def overview(self, range_s: float, max_points: int = DEFAULT_MAX_POINTS) -> dict[str, Any]:
        range_s = min(max(10.0, range_s), MAX_RANGE_S)
        now = self.now()
        bucket_s, series = self.chart(now - range_s, now, max_points)
        bits = sorted({b for b in series["throttle_reasons"] if b})
        names = sorted({n for b in bits for n in throttle_reason_names(b)})
        return {"now": now, "range_s": range_s, "bucket_s": bucket_s, "live": self.live,
                "series": series, "governor": self.governor_state(),
                "head_seq": self.entries.head_seq(), "throttle_reason_names": names}

    def event_window(self, seq: int) -> dict[str, Any] | None:
        e = self.entries.get(seq)
        if e is None:
            return None
        t = float(e["t_wall_s"])
        bucket_s, series = self.chart(t - WINDOW_AROUND_S, t + WINDOW_AROUND_S, 240)
        return {"entry": e, "window_s": WINDOW_AROUND_S, "bucket_s": bucket_s, "series": series}

    def twin_state(self, t_wall_s: float | None) -> dict[str, float] | None:
        """The twin's state now (`t_wall_s` None) or at a past time."""
        if t_wall_s is None and self.twin is not None and self.twin.latest is not None:
            from ondo.console.series import TWIN_STATE_FIELDS

            snap = self.twin.latest
            return {f: float(getattr(snap, f)) for f in TWIN_STATE_FIELDS}
        t = self.now() if t_wall_s is None else t_wall_s
        if self.series is not None:
            for p in reversed(self.series.points()):
                if p.t_wall_s <= t and p.twin_state is not None:
                    return p.twin_state if t - p.t_wall_s < 60 else None
        if self.db is None or not self.db.exists():
            return None
        conn = open_db(self.db)
        try:
            return twin_state_at(conn, t)
        finally:
            conn.close()

    def whatif(self, prop: Proposal) -> dict[str, Any]:
        """The twin's what-if for `prop`: from now while it is pending, else from when it was
        proposed."""
        state = self.twin_state(None if prop.status == "pending" else prop.t_wall_s)
        if state is None:
            return {"available": False, "why": "no twin state (the twin runs with GPU telemetry)"}
        gov = self.governor_state() or {}
        limits = gov.get("limits") or {}
        objectives = gov.get("objectives") or {}
        configured = gov.get("configured") or {}
        running = None
        if self.series is not None:
            pts = [p for p in self.series.points() if p.num_running is not None]
            running = pts[-1].num_running if pts else None
        pending = prop.status == "pending"  # else the limits in force may be its own
        budget = (limits.get("max_num_batched_tokens") if pending else None) \
            or configured.get("max_num_batched_tokens")
        ctx = LoadContext(running, budget,
                          objectives.get("power_budget_w"), objectives.get("temp_target_c"))
        out = what_if(prop.action, prop.params, self.params, state, ctx)
        out["available"] = True
        out["from"] = "now" if prop.status == "pending" else "the time it was proposed"
        return out

    def audit(self) -> dict[str, Any]:
        props = self.proposals()
        decisions = []
        for p in props.values():
            for d in p.decisions:
                decisions.append({"seq": d.seq, "t_wall_s": d.t_wall_s, "operator": d.operator,
                                  "decision": d.decision, "comment": d.comment,
                                  "recommendation_id": p.recommendation_id, "action": p.action,
                                  "params": p.params, "status": p.status,
                                  "applied": p.applied, "outcome": p.outcome})
            if p.proposed_by is not None:
                decisions.append({"seq": p.seq, "t_wall_s": p.t_wall_s,
                                  "operator": p.proposed_by,
                                  "decision": "revise" if p.revision_of else "propose",
                                  "comment": p.rationale, "recommendation_id": p.recommendation_id,
                                  "action": p.action, "params": p.params, "status": p.status,
                                  "applied": p.applied, "outcome": p.outcome,
                                  "revision_of": p.revision_of})
        decisions.sort(key=lambda d: -d["seq"])
        return {"decisions": decisions, "chain": self.chain_status()}

    def chain_status(self) -> dict[str, Any]:
        head = self.entries.head_seq()
        if self._verified is not None and self._verified[0] == head:
            return self._verified[1]
        try:
            r = verify(self.db) if self.db is not None else None
        except (FileNotFoundError, ValueError):  # no database yet, or no log in it
            r = None
        if r is not None:
            out = {"scope": "database", "ok": r.ok, "entries": r.entries,
                   "head_hash": r.head_hash, "bad_seq": r.bad_seq, "reason": r.reason,
                   "describe": r.describe(), "log_head": head}
        else:
            out = self._verify_memory()
        out["checked_wall_s"] = time.time()
        self._verified = (head, out)
        return out

    def _verify_memory(self) -> dict[str, Any]:
        recent = self.log.recent() if self.log is not None else []
        prev = recent[0].prev_hash if recent else ""
        for e in recent:
            if e.prev_hash != prev or chain_hash(e.prev_hash, e.body) != e.hash:
                return {"scope": "memory", "ok": False, "entries": 0, "bad_seq": e.seq,
                        "reason": "its hash does not chain", "head_hash": prev,
                        "describe": f"entry {e.seq}: its hash does not chain",
                        "log_head": self.entries.head_seq()}
            prev = e.hash
        n = len(recent)
        return {"scope": "memory", "ok": True, "entries": n, "bad_seq": None, "reason": "",
                "head_hash": prev, "log_head": self.entries.head_seq(),
                "describe": f"ok: the last {n} entries in memory chain (no database)"}

    # -- deciding -----------------------------------------------------------------------
    def _writable(self) -> EventLog:
        if self.log is None:
            raise DecisionRefused(409, "this console reviews a stored database: decisions are "
                                       "taken on the live server")
        return self.log

    def _append(self, kind: EventKind, subject: dict[str, Any], payload: dict[str, Any],
                evidence: tuple[str, ...]) -> Event:
        assert self.log is not None
        return self.log.append(EventDraft(kind, time.monotonic(), time.time(), subject,
                                          payload, evidence))

    def approve(self, rid: str, who: Principal, comment: str | None) -> dict[str, Any]:
        self._writable()
        with self._lock:
            prop = check_decision(self.proposals().get(rid), who, "approve", rid)
            change = Change(prop.action, prop.params)
            if prop.action in APPLIED_ACTIONS:
                try:
                    change = plan_change(prop.action, prop.params, self.governor)
                except ActionRefused as e:
                    raise DecisionRefused(409, f"{rid} cannot be applied now: {e}") from None
            decision = self._decide(prop, who, "approve", comment)
            out: dict[str, Any] = {"recommendation_id": rid, "decision_seq": decision.seq,
                                   "applied": False}
            if change.applies:
                out.update(self._apply(prop, change, decision))
        return out

    def _decide(self, prop: Proposal, who: Principal, decision: str,
                comment: str | None) -> Event:
        payload: dict[str, Any] = {"recommendation_id": prop.recommendation_id,
                                   "decision": decision, "operator": who.name}
        if comment:
            payload["comment"] = comment
        event = self._append(EventKind.OPERATOR_DECISION,
                             {"recommendation_id": prop.recommendation_id, "operator": who.name},
                             payload, (f"event:{prop.seq}",))
        if self.outcomes is not None:
            self.outcomes.index(event)
        return event

    def _apply(self, prop: Proposal, change: Change, decision: Event) -> dict[str, Any]:
        action_id = f"act-{decision.seq}"
        try:
            state = apply_change(change, self.governor)
        except Exception as e:  # recorded: the decision stands, the action did not happen
            log.exception("console: %s could not be applied", prop.recommendation_id)
            self._append(EventKind.ACTION_OUTCOME, {"action_id": action_id},
                         {"action_id": action_id, "outcome": f"not applied: {e}"[:200],
                          "metrics": {}, "recommendation_id": prop.recommendation_id,
                          "action": prop.action}, (f"event:{decision.seq}",))
            return {"applied": False, "error": str(e)}
        applied = self._append(EventKind.ACTION_APPLIED,
                               {"action_id": action_id,
                                "recommendation_id": prop.recommendation_id},
                               {"action_id": action_id, "action": prop.action,
                                "parameters": prop.params,
                                "recommendation_id": prop.recommendation_id},
                               (f"event:{decision.seq}",))
        if self.outcomes is not None:
            self.outcomes.schedule(applied, prop.recommendation_id, prop.action, prop.params)
        log.info("console: %s applied %s %s", action_id, prop.action, prop.params)
        return {"applied": True, "action_id": action_id, "applied_seq": applied.seq,
                "governor": state,
                "outcome_after_s": self.outcomes.after_s if self.outcomes else None}

    def reject(self, rid: str, who: Principal, reason: str) -> dict[str, Any]:
        self._writable()
        with self._lock:
            prop = check_decision(self.proposals().get(rid), who, "reject", rid)
            decision = self._decide(prop, who, "reject", reason)
        return {"recommendation_id": rid, "decision_seq": decision.seq, "applied": False}

    def revise(self, rid: str, who: Principal, params: dict[str, Any],
               comment: str | None) -> dict[str, Any]:
        self._writable()
        with self._lock:
            props = self.proposals()
            prop = check_decision(props.get(rid), who, "revise", rid)
            try:
                checked = checked_params(prop.action, params, self.governor)
            except ActionRefused as e:
                raise DecisionRefused(422, f"params: {e}") from None
            new_id = revision_id(props, prop)
            why = f"revised by {who.name}: {comment}" if comment else \
                f"revised by {who.name} from {rid}"
            payload: dict[str, Any] = {
                "recommendation_id": new_id, "action": prop.action, "parameters": checked,
                "rationale": why[:300], "source": "revision", "proposed_by": who.name,
                "revision_of": rid}
            for k, v in (("confidence", prop.confidence), ("urgency", prop.urgency),
                         ("runbook", prop.runbook)):
                if v is not None:
                    payload[k] = v
            subject: dict[str, Any] = {"recommendation_id": new_id}
            if prop.incident is not None:
                subject["incident"] = prop.incident
            event = self._append(EventKind.RECOMMENDATION_ISSUED, subject, payload,
                                 (f"event:{prop.seq}", *(f"event:{s}" for s in prop.evidence)))
        return {"recommendation_id": new_id, "seq": event.seq, "revision_of": rid}

    def propose(self, who: Principal, action: str, params: dict[str, Any], rationale: str,
                urgency: str | None, evidence: list[int]) -> dict[str, Any]:
        self._writable()
        if not who.role.allows(Role.OPERATOR):
            raise DecisionRefused(403, f"the {who.role.value} role cannot propose: an operator "
                                       "or admin token is needed")
        try:
            checked = checked_params(action, params, self.governor)
        except ActionRefused as e:
            raise DecisionRefused(422, f"params: {e}") from None
        for s in evidence:
            if self.entries.get(s) is None:
                raise DecisionRefused(422, f"evidence: there is no entry {s}")
        with self._lock:
            rid = f"man-{secrets.token_hex(5)}"
            payload: dict[str, Any] = {"recommendation_id": rid, "action": action,
                                       "parameters": checked, "rationale": rationale,
                                       "source": "manual", "proposed_by": who.name}
            if urgency:
                payload["urgency"] = urgency
            event = self._append(EventKind.RECOMMENDATION_ISSUED, {"recommendation_id": rid},
                                 payload, tuple(f"event:{s}" for s in evidence))
        return {"recommendation_id": rid, "seq": event.seq}

    def close(self) -> None:
        self._closing = True
        if self.outcomes is not None:
            self.outcomes.close()
        if self.series is not None:
            self.series.close()


def _rec_payload(p: Proposal) -> dict[str, Any]:
    return {"action": p.action, "parameters": p.params, "rationale": p.rationale}


__all__ = ["ConsoleService", "DecisionRefused", "entry_dict"]
