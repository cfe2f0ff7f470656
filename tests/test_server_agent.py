"""`ondo serve` with its agent (on by default): an incident the detectors open in a real
server becomes a `recommendation_issued` entry in its own log, from a thread of its own,
while the server keeps serving. The agent asks the server it runs in: its embedded model
answers under the recommendation's JSON schema (the server's structured outputs); an
endpoint that does not answer in time gives the rules, and serving does not wait on it."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time

import httpx
import pytest

from ondo.agent.actions import ACTIONS
from ondo.agent.runbook import load_runbooks
from ondo.agent.serve import preload_wanted
from ondo.events.verify import verify
from ondo.server.cli import register
from ondo.server.launch import agent_config, event_config
from tests.agent_endpoint import ScriptedEndpoint
from tests.server_process import launch_server

SERVER = ("--device", "cpu", "--max-model-len", "4096", "--num-kv-blocks", "320")
SLO_FLAGS = ("--slo-ttft-s", "0.000001", "--slo-tpot-s", "1000",
             "--detector", "slo_min_violations=1")


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _recommendations(base: str, source: str, timeout_s: float = 240) -> float | None:
    """Waits (the first incident loads the embedding model) for a recommendation of
    `source`; the counter's value."""
    name = f'ondo:agent_recommendations_total{{source="{source}"}}'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = _metric(httpx.get(base + "/metrics", timeout=5).text, name)
        if value:
            return value
        time.sleep(0.5)
    return _metric(httpx.get(base + "/metrics", timeout=5).text, name)


def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    return proc.stdout.read()


def _issued(db) -> tuple[list[dict], int, dict[str, int]]:
    with sqlite3.connect(db) as conn:
        rows = [json.loads(b) for (b,) in conn.execute(
            "SELECT body FROM events WHERE kind = 'recommendation_issued' ORDER BY seq")]
        slo_seq = conn.execute("SELECT MIN(seq) FROM events WHERE kind = 'slo_violation'"
                               ).fetchone()[0]
        docs = dict(conn.execute("SELECT kind, COUNT(*) FROM kb_docs GROUP BY kind"))
    return rows, slo_seq, docs


@pytest.mark.slow
def test_serve_recommends_through_its_own_model_under_the_schema(tmp_path) -> None:
    db = tmp_path / "ondo.db"
    # Engine-only telemetry: an idle simulated GPU's flat power reads as a stale sensor,
    # which the rules would (rightly) put first.
    proc, base = launch_server(*SERVER, "--telemetry", "off", "--telemetry-db", str(db),
                               "--agent-interval-s", "0", "--agent-timeout-s", "240",
                               *SLO_FLAGS)
    try:
        # On a CPU the knowledge base waits for the first incident (--agent-preload auto).
        assert _metric(httpx.get(base + "/metrics", timeout=5).text,
                       "ondo:agent_knowledge_base_ready") == 0.0
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        assert _recommendations(base, "model", timeout_s=480) == 1.0
        text = httpx.get(base + "/metrics", timeout=5).text
        assert _metric(text, 'ondo:agent_recommendations_total{source="rules"}') == 0.0
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "Still serving", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200
    finally:
        log = _stop(proc)
    assert verify(db).ok
    assert "Traceback" not in log and "knowledge base process" in log, log
    assert "knowledge base ready in" in log and "(on the first incident)" in log, log
    rows, slo_seq, docs = _issued(db)
    assert len(rows) >= 1, log
    p = rows[0]["payload"]
    assert p["source"] == "model" and p["model"] == "SmolLM2-135M-Instruct", p
    assert p["action"] in ACTIONS and "fallback_reason" not in p
    books = {b.id: b for b in load_runbooks()}
    assert p["runbook"]["id"] in books
    assert books[p["runbook"]["id"]].section(p["runbook"]["section"]) is not None
    # Only the schema's pattern makes a 135M model start its rationale with the summary.
    assert p["rationale"].startswith("slo_violation: "), p["rationale"]
    cited = [int(e.split(":")[1]) for e in rows[0]["evidence"]]
    assert cited and all(1 <= i < rows[0]["seq"] for i in cited)
    assert rows[0]["subject"]["incident"] == slo_seq
    assert docs["runbook"] >= 48 and docs.get("event", 0) >= 1  # the knowledge in the same file


@pytest.mark.slow
def test_an_endpoint_that_hangs_gives_the_rules_and_serving_does_not_wait(tmp_path) -> None:
    db = tmp_path / "ondo.db"
    with ScriptedEndpoint(lambda body: "{}", delay_s=60.0) as endpoint:
        proc, base = launch_server(*SERVER, "--telemetry", "off", "--telemetry-db", str(db),
                                   "--agent-interval-s", "0", "--agent-base-url",
                                   endpoint.base_url, "--agent-timeout-s", "10",
                                   "--agent-preload", "on", *SLO_FLAGS)
        try:
            # Preloaded: the knowledge base is up before any incident.
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not _metric(
                    httpx.get(base + "/metrics", timeout=5).text,
                    "ondo:agent_knowledge_base_ready"):
                time.sleep(0.5)
            text = httpx.get(base + "/metrics", timeout=5).text
            assert _metric(text, "ondo:agent_knowledge_base_ready") == 1.0
            assert _metric(text, "ondo:agent_incident_to_recommendation_seconds") is None
            assert not endpoint.requests
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"prompt": "The GPU is", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200
            deadline = time.monotonic() + 240
            while not endpoint.requests and time.monotonic() < deadline:
                time.sleep(0.2)
            assert endpoint.requests  # the agent is now waiting on the endpoint
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"prompt": "Still serving", "max_tokens": 8, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            # ... served while the agent was still waiting for its answer
            text = httpx.get(base + "/metrics", timeout=5).text
            assert not _metric(text, 'ondo:agent_recommendations_total{source="rules"}')
            assert _recommendations(base, "rules", timeout_s=60) == 1.0
            # From the incident: the 1 s settle, then the 10 s deadline (no loading).
            latency = _metric(httpx.get(base + "/metrics", timeout=5).text,
                              "ondo:agent_incident_to_recommendation_seconds")
            assert latency is not None and latency >= 10.0
        finally:
            log = _stop(proc)
    assert verify(db).ok and "Traceback" not in log, log
    assert "knowledge base ready in" in log and "(at start)" in log, log
    rows, slo_seq, _ = _issued(db)
    p = rows[0]["payload"]
    assert (p["action"], p["source"], p["runbook"]["id"]) == ("page_human", "rules",
                                                              "queue-backlog-slo"), log
    assert p["fallback_reason"] == "model unavailable: no answer within 10 s"
    assert f"event:{slo_seq}" in rows[0]["evidence"]
    assert endpoint.requests[0]["response_format"]["type"] == "json_schema"


def _args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_agent_flags_are_checked_before_the_engine_starts() -> None:
    args = _args("--agent-base-url", "localhost:9000")
    with pytest.raises(ValueError, match="--agent-base-url"):
        agent_config(args, event_config(args))
    args = _args("--agent-interval-s", "-1")
    with pytest.raises(ValueError, match="--agent-interval-s"):
        agent_config(args, event_config(args))
    args = _args("--agent-timeout-s", "0")
    with pytest.raises(ValueError, match="--agent-timeout-s"):
        agent_config(args, event_config(args))
    on = agent_config(_args("--port", "8123"), event_config(_args()))  # packages here
    assert on.own_server and on.endpoint.base_url == "http://127.0.0.1:8123/v1"
    assert agent_config(_args("--agent", "off"), event_config(_args())) is None
    assert agent_config(_args("--events", "off"), None) is None  # nothing to watch
    other = agent_config(_args("--agent-base-url", "http://gpu-box:8000/v1", "--agent-model",
                               "qwen"), event_config(_args()))
    assert not other.own_server and other.endpoint.model == "qwen"


def test_preloading_follows_the_engine_device_unless_told() -> None:
    events = event_config(_args())
    assert not agent_config(_args("--device", "cpu"), events).preload
    assert agent_config(_args("--device", "cpu", "--agent-preload", "on"), events).preload
    assert not agent_config(_args("--device", "cuda", "--agent-preload", "off"), events).preload
    import torch

    assert agent_config(_args("--device", "cuda:1"), events).preload == torch.cuda.is_available()
    assert agent_config(_args(), events).preload == torch.cuda.is_available()  # --device auto
    with pytest.raises(SystemExit):
        _args("--agent-preload", "sometimes")
    with pytest.raises(ValueError, match="--agent-preload"):
        preload_wanted("sometimes", "cpu")
