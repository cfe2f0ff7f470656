"""`ondo agent search|index|recommend|eval`, and the agent's flags of `ondo serve`.

    ondo agent search "power capped at 700 W" --db ondo.db        # hits with their scores
    ondo agent index --db ondo.db                                 # runbooks + the log
    ondo agent recommend --db ondo.db [--incident SEQ] [--json]   # the latest incident
    ondo agent eval [--json] [--rules-only]                       # incidents + retrieval

Light to import (every `ondo` command builds every parser): the agent's modules load when
a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_endpoint_args(p: argparse.ArgumentParser, serve: bool = False) -> None:
    where = "this server" if serve else "http://127.0.0.1:8000/v1 (ondo serve's default)"
    p.add_argument("--agent-base-url", default=None,
                   help=f"OpenAI-compatible endpoint the agent asks (default: {where})")
    p.add_argument("--agent-model", default=None,
                   help="model name at that endpoint (default: "
                        + ("the served model" if serve else "the first it lists") + ")")
    p.add_argument("--agent-api-key", default=None,
                   help="bearer key for that endpoint (default: "
                        + ("--api-key" if serve else "none") + ")")
    p.add_argument("--agent-timeout-s", type=float, default=None,
                   help="deadline of one model call (default 20 s); past it the rules answer")


def add_agent_args(p: argparse.ArgumentParser) -> None:
    """The flags `ondo serve` takes for the agent."""
    p.add_argument("--agent", choices=("on", "off"), default=None,
                   help="recommend actions on new incidents (needs --events on): the model "
                        "through the OpenAI API, the rules where it fails (default: on where "
                        "its packages are installed, else off with a log line saying so)")
    add_endpoint_args(p, serve=True)
    p.add_argument("--agent-interval-s", type=float, default=None,
                   help="at most one recommendation per this many seconds (default 60)")
    p.add_argument("--agent-preload", choices=("auto", "on", "off"), default="auto",
                   help="start the knowledge base (its process, the embedding model, the "
                        "runbooks' vectors) as the server starts rather than on the first "
                        "incident, so that the first recommendation is as quick as the next "
                        "(default auto: on where the engine runs on a GPU, whose host has "
                        "cores to spare; off on a CPU, where it would compete with serving)")


def endpoint_from(args: argparse.Namespace, default_url: str, default_model: str | None = None,
                  default_key: str | None = None):
    """The model endpoint the flags ask for; ValueError naming the bad flag."""
    from ondo.agent.client import DEFAULT_TIMEOUT_S, ModelEndpoint

    timeout = getattr(args, "agent_timeout_s", None)
    return ModelEndpoint(base_url=getattr(args, "agent_base_url", None) or default_url,
                         model=getattr(args, "agent_model", None) or default_model,
                         api_key=getattr(args, "agent_api_key", None) or default_key,
                         timeout_s=DEFAULT_TIMEOUT_S if timeout is None else timeout)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="runbook retrieval and recommended actions")
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION")

    s = sub.add_parser("search", help="hybrid retrieval over runbooks and past entries")
    s.add_argument("query")
    s.add_argument("--db", required=True, help="telemetry database (created if missing)")
    s.add_argument("--kind", action="append", default=[],
                   help="runbook, event, recommendation, decision (repeatable; default all)")
    s.add_argument("--mode", choices=("fused", "bm25", "vector"), default="fused")
    s.add_argument("-k", type=int, default=5, help="hits to show")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_needs_packages(search_cmd))

    i = sub.add_parser("index", help="index the runbooks and the database's event log")
    i.add_argument("--db", required=True)
    i.set_defaults(func=_needs_packages(index_cmd))

    r = sub.add_parser("recommend", help="recommend an action for an incident in a database")
    r.add_argument("--db", required=True)
    r.add_argument("--incident", type=int, default=None,
                   help="the entry's seq (default: the latest incident)")
    r.add_argument("--rules-only", action="store_true", help="no model: the rules answer")
    add_endpoint_args(r)
    r.add_argument("--no-append", action="store_true",
                   help="print only; do not append recommendation_issued to the log")
    r.add_argument("--show-prompt", action="store_true", help="print the prompt and schema")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_needs_packages(recommend_cmd))

    e = sub.add_parser("eval", help="scripted incidents end to end, and retrieval recall")
    e.add_argument("--rules-only", action="store_true", help="no model: the rules baseline")
    add_endpoint_args(e)
    e.add_argument("--incident", action="append", default=[], help="only this one (repeatable)")
    e.add_argument("--keep", default=None, help="keep the incidents' databases in this folder")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_needs_packages(eval_cmd))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _needs_packages(func):
    """A command that needs the agent's packages says which are missing, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from ondo.agent.packages import INSTALL_HINT, missing_packages

        missing = missing_packages()
        if missing:
            return _fail(f"ondo agent {args.agent_command} needs {', '.join(missing)}, not "
                         f"installed here; {INSTALL_HINT}", 1)
        return func(args)
    return run


def search_cmd(args: argparse.Namespace) -> int:
    from ondo.agent.knowledge import DOC_KINDS, KnowledgeBase
    from ondo.agent.retrieval import search

    kinds = tuple(args.kind) or DOC_KINDS
    bad = [k for k in kinds if k not in DOC_KINDS]
    if bad:
        return _fail(f"--kind {bad[0]!r}: choose from {', '.join(DOC_KINDS)}")
    if args.k < 1:
        return _fail(f"-k must be >= 1, got {args.k}")
    try:
        kb = KnowledgeBase(args.db)
    except FileNotFoundError as e:
        return _fail(str(e))
    try:
        kb.sync_runbooks()
        kb.index_log()
        hits = search(kb, args.query, kinds=kinds, k=args.k, mode=args.mode)
    finally:
        kb.close()
    if args.json:
        print(json.dumps({"query": args.query, "mode": args.mode,
                          "hits": [h.as_dict() for h in hits]}))
        return 0
    if not hits:
        print("no hits")
    print(f"{'#':>2} {'score':>8} {'bm25':>11} {'cosine':>12}  ref")
    for n, h in enumerate(hits, 1):
        bm = "-" if h.bm25_rank is None else f"{h.bm25_score:.2f} #{h.bm25_rank}"
        cos = "-" if h.vector_rank is None else f"{h.cosine:.3f} #{h.vector_rank}"
        print(f"{n:>2} {h.score:8.4f} {bm:>11} {cos:>12}  {h.ref}")
        print(f"{'':36}{h.title}")
        print(f"{'':36}{h.body[:110]}{'...' if len(h.body) > 110 else ''}")
    return 0


def index_cmd(args: argparse.Namespace) -> int:
    from ondo.agent.knowledge import KnowledgeBase

    try:
        kb = KnowledgeBase(args.db)
    except FileNotFoundError as e:
        return _fail(str(e))
    try:
        t0 = time.perf_counter()
        books, entries = kb.sync_runbooks(), kb.index_log()
        counts = {k: kb.count(k) for k in ("runbook", "event", "recommendation", "decision")}
    finally:
        kb.close()
    print(json.dumps({"db": args.db, "runbook_sections_written": books,
                      "entries_written": entries, "documents": counts,
                      "elapsed_s": round(time.perf_counter() - t0, 3)}))
    return 0


def _text_report(result: Any, appended: Any) -> str:
    ctx, rec = result.context, result.recommendation
    lines = [f"incident: entry {ctx.incident['seq']} {ctx.incident['kind']} "
             f"({ctx.incident['severity']}), {len(ctx.events)} entries in the window",
             f"retrieved: {', '.join(result.runbooks)}",
             f"recommendation ({rec.source}"
             + (f", {rec.model}" if rec.model else "")
             + f", {result.latency_s:.2f} s): {rec.action} {json.dumps(rec.params)}",
             f"  runbook {rec.runbook_id}#{rec.runbook_section}; evidence entries "
             f"{list(rec.evidence_event_ids)}; urgency {rec.urgency}; confidence "
             f"{rec.confidence:g}",
             f"  rationale: {rec.rationale}"]
    if rec.fallback_reason:
        lines.append(f"  fallback: {rec.fallback_reason}")
    if result.rules.action != rec.action:
        lines.append(f"  (the rules alone: {result.rules.action} {json.dumps(result.rules.params)})")
    if appended is not None:
        lines.append(f"appended as entry {appended.seq} (recommendation_issued)")
    return "\n".join(lines)


def recommend_cmd(args: argparse.Namespace) -> int:
    from ondo.agent.actions import GpuLimits
    from ondo.agent.agent import Agent, recommendation_draft
    from ondo.agent.client import DEFAULT_BASE_URL
    from ondo.agent.context import context_from_db
    from ondo.agent.knowledge import KnowledgeBase
    from ondo.agent.record import LIVE_WRITER_S, append_to_db, latest_write_wall_s
    from ondo.twin.params import h100_params

    try:
        endpoint = None if args.rules_only else endpoint_from(args, DEFAULT_BASE_URL)
        params = h100_params()
        ctx = context_from_db(args.db, args.incident, params=params)
    except (ValueError, FileNotFoundError, LookupError) as e:
        return _fail(str(e))
    if not args.no_append:
        latest = latest_write_wall_s(args.db)
        if latest is not None and 0 <= time.time() - latest < LIVE_WRITER_S:
            return _fail(f"--db {args.db}: written {time.time() - latest:.0f} s ago, a "
                         "server seems to write it (its own agent records recommendations); "
                         "pass --no-append to print only")
    kb = KnowledgeBase(args.db)
    try:
        kb.sync_runbooks()
        kb.index_log()
        result = Agent(kb, endpoint, GpuLimits.from_params(params)).recommend(ctx)
    finally:
        kb.close()
    appended = None
    if not args.no_append:
        appended = append_to_db(args.db, recommendation_draft(
            result.recommendation, ctx, time.monotonic(), time.time()))
    if args.show_prompt and result.messages is not None:
        for m in result.messages:
            print(f"--- {m['role']} ---\n{m['content']}")
        print(f"--- schema ---\n{json.dumps(result.schema)}\n--- answer ---\n{result.answer}")
    if args.json:
        d = result.as_dict(full=args.show_prompt)
        d["appended_seq"] = None if appended is None else appended.seq
        print(json.dumps(d, default=str))
    else:
        print(_text_report(result, appended))
    return 0


def eval_cmd(args: argparse.Namespace) -> int:
    from ondo.agent.eval.harness import report_json, report_text, run_eval
    from ondo.agent.eval.incidents import INCIDENTS, incident

    try:
        chosen = [incident(n) for n in args.incident] if args.incident else list(INCIDENTS)
    except KeyError as e:
        return _fail(f"--incident: {e.args[0]}")
    server = None
    try:
        if args.rules_only:
            endpoint = None
        elif args.agent_base_url:
            endpoint = endpoint_from(args, args.agent_base_url)
        else:
            from ondo.agent.embedded import EmbeddedServer

            server = EmbeddedServer.start()
            endpoint = endpoint_from(args, server.base_url)
    except (ValueError, RuntimeError) as e:
        return _fail(str(e), 1 if isinstance(e, RuntimeError) else 2)
    progress = None if args.json else (lambda o, dt: print(
        f"  {o.name}: {o.action} ({o.source}) in {dt:.1f} s", file=sys.stderr, flush=True))
    try:
        report = run_eval(endpoint, chosen, folder=Path(args.keep) if args.keep else None,
                          progress=progress)
    finally:
        if server is not None:
            server.stop()
    print(report_json(report) if args.json else report_text(report))
    return 0
