"""The agent: an incident's context -> retrieval -> the model under a JSON schema -> the check
-> a `Recommendation`, or the rules' when the model cannot give a valid one.

    agent = Agent(kb, ModelEndpoint("http://127.0.0.1:8000/v1"), limits)
    result = agent.recommend(context_from_db("ondo.db"))
    result.recommendation          # source "model", or "rules" with its fallback_reason

Deciding only: it proposes and never acts. Where the recommendation goes (the event log, a
console) is the caller's (`record.py`, `live.py`, the CLI). Every step's output is kept in
the `AgentResult` (query, hits, prompt, schema, raw answer), so that what the model was
shown and what it said can be read back.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ondo.agent.actions import GpuLimits
from ondo.agent.client import ModelEndpoint, ModelUnavailable, ask_model
from ondo.agent.context import IncidentContext
from ondo.agent.knowledge import KnowledgeBase
from ondo.agent.prompt import (
    Proposal,
    build_messages,
    fact_words,
    incident_summary,
    prompt_entries,
    proposals,
    retrieval_queries,
)
from ondo.agent.recommendation import (
    InvalidRecommendation,
    Recommendation,
    parse_recommendation,
    recommendation_schema,
)
from ondo.agent.retrieval import Hit, search, search_runbooks_multi
from ondo.agent.rules import rules_recommendation
from ondo.agent.runbook import Runbook, load_runbooks, runbook_by_id
from ondo.events.schema import EventDraft, EventKind

RUNBOOKS_RETRIEVED = 3
# What the model chooses from: the best runbook's first action, or to hand the incident to a
# person, or to do nothing (a 135M model picks badly among several runbooks and actions;
# a larger one behind --agent-base-url can be shown more).
RUNBOOKS_SHOWN = 1
ACTIONS_SHOWN = 1
PAST_SHOWN = 2
ALWAYS_ALLOWED = ("page_human", "no_action")


@dataclass
class AgentResult:
    recommendation: Recommendation
    rules: Recommendation  # what the rules alone say (the baseline)
    context: IncidentContext
    query: str
    runbooks: list[str]  # retrieved, best first
    hits: list[Hit]  # the runbook sections behind them
    past: list[Hit]
    proposals: list[Proposal]
    messages: list[dict[str, str]] | None = None
    schema: dict[str, Any] | None = None
    answer: str | None = None  # the model's raw content
    model_latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self, full: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "incident": {"seq": self.context.incident["seq"],
                         "kind": self.context.incident["kind"]},
            "recommendation": self.recommendation.as_dict(),
            "rules": self.rules.as_dict(),
            "retrieved_runbooks": self.runbooks,
            "hits": [h.as_dict() for h in self.hits[:6]],
            "past": [h.as_dict() for h in self.past],
            "latency_s": round(self.latency_s, 3),
            "model_latency_s": None if self.model_latency_s is None
            else round(self.model_latency_s, 3),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "answer": self.answer}
        if full:
            d.update(facts=self.context.facts, messages=self.messages, schema=self.schema,
                     query=self.query)
        return d


class Agent:
    def __init__(self, kb: KnowledgeBase, endpoint: ModelEndpoint | None,
                 limits: GpuLimits | None = None,
                 runbooks: tuple[Runbook, ...] | None = None,
                 runbooks_shown: int = RUNBOOKS_SHOWN, actions_shown: int = ACTIONS_SHOWN) -> None:
        if runbooks_shown < 1 or actions_shown < 1:
            raise ValueError("the agent must show the model at least one runbook and action")
        self.runbooks_shown, self.actions_shown = runbooks_shown, actions_shown
        self.kb = kb
        self.endpoint = endpoint  # None: rules only
        self.limits = limits or GpuLimits()
        self.books = runbook_by_id(runbooks or load_runbooks())

    def recommend(self, ctx: IncidentContext) -> AgentResult:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        queries = retrieval_queries(ctx)
        query = "; ".join(queries)
        # What the facts say, where they say anything, tells apart cases that share events.
        ids, hits = search_runbooks_multi(self.kb, queries, n=RUNBOOKS_RETRIEVED,
                                          lead=bool(fact_words(ctx)))
        past = search(self.kb, query, kinds=("recommendation", "decision"), k=PAST_SHOWN) \
            if self.kb.count("decision") + self.kb.count("recommendation") else []
        timings["retrieval"] = time.perf_counter() - t0
        books = [self.books[i] for i in ids if i in self.books][:self.runbooks_shown]
        props = proposals(ctx, books, self.limits, per_runbook=self.actions_shown)
        rules = self._rules(ctx, "rules only")
        result = AgentResult(rules, rules, ctx, query, ids, hits, past, props)
        if self.endpoint is not None:
            t_ask = time.perf_counter()
            self._ask(result, books)
            timings["model"] = time.perf_counter() - t_ask  # answered or not
        result.latency_s = time.perf_counter() - t0
        timings["total"] = result.latency_s
        result.timings_s = timings
        return result

    def _rules(self, ctx: IncidentContext, why: str) -> Recommendation:
        return rules_recommendation(ctx, self.books, self.limits, fallback_reason=why)

    def _ask(self, result: AgentResult, books: list[Runbook]) -> None:
        assert self.endpoint is not None
        ctx = result.context
        pairs = [(p.runbook_id, p.action) for p in result.proposals]
        shown = [int(e["seq"]) for e in prompt_entries(ctx)]
        result.schema = recommendation_schema(pairs, shown, books or self.books.values(),
                                              self.limits, ALWAYS_ALLOWED,
                                              rationale_prefix=incident_summary(ctx))
        result.messages = build_messages(ctx, books, result.proposals, result.past)
        try:
            answer = ask_model(self.endpoint, result.messages, result.schema)
        except ModelUnavailable as e:
            result.prompt_tokens = e.usage.get("prompt_tokens")
            result.completion_tokens = e.usage.get("completion_tokens")
            result.recommendation = self._rules(ctx, f"model unavailable: {e}")
            return
        result.answer, result.model_latency_s = answer.content, answer.latency_s
        result.prompt_tokens, result.completion_tokens = answer.prompt_tokens, \
            answer.completion_tokens
        try:
            result.recommendation = parse_recommendation(
                answer.content, event_ids=ctx.event_ids, runbooks=self.books,
                limits=self.limits, model=answer.model)
        except InvalidRecommendation as e:
            result.recommendation = self._rules(ctx, f"invalid answer: {e}")


def recommendation_id(rec: Recommendation, incident_seq: int) -> str:
    digest = hashlib.sha256(json.dumps(rec.as_dict(), sort_keys=True).encode()).hexdigest()
    return f"rec-{incident_seq}-{digest[:10]}"


def recommendation_draft(rec: Recommendation, ctx: IncidentContext, t_monotonic_s: float,
                         t_wall_s: float) -> EventDraft:
    """The `recommendation_issued` entry for `rec`; its evidence names the entries cited."""
    seq = int(ctx.incident["seq"])
    payload: dict[str, Any] = {
        "recommendation_id": recommendation_id(rec, seq), "action": rec.action,
        "parameters": dict(rec.params), "rationale": rec.rationale,
        "confidence": rec.confidence, "urgency": rec.urgency,
        "runbook": {"id": rec.runbook_id, "section": rec.runbook_section},
        "source": rec.source}
    if rec.model is not None:
        payload["model"] = rec.model
    if rec.fallback_reason is not None:
        payload["fallback_reason"] = rec.fallback_reason[:300]
    subject = {"recommendation_id": payload["recommendation_id"], "incident": seq}
    gpu = ctx.incident["subject"].get("gpu")
    if isinstance(gpu, int):
        subject["gpu"] = gpu
    return EventDraft(EventKind.RECOMMENDATION_ISSUED, t_monotonic_s, t_wall_s, subject,
                      payload, tuple(f"event:{i}" for i in rec.evidence_event_ids))
