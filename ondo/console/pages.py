"""The console's pages: server-rendered (Jinja2) from the same data as the JSON endpoints,
with a little JavaScript (`static/console.js`) for the charts, the live stream and the
decision forms. Where a token is needed and the browser holds none, a page answers 401 with
the form to enter one."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path as FsPath
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup

from ondo.console.api import RID, entry_summary, proposal_detail, proposal_out, reader_dependency
from ondo.console.auth import Principal
from ondo.console.proposals import STATUSES
from ondo.console.service import ConsoleService
from ondo.events.schema import EventKind, Severity
from ondo.server.errors import APIError

TEMPLATES = FsPath(__file__).parent / "templates"
RANGES_S = (("5 min", 300), ("10 min", 600), ("1 h", 3600), ("6 h", 21600), ("24 h", 86400))


def _time(t: float | None) -> str:
    if t is None:
        return ""
    return dt.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")


def _finite(v: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def json_script(v: Any) -> Markup:
    """`v` as JSON safe inside <script type="application/json"> (no </script>, no NaN)."""
    return htmlsafe_json_dumps(_finite(v), dumps=json.dumps, separators=(",", ":"))


def build_pages(service: ConsoleService, prefix: str) -> APIRouter:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["time"] = _time
    templates.env.filters["tojson_compact"] = lambda v: json.dumps(v, separators=(",", ":"))
    templates.env.filters["json_script"] = json_script
    templates.env.globals["summary"] = entry_summary
    reader = reader_dependency(service.tokens)
    r = APIRouter(include_in_schema=False)

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        try:
            who: Principal | None = reader(request)
        except APIError as e:
            return templates.TemplateResponse(request, "login.html", {
                "prefix": prefix, "who": None, "live": service.live, "message": e.message,
                "page": "login"}, status_code=e.status)
        data = ctx.pop("data")(who) if "data" in ctx else {}
        return templates.TemplateResponse(request, name, {
            "prefix": prefix, "who": who, "live": service.live, "page": name[:-5],
            "head_seq": service.entries.head_seq(), **ctx, **data}, status_code=status)

    @r.get("/", response_class=HTMLResponse)
    def overview(request: Request, range_s: int = Query(600, ge=10, le=7 * 86400)):
        return page(request, "overview.html", ranges=RANGES_S, range_s=range_s,
                    data=lambda who: {"overview": service.overview(range_s)})

    @r.get("/events", response_class=HTMLResponse)
    def events(request: Request, kind: list[str] = Query(default=[]),
               severity: str | None = None, before_seq: int | None = Query(None, ge=1)):
        kinds = tuple(k for k in kind if k in {e.value for e in EventKind})
        sev = severity if severity in {s.value for s in Severity} else None
        rows = service.entries.query(kinds, sev, before_seq, 100)
        return page(request, "events.html", entries=rows, kinds=[k.value for k in EventKind],
                    chosen=kinds, severity=sev, severities=[s.value for s in Severity],
                    next_before=rows[-1]["seq"] if len(rows) == 100 else None)

    @r.get("/events/{seq}", response_class=HTMLResponse)
    def event(request: Request, seq: int = Path(..., ge=1)):
        window = service.event_window(seq)
        if window is None:
            return page(request, "missing.html", status=404, what=f"entry {seq}")
        return page(request, "event.html", window=window)

    @r.get("/recommendations", response_class=HTMLResponse)
    def recommendations(request: Request):
        props = sorted(service.proposals().values(),
                       key=lambda p: (p.status != "pending", -p.seq))
        return page(request, "recommendations.html", proposals=props, statuses=STATUSES)

    @r.get("/recommendations/{rid}", response_class=HTMLResponse)
    def recommendation(request: Request, rid: str = RID):
        props = service.proposals()
        p = props.get(rid)
        if p is None:
            return page(request, "missing.html", status=404, what=f"recommendation {rid}")
        return page(request, "recommendation.html",
                    data=lambda who: {"detail": proposal_detail(service, p, props).model_dump(),
                                      "proposal": proposal_out(p).model_dump()})

    @r.get("/audit", response_class=HTMLResponse)
    def audit(request: Request):
        return page(request, "audit.html", data=lambda who: {"audit": service.audit()})

    @r.get("/login", response_class=HTMLResponse)
    def login(request: Request):
        return templates.TemplateResponse(request, "login.html", {
            "prefix": prefix, "who": None, "live": service.live, "message": None,
            "page": "login"})

    return r
