"""The agent in `ondo serve`: its flags checked before the engine starts, then `LiveAgent`
on the event log's hub, asking this server's own model unless `--agent-base-url` names
another endpoint.

Light to import: the knowledge base's packages (apsw, sqlite-vec, PyYAML, the embedding
model) load only once the agent is on and they are all there. Without them the server runs
with the agent off and one log line naming what is missing; `--agent on` asked for
explicitly refuses to start instead.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from ondo.agent.cli import endpoint_from
from ondo.agent.client import ModelEndpoint
from ondo.agent.packages import INSTALL_HINT, missing_packages

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0  # at most one recommendation a minute


@dataclass(frozen=True)
class AgentSettings:
    endpoint: ModelEndpoint
    own_server: bool  # the endpoint is this server (its model and key filled in at start)
    interval_s: float
    preload: bool = False  # the knowledge base starts with the server, not on an incident


def preload_wanted(choice: str, device: str) -> bool:
    """`--agent-preload`: "on", "off", or "auto" (on where the engine's device is a GPU)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--agent-preload must be auto, on or off, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    from ondo.engine.llm_engine import resolve_device

    try:
        return resolve_device(device).type == "cuda"
    except (RuntimeError, ValueError):  # no GPU for it, or a name torch does not know: the
        return False                    # engine says so when it starts


def agent_settings(args: argparse.Namespace) -> AgentSettings | None:
    """The agent's settings; None where it stays off (its packages missing and `--agent`
    left at its default). ValueError naming the bad flag."""
    interval = getattr(args, "agent_interval_s", None)
    interval = DEFAULT_INTERVAL_S if interval is None else interval
    if not interval >= 0:
        raise ValueError(f"--agent-interval-s must be >= 0, got {interval}")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    own = f"http://{host}:{args.port}/v1"
    endpoint = endpoint_from(args, own)
    missing = missing_packages()
    if missing:
        if getattr(args, "agent", None) == "on":
            raise ValueError(f"--agent on needs {', '.join(missing)}, not installed here; "
                             f"{INSTALL_HINT}")
        log.warning("agent off: %s not installed (%s). --agent off hides this line",
                    ", ".join(missing), INSTALL_HINT)
        return None
    preload = preload_wanted(getattr(args, "agent_preload", "auto"),
                             str(getattr(args, "device", "auto")))
    return AgentSettings(endpoint, not getattr(args, "agent_base_url", None), interval, preload)


def start_agent(settings: AgentSettings, args: argparse.Namespace, events: Any,
                registry: CollectorRegistry, served: str) -> Any:
    """`events`: the server's `LiveEvents` (its hub, log and store). A `LiveAgent`."""
    from ondo.agent.live import LiveAgent

    endpoint = settings.endpoint
    if settings.own_server:
        key = endpoint.api_key or args.api_key or os.environ.get("ONDO_API_KEY")
        endpoint = ModelEndpoint(endpoint.base_url, endpoint.model or served, key,
                                 endpoint.timeout_s, endpoint.max_tokens)
    store = events.store
    return LiveAgent(events.hub, events.log, endpoint,
                     db_path=None if store is None else str(store.path),
                     interval_s=settings.interval_s, registry=registry,
                     preload=settings.preload)
