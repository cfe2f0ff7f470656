"""The console in `ondo serve`: its flags, the address check, and its wiring to the server.

It listens where the server listens, at /console. Bound to loopback (the default, 127.0.0.1)
it may run with no token (reads open, changes refused); on any other address it refuses to
start unless the telemetry database holds at least one token (`ondo console token create`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from ondo.console import OUTCOME_AFTER_S as DEFAULT_AFTER_S
from ondo.console.auth import TokenStore

log = logging.getLogger(__name__)


def add_console_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("console (/console)")
    g.add_argument("--console", choices=("on", "off"), default="on",
                   help="the operator console at /console (default on)")
    g.add_argument("--console-outcome-s", type=float, default=DEFAULT_AFTER_S,
                   help="seconds after an approved action is applied before its observed "
                        f"effect is recorded (default {DEFAULT_AFTER_S:g})")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConsoleSettings:
    db: str | None
    outcome_after_s: float


def console_settings(args: argparse.Namespace) -> ConsoleSettings | None:
    """None with --console off; ValueError naming the flag for settings that cannot run."""
    if getattr(args, "console", "off") != "on":
        return None
    after = getattr(args, "console_outcome_s", DEFAULT_AFTER_S)
    if not after > 0:
        raise ValueError(f"--console-outcome-s must be > 0, got {after}")
    db = getattr(args, "telemetry_db", None)
    if not is_loopback(args.host):
        if TokenStore(db).active_count() == 0:
            where = f"in --telemetry-db {db}" if db else "(there is no --telemetry-db to hold them)"
            raise ValueError(
                f"--host {args.host}: the console refuses to listen beyond loopback without "
                f"tokens, and none exists {where}; create one with `ondo console token create "
                "--role admin --db DB`, or run with --console off")
    return ConsoleSettings(db, after)


def start_console(settings: ConsoleSettings, app: Any, telemetry: Any, events: Any,
                  governor: Any, async_llm: Any, agent_on: bool):
    """The console's service, mounted on `app` at /console."""
    from ondo.console.app import mount_console
    from ondo.console.service import ConsoleService

    service = ConsoleService(
        db=settings.db, log_=None if events is None else events.log,
        hub=None if telemetry is None else telemetry.hub, governor=governor,
        twin=None if governor is None else governor.twin,
        store=None if telemetry is None else telemetry.store, async_llm=async_llm,
        # Not indexed from here: the live agent indexes every log entry, decisions and outcomes
        # included, in its own process; the knowledge base's SQLite (apsw) must not open the
        # telemetry file beside the store's sqlite3 in this one.
        outcome_after_s=settings.outcome_after_s, index_knowledge=False)
    mount_console(app, service)
    log.info("console at /console (%s)", "tokens required" if service.tokens.active_count()
             else "no tokens: read-only, loopback only")
    return service
