"""Running `ondo serve`: the app on uvicorn, draining the engine on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry

from ondo.engine.async_llm import AsyncLLM
from ondo.engine.cli import engine_args_from
from ondo.engine.engine_process import EngineStartError
from ondo.engine.gc_pauses import GcPauses, freeze_startup_heap, thaw_heap
from ondo.engine.restart_policy import RestartPolicy
from ondo.server.cli import served_name
from ondo.server.limits import RequestLimits
from ondo.server.listen import bind_listen_socket
from ondo.telemetry.store import check_database

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    from ondo.control.serve import governor_setup
    from ondo.telemetry.sim_fleet import parse_inlets, sim_inlets

    try:
        engine_args = engine_args_from(args)
        events_config = event_config(args)
        console_flags = console_config(args)
        if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
            raise ValueError("--max-waiting-requests must be >= 1")
        if not args.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
        if args.telemetry_db is not None:
            check_database("--telemetry-db", args.telemetry_db)
        gov_setup = governor_setup(args)
        args.sim_inlets = sim_inlets(getattr(args, "sim_gpus", 1),
                                     parse_inlets(getattr(args, "sim_inlet_c", None)))
        limits = RequestLimits(args.max_request_bytes, args.request_timeout,
                               args.timeout_keep_alive)
        restart_policy = RestartPolicy(max_restarts=args.engine_restarts)
        check_installed(args.loop, args.http)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_listen_socket(args.host, args.port)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.port = sock.getsockname()[1]  # the port taken where --port 0 asked for any
    try:
        try:
            agent_flags = agent_config(args, events_config)  # its own endpoint is on that port
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _serve_on(sock, args, engine_args, events_config, agent_flags, console_flags, gov_setup, limits,
                         restart_policy)
    finally:
        sock.close()


def _serve_on(sock: socket.socket, args: argparse.Namespace, engine_args, events_config, agent_flags, console_flags, gov_setup,
              limits: RequestLimits, restart_policy: RestartPolicy) -> int:
    """`serve` from the engine's start on, the socket bound."""
    from ondo.control.serve import start_server_governor
    from ondo.server.app import build_app

    try:
        async_llm = AsyncLLM.from_engine_args(engine_args, args.max_waiting_requests,
                                              engine_process=args.engine_process,
                                              restart_policy=restart_policy)
    except (EngineStartError, ValueError) as e:  # ValueError: an engine on a thread
        print(f"error: the engine could not start: {e}", file=sys.stderr)
        return 1
    name = served_name(engine_args.model, engine_args.served_model_name)
    registry = CollectorRegistry()
    telemetry = start_telemetry(args, registry)
    if telemetry is not None:
        async_llm.add_step_listener(telemetry.engine.on_step)
    try:
        governor = start_server_governor(gov_setup, telemetry, async_llm, registry)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        async_llm.close()
        if telemetry is not None:
            telemetry.close()
        return 2
    events = start_events(events_config, telemetry, registry, async_llm)
    agent = start_agent(agent_flags, args, events, registry, name)
    app = build_app(async_llm, name, api_key=args.api_key or os.environ.get("ONDO_API_KEY"),
                    registry=registry)
    app.state.governor = governor  # set_policy / set_objectives, for the console
    console = start_console(console_flags, app, telemetry, events, governor, async_llm,
                            agent is not None)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            loop=args.loop, http=args.http,
                            timeout_graceful_shutdown=args.shutdown_timeout + 10,
                            timeout_keep_alive=limits.keep_alive_s,
                            access_log=args.access_log)
    server = DrainingServer(config, async_llm, args.shutdown_timeout)
    async_llm.on_engine_lost = server.engine_lost
    app.state.ctx.limits = limits
    log.info("serving %s on http://%s:%d (max %d waiting requests)", name, args.host, args.port,
             async_llm.max_waiting_requests)
    freeze_startup_heap()  # this process serves one engine for its whole life
    gc_pauses = GcPauses().start()
    try:
        server.run(sockets=[sock])
    finally:
        async_llm.close()
        if console is not None:
            console.close()
        if agent is not None:
            agent.close()
        if events is not None:
            events.close()
        if governor is not None:
            governor.close()
        if telemetry is not None:
            telemetry.close()
        gc_pauses.stop()
        thaw_heap()
        app.state.ctx.close()
        log.info("server process garbage collector: %s", gc_pauses.summary())
    if server.exit_code:
        log.critical("exiting with status %d: %s", server.exit_code, server.exit_reason)
    return server.exit_code


def event_config(args: argparse.Namespace):
    """The event detectors' settings from the flags (None with --events off)."""
    if getattr(args, "events", "off") != "on":
        return None
    from ondo.events.cli import detector_config

    return detector_config(args)


def start_events(config, telemetry, registry: CollectorRegistry, async_llm: AsyncLLM):
    if config is None:
        return None
    from ondo.events.live import start_events as start

    return start(config, telemetry, registry, async_llm)


def agent_config(args: argparse.Namespace, events_config):
    """The agent's checked settings (None with --agent off, no event log to watch, or its
    packages missing: it says so)."""
    if getattr(args, "agent", "off") == "off" or events_config is None:
        return None
    from ondo.agent.serve import agent_settings

    return agent_settings(args)


def start_agent(settings, args: argparse.Namespace, events, registry: CollectorRegistry,
                served: str):
    if settings is None or events is None:
        return None
    from ondo.agent.serve import start_agent as start

    return start(settings, args, events, registry, served)


def console_config(args: argparse.Namespace):
    """The console's checked settings (None with --console off)."""
    from ondo.console.serve import console_settings

    return console_settings(args)


def start_console(settings, app, telemetry, events, governor, async_llm, agent_on: bool):
    if settings is None:
        return None
    from ondo.console.serve import start_console as start

    return start(settings, app, telemetry, events, governor, async_llm, agent_on)


def start_telemetry(args: argparse.Namespace, registry: CollectorRegistry):
    """The telemetry pipeline feeding /metrics (and --telemetry-db): "auto" reads NVML where
    there is a GPU and runs engine-only otherwise; "sim" runs the twin as the GPU. The event
    detectors need its hub: with --telemetry off and events on it runs engine-only (no GPU
    source, no GPU metrics), and --telemetry-db keeps the engine steps and the event log."""
    events = getattr(args, "events", "off") == "on"
    if args.telemetry == "off" and not events:
        return None
    from ondo.control.decision import DECISION_TABLE
    from ondo.telemetry.pipeline import Telemetry
    from ondo.twin.store_tables import TWIN_TABLES

    tables: tuple = (DECISION_TABLE, *TWIN_TABLES)
    if getattr(args, "console", "off") == "on":
        from ondo.console.series import POINTS_TABLE

        tables = (*tables, POINTS_TABLE)
    if events:
        from ondo.events.table import EVENTS_TABLE

        tables = (*tables, EVENTS_TABLE)
    if args.telemetry == "off":
        return Telemetry.start(args.telemetry_db, source="none", tables=tables)
    source = "nvml" if args.telemetry == "auto" else args.telemetry
    fallback = None if args.telemetry == "auto" else "sim"
    return Telemetry.start(args.telemetry_db, source=source, hz=args.telemetry_hz,
                           registry=registry, fallback=fallback, tables=tables,
                           sim_inlet_c=getattr(args, "sim_inlets", None))


def check_installed(loop: str, http: str) -> None:
    """An event loop or HTTP parser asked for by name must be importable (before the engine
    loads, rather than uvicorn failing after it)."""
    for flag, name in (("--loop", loop), ("--http", http)):
        if name in ("uvloop", "httptools") and importlib.util.find_spec(name) is None:
            raise ValueError(f"{flag} {name}: {name} is not installed (pip install {name})")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before uvicorn stops."""

    def __init__(self, config: uvicorn.Config, async_llm: AsyncLLM, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.async_llm = async_llm
        self.shutdown_timeout_s = shutdown_timeout_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        self.exit_reason = ""

    def engine_lost(self, reason: str) -> None:
        """The engine is gone for good (restarts exhausted, or none allowed): stop serving
        and exit non-zero, so that the supervisor of this process restarts it."""
        self.exit_code = 1
        self.exit_reason = f"the engine is gone: {reason}"
        log.critical("%s; the server stops", self.exit_reason)
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutting down
        # and the process would die by the signal instead of exiting 0.
        if self._draining or self._loop is None:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        log.info("signal %d: draining (up to %.1f s)", sig, self.shutdown_timeout_s)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.async_llm.shutdown(self.shutdown_timeout_s)
        finally:
            self.should_exit = True


