"""The agent in `ondo serve`: its flags checked before the engine starts, then `LiveAgent`
on the event log's hub, asking this server's own model unless `--agent-base-url` names
another endpoint."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from ondo.agent.cli import endpoint_from
from ondo.agent.client import ModelEndpoint
from ondo.agent.live import DEFAULT_INTERVAL_S, LiveAgent


@dataclass(frozen=True)
class AgentSettings:
    endpoint: ModelEndpoint
    own_server: bool  # the endpoint is this server (its model and key filled in at start)
    interval_s: float


def agent_settings(args: argparse.Namespace) -> AgentSettings:
    """ValueError naming the bad flag."""
    interval = getattr(args, "agent_interval_s", None)
    interval = DEFAULT_INTERVAL_S if interval is None else interval
    if not interval >= 0:
        raise ValueError(f"--agent-interval-s must be >= 0, got {interval}")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    own = f"http://{host}:{args.port}/v1"
    endpoint = endpoint_from(args, own)
    return AgentSettings(endpoint, not getattr(args, "agent_base_url", None), interval)


def start_agent(settings: AgentSettings, args: argparse.Namespace, events: Any,
                registry: CollectorRegistry, served: str) -> LiveAgent:
    """`events`: the server's `LiveEvents` (its hub, log and store)."""
    endpoint = settings.endpoint
    if settings.own_server:
        key = endpoint.api_key or args.api_key or os.environ.get("ONDO_API_KEY")
        endpoint = ModelEndpoint(endpoint.base_url, endpoint.model or served, key,
                                 endpoint.timeout_s, endpoint.max_tokens)
    store = events.store
    return LiveAgent(events.hub, events.log, endpoint,
                     db_path=None if store is None else str(store.path),
                     interval_s=settings.interval_s, registry=registry)
