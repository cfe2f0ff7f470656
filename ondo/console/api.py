"""The console's JSON endpoints and its live stream, under /console/api.

Every read needs a viewer (a token in the `Authorization: Bearer` header or the console's
cookie; nothing where no token exists, see `auth.py`); every change needs an operator or an
admin, with the token in the header. Errors have the server's OpenAI shape (`{"error":
{"message", "type", "param", "code"}}`), with the status that says why: 401 no or bad token,
403 the role may not (or a person approving their own proposal), 404 no such proposal, 409
not in a state to decide (or a read-only console), 400 bad parameters, naming them.

`GET /console/api/stream` is Server-Sent Events: `entry` events (the log's entries, `id` =
their sequence number, so a reconnecting browser resumes with `Last-Event-ID` and gets every
entry after it exactly once) and `point` events (the overview's 1 s points, no id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ondo.console import models as m
from ondo.console.auth import ANONYMOUS, COOKIE, Principal, Role, TokenStore
from ondo.console.history import chart_row
from ondo.console.proposals import STATUSES, DecisionRefused, Proposal
from ondo.console.service import ConsoleService
from ondo.events.schema import EventKind, Severity
from ondo.server.errors import APIError
from ondo.server.protocol import ErrorResponse

KEEPALIVE_S = 15.0
POLL_S = 0.25
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409)}
RID = Path(..., max_length=120, pattern=r"^[A-Za-z0-9_.-]+$")


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def reader_dependency(tokens: TokenStore) -> Callable[[Request], Principal]:
    def reader(request: Request) -> Principal:
        token = _bearer(request) or request.cookies.get(COOKIE)
        if token:
            who = tokens.lookup(token)
            if who is None:
                raise APIError(401, "unknown or revoked console token", code="invalid_token")
            return who
        if tokens.active_count() == 0:
            return ANONYMOUS
        raise APIError(401, "a console token is needed: send 'Authorization: Bearer TOKEN'",
                       code="missing_token")
    return reader


def role_dependency(tokens: TokenStore, needed: Role, verb: str
                    ) -> Callable[[Request], Principal]:
    def writer(request: Request) -> Principal:
        token = _bearer(request)
        if token is None:
            if request.cookies.get(COOKIE):
                why = "the token must come in the Authorization header (a cookie alone is not " \
                      "accepted for changes)"
            elif tokens.active_count() == 0:
                why = "no console token exists: create one with `ondo console token create " \
                      "--role operator --db DB`"
            else:
                why = "send 'Authorization: Bearer TOKEN'"
            raise APIError(401, f"to {verb}, {why}", code="missing_token")
        who = tokens.lookup(token)
        if who is None:
            raise APIError(401, "unknown or revoked console token", code="invalid_token")
        if not who.role.allows(needed):
            also = " or admin" if needed is Role.OPERATOR else ""
            raise APIError(403, f"the {who.role.value} role cannot {verb}: an {needed.value}"
                                f"{also} token is needed", code="forbidden")
        return who
    return writer


def refused(e: DecisionRefused) -> APIError:
    codes = {403: "forbidden", 404: "not_found", 409: "conflict", 422: "invalid_params"}
    status = 400 if e.status == 422 else e.status
    return APIError(status, e.message, code=codes.get(e.status))


def proposal_out(p: Proposal) -> m.ProposalOut:
    d = dataclasses.asdict(p)
    return m.ProposalOut(**d)


def entry_summary(e: dict[str, Any]) -> str:
    """A line for an entry: its kind and its payload's plain fields."""
    parts = []
    for k, v in e["payload"].items():
        if isinstance(v, (dict, list)) or v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k} {v}")
        if len(parts) == 5:
            break
    return f"{e['kind'].replace('_', ' ')}: {', '.join(parts)}"


@functools.lru_cache(maxsize=1)
def _runbooks() -> dict[str, Any]:
    from ondo.agent.runbook import load_runbooks, runbook_by_id

    return runbook_by_id(load_runbooks())


def runbook_section(ref: dict[str, str] | None) -> m.RunbookSectionOut | None:
    if not ref:
        return None
    book = _runbooks().get(ref.get("id", ""))
    section = book.section(ref.get("section", "")) if book is not None else None
    if book is None or section is None:
        return None
    return m.RunbookSectionOut(id=book.id, title=book.title, section=section.section,
                               heading=section.heading, text=section.text)


def proposal_detail(service: ConsoleService, p: Proposal,
                    props: dict[str, Proposal]) -> m.ProposalDetail:
    from ondo.agent.actions import GpuLimits, param_schemas

    evidence = []
    for s in p.evidence:
        e = service.entries.get(s)
        evidence.append(m.EvidenceOut(seq=s, summary="not in the log") if e is None else
                        m.EvidenceOut(seq=s, kind=e["kind"], severity=e["severity"],
                                      t_wall_s=e["t_wall_s"], summary=entry_summary(e)))
    chain, cur = [], p
    while cur.revision_of is not None and cur.revision_of in props:
        cur = props[cur.revision_of]
    while cur is not None:
        chain.append(cur.recommendation_id)
        cur = props.get(cur.revised_by or "")
    schema = param_schemas(GpuLimits.from_params(service.params))[p.action]
    return m.ProposalDetail(proposal=proposal_out(p), evidence=evidence,
                            runbook=runbook_section(p.runbook), whatif=service.whatif(p),
                            revisions=chain, param_schema=schema)


def _sse(event: str, data: Any, ident: int | None = None) -> str:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def build_api(service: ConsoleService) -> APIRouter:
    read = Depends(reader_dependency(service.tokens))
    r = APIRouter(prefix="/api", tags=["console"], responses=_ERRORS)

    def op(verb: str):
        return Depends(role_dependency(service.tokens, Role.OPERATOR, verb))

    admin = Depends(role_dependency(service.tokens, Role.ADMIN, "manage tokens"))

    @r.get("/whoami", response_model=m.WhoAmI)
    def whoami(who: Principal = read) -> m.WhoAmI:
        return m.WhoAmI(name=who.name, role=who.role.value, live=service.live,
                        tokens_configured=service.tokens.active_count() > 0)

    @r.get("/overview", response_model=m.OverviewOut)
    def overview(range_s: float = Query(600.0, ge=10, le=7 * 86400),
                 max_points: int = Query(1200, ge=10, le=5000),
                 who: Principal = read) -> dict[str, Any]:
        return service.overview(range_s, max_points)

    @r.get("/governor", response_model=dict[str, Any] | None)
    def governor(who: Principal = read) -> dict[str, Any] | None:
        return service.governor_state()

    @r.get("/events", response_model=m.EntriesOut)
    def events(kind: list[EventKind] = Query(default=[]), severity: Severity | None = None,
               before_seq: int | None = Query(None, ge=1),
               limit: int = Query(100, ge=1, le=1000), who: Principal = read) -> m.EntriesOut:
        rows = service.entries.query(tuple(k.value for k in kind),
                                     severity.value if severity else None, before_seq, limit)
        nxt = rows[-1]["seq"] if len(rows) == limit else None
        return m.EntriesOut(entries=rows, next_before_seq=nxt,
                            head_seq=service.entries.head_seq())

    @r.get("/events/{seq}", response_model=m.EventWindowOut)
    def event(seq: int = Path(..., ge=1), who: Principal = read) -> dict[str, Any]:
        out = service.event_window(seq)
        if out is None:
            raise APIError(404, f"no entry {seq} in the log", code="not_found")
        return out

    @r.get("/recommendations", response_model=m.ProposalList)
    def recommendations(status: list[str] = Query(default=[]),
                        who: Principal = read) -> m.ProposalList:
        bad = [s for s in status if s not in STATUSES]
        if bad:
            raise APIError(400, f"status {bad[0]!r} is not one of {', '.join(STATUSES)}",
                           param="status")
        props = sorted(service.proposals().values(), key=lambda p: -p.seq)
        counts = {s: sum(1 for p in props if p.status == s) for s in STATUSES}
        return m.ProposalList(proposals=[proposal_out(p) for p in props
                                         if not status or p.status in status], counts=counts)

    @r.get("/recommendations/{rid}", response_model=m.ProposalDetail)
    def recommendation(rid: str = RID, who: Principal = read) -> m.ProposalDetail:
        props = service.proposals()
        p = props.get(rid)
        if p is None:
            raise APIError(404, f"no recommendation {rid!r}", code="not_found")
        return proposal_detail(service, p, props)

    @r.post("/recommendations/{rid}/approve", response_model=m.DecisionResult)
    def approve(body: m.ApproveBody, rid: str = RID,
                who: Principal = op("approve")) -> dict[str, Any]:
        try:
            return service.approve(rid, who, body.comment)
        except DecisionRefused as e:
            raise refused(e) from None

    @r.post("/recommendations/{rid}/reject", response_model=m.DecisionResult)
    def reject(body: m.RejectBody, rid: str = RID,
               who: Principal = op("reject")) -> dict[str, Any]:
        try:
            return service.reject(rid, who, body.reason)
        except DecisionRefused as e:
            raise refused(e) from None

    @r.post("/recommendations/{rid}/revise", response_model=m.RevisionResult)
    def revise(body: m.ReviseBody, rid: str = RID,
               who: Principal = op("revise")) -> dict[str, Any]:
        try:
            return service.revise(rid, who, body.params, body.comment)
        except DecisionRefused as e:
            raise refused(e) from None

    @r.post("/proposals", response_model=m.ProposalResult)
    def propose(body: m.ProposeBody, who: Principal = op("propose")) -> dict[str, Any]:
        try:
            return service.propose(who, body.action, body.params, body.rationale,
                                   body.urgency, body.evidence)
        except DecisionRefused as e:
            raise refused(e) from None

    @r.get("/audit", response_model=m.AuditOut)
    def audit(who: Principal = read) -> dict[str, Any]:
        return service.audit()

    @r.get("/tokens", response_model=m.TokenList)
    def tokens(who: Principal = admin) -> m.TokenList:
        return m.TokenList(tokens=[m.TokenOut(**dataclasses.asdict(t))
                                   for t in service.tokens.list()])

    @r.post("/tokens", response_model=m.TokenCreated)
    def create_token(body: m.TokenCreateBody, who: Principal = admin) -> m.TokenCreated:
        token, info = service.tokens.create(body.role, body.name)
        return m.TokenCreated(token=token, **dataclasses.asdict(info))

    @r.post("/tokens/{token_id}/revoke", response_model=m.Revoked)
    def revoke(token_id: str = Path(..., max_length=64, pattern=r"^[0-9a-f]+$"),
               who: Principal = admin) -> m.Revoked:
        return m.Revoked(token_id=token_id, revoked=service.tokens.revoke(token_id))

    @r.get("/stream", response_class=StreamingResponse, responses={200: {
        "description": "Server-Sent Events: `entry` (id = the entry's seq) and `point`",
        "content": {"text/event-stream": {}}}})
    async def stream(request: Request, after: int | None = Query(None, ge=0),
                     points: bool = True,
                     reconnect_s: float | None = Query(None, ge=1, le=86400, description=(
                         "end the stream after this long (the browser reconnects with "
                         "Last-Event-ID)")),
                     last_event_id: str | None = Header(None, alias="Last-Event-ID"),
                     who: Principal = read) -> StreamingResponse:
        start = after
        if last_event_id is not None and last_event_id.strip().isdigit():
            start = int(last_event_id.strip())
        if start is None:
            start = service.entries.head_seq()
        return StreamingResponse(_events(request, service, start, points, reconnect_s),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    return r


async def _events(request: Request, service: ConsoleService, last: int, points: bool,
                  reconnect_s: float | None = None) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    last_t = time.time() - 2.0
    quiet_since = time.monotonic()
    end = None if reconnect_s is None else time.monotonic() + reconnect_s
    while not await request.is_disconnected() and service.serving() and (
            end is None or time.monotonic() < end):
        batch = await run_in_threadpool(service.entries.after, last, 200)
        for e in batch:
            yield _sse("entry", e, e["seq"])
            last = e["seq"]
        sent = bool(batch)
        if points and service.series is not None:
            for p in service.series.points(after_t=last_t):
                yield _sse("point", chart_row(p.t_wall_s, [p]))
                last_t = p.t_wall_s
                sent = True
        now = time.monotonic()
        if sent:
            quiet_since = now
        elif now - quiet_since >= KEEPALIVE_S:
            quiet_since = now
            yield ": keep-alive\n\n"
        if len(batch) < 200:
            await asyncio.sleep(POLL_S)
