"""Proposals and what became of them, folded from the event log; the rules of deciding.

The log is the only store: a proposal is a `recommendation_issued` entry (the agent's, a
person's manual one, or a revision of either), and its state follows from the entries that
name its `recommendation_id` after it:

    pending ──approve──► approved ──(the action took effect)──► applied ──► outcome recorded
       │
       ├──reject (with a reason)──► rejected
       └──revise (new parameters)──► revised; the revision is a new pending proposal
                                     whose `revision_of` names this one

Deciding (`check_decision`) is pure: it says whether a principal may take a decision on a
proposal in its present state, or why not, with the HTTP status that says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ondo.console.auth import Principal, Role

PROPOSAL_KINDS = ("recommendation_issued", "operator_decision", "action_applied",
                  "action_outcome")
STATUSES = ("pending", "approved", "applied", "rejected", "revised")
# Actions the console carries out itself; the others are for a person (approving one records
# that a person takes it on).
APPLIED_ACTIONS = ("set_power_budget", "set_governor_policy", "cap_running_sequences",
                   "set_token_budget", "set_temperature_target")


@dataclass
class Decision:
    seq: int
    t_wall_s: float
    decision: str  # approve, reject, defer
    operator: str
    comment: str | None


@dataclass
class Proposal:
    recommendation_id: str
    seq: int
    t_wall_s: float
    action: str
    params: dict[str, Any]
    rationale: str
    evidence: list[int]  # entry seqs it rests on
    source: str  # model, rules, manual, revision
    proposed_by: str | None  # a person's name (manual proposals and revisions)
    confidence: float | None = None
    urgency: str | None = None
    runbook: dict[str, str] | None = None
    incident: int | None = None
    revision_of: str | None = None
    revised_by: str | None = None  # the revision that replaced this one
    status: str = "pending"
    decisions: list[Decision] = field(default_factory=list)
    applied: dict[str, Any] | None = None  # the action_applied entry's seq, id, time
    outcome: dict[str, Any] | None = None  # the action_outcome entry's seq, outcome, metrics
    fallback_reason: str | None = None
    model: str | None = None

    @property
    def decision(self) -> Decision | None:
        return self.decisions[-1] if self.decisions else None


def _evidence_seqs(evidence: Iterable[str]) -> list[int]:
    out = []
    for ref in evidence:
        if isinstance(ref, str) and ref.startswith("event:") and ref[6:].isdigit():
            out.append(int(ref[6:]))
    return out


def fold_proposals(entries: Iterable[dict[str, Any]]) -> dict[str, Proposal]:
    """Proposals by id from log entries (dicts as `read_events` gives them) in seq order."""
    props: dict[str, Proposal] = {}
    by_action: dict[str, str] = {}  # action_id -> recommendation_id
    for e in entries:
        kind, p = e["kind"], e["payload"]
        if kind == "recommendation_issued":
            rid = p["recommendation_id"]
            props[rid] = Proposal(
                rid, int(e["seq"]), float(e["t_wall_s"]), p["action"], dict(p["parameters"]),
                p["rationale"], _evidence_seqs(e.get("evidence", ())),
                p.get("source", "model"), p.get("proposed_by"), p.get("confidence"),
                p.get("urgency"), p.get("runbook"), e["subject"].get("incident"),
                p.get("revision_of"), fallback_reason=p.get("fallback_reason"),
                model=p.get("model"))
            parent = props.get(p.get("revision_of") or "")
            if parent is not None:
                parent.revised_by, parent.status = rid, "revised"
        elif kind == "operator_decision":
            prop = props.get(p["recommendation_id"])
            if prop is None:
                continue
            d = Decision(int(e["seq"]), float(e["t_wall_s"]), p["decision"], p["operator"],
                         p.get("comment"))
            prop.decisions.append(d)
            if d.decision == "approve":
                prop.status = "approved"
            elif d.decision == "reject":
                prop.status = "rejected"
        elif kind == "action_applied":
            prop = props.get(p.get("recommendation_id") or "")
            by_action[p["action_id"]] = p.get("recommendation_id") or ""
            if prop is not None:
                prop.applied = {"seq": int(e["seq"]), "action_id": p["action_id"],
                                "t_wall_s": float(e["t_wall_s"]),
                                "parameters": p["parameters"]}
                prop.status = "applied"
        elif kind == "action_outcome":
            rid = p.get("recommendation_id") or by_action.get(p["action_id"], "")
            prop = props.get(rid)
            if prop is not None:
                prop.outcome = {"seq": int(e["seq"]), "outcome": p["outcome"],
                                "metrics": p["metrics"], "t_wall_s": float(e["t_wall_s"])}
    return props


class DecisionRefused(Exception):
    """A decision that may not be taken; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_decision(prop: Proposal | None, who: Principal, decision: str,
                   recommendation_id: str = "") -> Proposal:
    """The proposal, if `who` may `decision` ("approve", "reject", "revise") it now."""
    if not who.role.allows(Role.OPERATOR):
        raise DecisionRefused(403, f"the {who.role.value} role cannot {decision}: an operator "
                                   "or admin token is needed")
    if prop is None:
        raise DecisionRefused(404, f"no recommendation {recommendation_id!r}")
    if prop.status != "pending":
        last = prop.decision
        by = f" by {last.operator}" if last is not None else ""
        if prop.status == "revised":
            by = f" by revision {prop.revised_by}"
        raise DecisionRefused(409, f"recommendation {prop.recommendation_id} is already "
                                   f"{prop.status}{by}")
    if decision == "approve" and prop.proposed_by is not None and prop.proposed_by == who.name:
        raise DecisionRefused(403, f"{who.name} proposed {prop.recommendation_id}: another "
                                   "operator must approve it")
    return prop


def revision_id(props: dict[str, Proposal], prop: Proposal) -> str:
    """The id of the next revision in `prop`'s chain: the first proposal's id, `-r` and the
    revision's number."""
    root = prop
    while root.revision_of is not None and root.revision_of in props:
        root = props[root.revision_of]
    n = 2
    while f"{root.recommendation_id}-r{n}" in props:
        n += 1
    return f"{root.recommendation_id}-r{n}"
