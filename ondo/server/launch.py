"""Running `ondo serve`: the app on uvicorn, draining the engine on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry

from ondo.engine.async_llm import AsyncLLM
from ondo.engine.cli import engine_args_from
from ondo.engine.engine_process import EngineStartError
from ondo.engine.gc_pauses import GcPauses, freeze_startup_heap, thaw_heap
from ondo.server.cli import served_name

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    from ondo.server.app import build_app

    try:
        engine_args = engine_args_from(args)
        events_config = event_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        print("error: --max-waiting-requests must be >= 1", file=sys.stderr)
        return 2
    from ondo.control.serve import governor_setup, start_server_governor

    try:
        gov_setup = governor_setup(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        async_llm = AsyncLLM.from_engine_args(engine_args, args.max_waiting_requests,
                                              engine_process=args.engine_process)
    except EngineStartError as e:
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
    app = build_app(async_llm, name, api_key=args.api_key or os.environ.get("ONDO_API_KEY"),
                    registry=registry)
    app.state.governor = governor  # set_policy / set_objectives, for the console
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout + 10,
                            access_log=args.access_log)
    server = DrainingServer(config, async_llm, args.shutdown_timeout)
    log.info("serving %s on http://%s:%d (max %d waiting requests)", name, args.host, args.port,
             async_llm.max_waiting_requests)
    freeze_startup_heap()  # this process serves one engine for its whole life
    gc_pauses = GcPauses().start()
    try:
        server.run()
    finally:
        async_llm.close()
        if events is not None:
            events.close()
        if governor is not None:
            governor.close()
        if telemetry is not None:
            telemetry.close()
        gc_pauses.stop()
        thaw_heap()
        log.info("server process garbage collector: %s", gc_pauses.summary())
    return 0


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
    if events:
        from ondo.events.table import EVENTS_TABLE

        tables = (*tables, EVENTS_TABLE)
    if args.telemetry == "off":
        return Telemetry.start(args.telemetry_db, source="none", tables=tables)
    source = "nvml" if args.telemetry == "auto" else args.telemetry
    fallback = None if args.telemetry == "auto" else "sim"
    return Telemetry.start(args.telemetry_db, source=source, hz=args.telemetry_hz,
                           registry=registry, fallback=fallback, tables=tables)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before uvicorn stops."""

    def __init__(self, config: uvicorn.Config, async_llm: AsyncLLM, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.async_llm = async_llm
        self.shutdown_timeout_s = shutdown_timeout_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

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


