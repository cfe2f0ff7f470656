"""The console's JSON bodies and answers (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ondo.agent.actions import ACTIONS, URGENCIES

Action = Literal[ACTIONS]  # type: ignore[valid-type]
Urgency = Literal[URGENCIES]  # type: ignore[valid-type]
RoleName = Literal["viewer", "operator", "admin"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _non_blank(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("must not be blank")
    return None if v is None else v.strip()


class ApproveBody(_Body):
    comment: str | None = Field(None, max_length=500)

    _blank = field_validator("comment")(_non_blank)


class RejectBody(_Body):
    reason: str = Field(..., min_length=1, max_length=500,
                        description="why the proposal is rejected (it is indexed for the agent)")

    _blank = field_validator("reason")(_non_blank)


class ReviseBody(_Body):
    params: dict[str, Any] = Field(..., description="the action's parameters, all of them")
    comment: str | None = Field(None, max_length=300)

    _blank = field_validator("comment")(_non_blank)


class ProposeBody(_Body):
    action: Action
    params: dict[str, Any] = Field(default_factory=dict)
    rationale: str = Field(..., min_length=3, max_length=300)
    urgency: Urgency | None = None
    evidence: list[int] = Field(default_factory=list, max_length=8,
                                description="sequence numbers of the entries it rests on")

    _blank = field_validator("rationale")(_non_blank)

    @field_validator("evidence")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError("entry sequence numbers start at 1")
        return v


class TokenCreateBody(_Body):
    role: RoleName
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class DecisionResult(BaseModel):
    recommendation_id: str
    decision_seq: int
    applied: bool
    action_id: str | None = None
    applied_seq: int | None = None
    governor: dict[str, Any] | None = None
    outcome_after_s: float | None = None
    error: str | None = None


class RevisionResult(BaseModel):
    recommendation_id: str
    seq: int
    revision_of: str


class ProposalResult(BaseModel):
    recommendation_id: str
    seq: int


class DecisionOut(BaseModel):
    seq: int
    t_wall_s: float
    decision: str
    operator: str
    comment: str | None = None


class ProposalOut(BaseModel):
    recommendation_id: str
    seq: int
    t_wall_s: float
    action: str
    params: dict[str, Any]
    rationale: str
    evidence: list[int]
    source: str
    proposed_by: str | None = None
    confidence: float | None = None
    urgency: str | None = None
    runbook: dict[str, str] | None = None
    incident: int | None = None
    revision_of: str | None = None
    revised_by: str | None = None
    status: str
    decisions: list[DecisionOut]
    applied: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    fallback_reason: str | None = None
    model: str | None = None


class ProposalList(BaseModel):
    proposals: list[ProposalOut]
    counts: dict[str, int]


class EvidenceOut(BaseModel):
    seq: int
    kind: str | None = None
    severity: str | None = None
    t_wall_s: float | None = None
    summary: str


class RunbookSectionOut(BaseModel):
    id: str
    title: str
    section: str
    heading: str
    text: str


class ProposalDetail(BaseModel):
    proposal: ProposalOut
    evidence: list[EvidenceOut]
    runbook: RunbookSectionOut | None = None
    whatif: dict[str, Any]
    revisions: list[str]
    param_schema: dict[str, Any]


class OverviewOut(BaseModel):
    now: float
    range_s: float
    bucket_s: int
    live: bool
    series: dict[str, list[Any]]
    governor: dict[str, Any] | None = None
    head_seq: int
    throttle_reason_names: list[str]


class EntriesOut(BaseModel):
    entries: list[dict[str, Any]]
    next_before_seq: int | None = None
    head_seq: int


class EventWindowOut(BaseModel):
    entry: dict[str, Any]
    window_s: float
    bucket_s: int
    series: dict[str, list[Any]]


class AuditOut(BaseModel):
    decisions: list[dict[str, Any]]
    chain: dict[str, Any]


class WhoAmI(BaseModel):
    name: str
    role: str
    live: bool
    tokens_configured: bool


class TokenOut(BaseModel):
    token_id: str
    name: str
    role: str
    created_wall_s: float
    revoked_wall_s: float | None = None


class TokenCreated(TokenOut):
    token: str = Field(..., description="shown once: only its SHA-256 is stored")


class TokenList(BaseModel):
    tokens: list[TokenOut]


class Revoked(BaseModel):
    token_id: str
    revoked: bool
