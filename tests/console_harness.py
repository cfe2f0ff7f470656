"""Test helper: the console on a real loopback server over real parts: the simulated GPU's
telemetry into a SQLite file, the event detectors and their hash-chained log, the live twin
and the governor. The engine is the one part left out (these tests need no model): the
governor's limits go to `LimitsRecorder`, which keeps what the engine would have received."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from ondo.console.app import mount_console
from ondo.console.auth import TokenStore
from ondo.console.series import POINTS_TABLE
from ondo.console.service import ConsoleService
from ondo.control.decision import DECISION_TABLE
from ondo.control.objectives import GpuFacts, resolve_objectives
from ondo.control.serve import GovernorSetup, ServerGovernor
from ondo.events.config import DetectorConfig
from ondo.events.live import LiveEvents
from ondo.events.schema import EventDraft, EventKind
from ondo.events.table import EVENTS_TABLE
from ondo.server.errors import install_error_handlers
from ondo.telemetry.pipeline import Telemetry
from ondo.twin.params import h100_params
from tests.server_harness import ServerThread

MAX_NUM_SEQS, MAX_BATCHED_TOKENS = 64, 2048


class LimitsRecorder:
    """The engine's side of the governor: the scheduler limits it was sent, in order."""

    is_accepting = True

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def stats(self) -> dict[str, int]:
        return {"max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_BATCHED_TOKENS}

    def set_scheduler_limits(self, limits: Any) -> None:
        self.sent.append(limits)


class Console:
    def __init__(self, base: str, service: ConsoleService, events: LiveEvents,
                 governor: ServerGovernor, engine: LimitsRecorder, db: Path) -> None:
        self.base, self.service, self.events = base, service, events
        self.governor, self.engine, self.db = governor, engine, db
        self.tokens = TokenStore(db)

    def token(self, role: str, name: str) -> str:
        return self.tokens.create(role, name)[0]

    def url(self, path: str) -> str:
        return f"{self.base}/console{path}"

    def post(self, path: str, body: dict[str, Any], token: str | None = None,
             **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.url(path), json=body, headers=headers, timeout=30, **kw)

    def get(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url(path), headers=headers, timeout=30, **kw)

    def recommend(self, rid: str, action: str, params: dict[str, Any],
                  evidence: tuple[int, ...] = ()) -> int:
        """A `recommendation_issued` entry as the agent appends it; its seq."""
        payload = {"recommendation_id": rid, "action": action, "parameters": params,
                   "rationale": f"scripted incident: {action}", "confidence": 0.7,
                   "urgency": "medium", "runbook": {"id": "tpot-slo-breach",
                                                    "section": "actions"},
                   "source": "rules"}
        e = self.events.log.append(EventDraft(
            EventKind.RECOMMENDATION_ISSUED, time.monotonic(), time.time(),
            {"recommendation_id": rid}, payload, tuple(f"event:{s}" for s in evidence)))
        return e.seq

    def entries(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.service.entries.of_kinds((kind,))]


@contextmanager
def console_server(tmp_path: Path, outcome_after_s: float = 1.0, index_knowledge: bool = False,
                   **detector_changes: Any):
    db = tmp_path / "ondo.db"
    params = h100_params()
    telemetry = Telemetry.start(db, source="sim", hz=20.0,
                                tables=(DECISION_TABLE, EVENTS_TABLE, POINTS_TABLE))
    events = LiveEvents(telemetry.hub, DetectorConfig.from_params(params, **detector_changes),
                        telemetry.store)
    engine = LimitsRecorder()
    objectives = resolve_objectives(GpuFacts.from_params(params))
    governor = ServerGovernor(GovernorSetup("off", params, objectives), telemetry, engine)
    service = ConsoleService(db=db, log_=events.log, hub=telemetry.hub, governor=governor,
                             twin=governor.twin, store=telemetry.store,
                             outcome_after_s=outcome_after_s, index_knowledge=index_knowledge)
    app = FastAPI()
    install_error_handlers(app)
    mount_console(app, service)
    try:
        with ServerThread(app) as server:
            yield Console(server.base_url, service, events, governor, engine, db)
    finally:
        service.close()
        events.close()
        governor.close()
        telemetry.close()
