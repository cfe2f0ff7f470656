"""`ondo serve` with its agent (on by default): an incident the detectors open in a real
server becomes a `recommendation_issued` entry in its own log, from a thread of its own,
while the server keeps serving."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time

import httpx
import pytest

from ondo.events.verify import verify
from ondo.server.cli import register
from ondo.server.launch import agent_config, event_config
from tests.server_process import launch_server

# A 256-token context: the agent's prompt does not fit, so its own model refuses it (HTTP
# 400) and the rules answer, flagged; the path through the model is tested against scripted
# endpoints (test_agent_recommend.py) and the embedded model (test_agent_eval.py).
SERVER = ("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64")
SLO_FLAGS = ("--slo-ttft-s", "0.000001", "--slo-tpot-s", "1000",
             "--detector", "slo_min_violations=1")


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.slow
def test_serve_recommends_on_an_incident_and_keeps_serving(tmp_path) -> None:
    db = tmp_path / "ondo.db"
    # Engine-only telemetry: an idle simulated GPU's flat power reads as a stale sensor,
    # which the rules would (rightly) put first.
    proc, base = launch_server(*SERVER, "--telemetry", "off", "--telemetry-db", str(db),
                               "--agent-interval-s", "0", *SLO_FLAGS)
    try:
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        deadline = time.monotonic() + 240  # the first incident loads the embedding model
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(base + "/metrics", timeout=5).text
            if _metric(text, 'ondo:agent_recommendations_total{source="rules"}'):
                break
            time.sleep(0.5)
        assert _metric(text, 'ondo:agent_recommendations_total{source="rules"}') == 1.0
        assert _metric(text, 'ondo:agent_recommendations_total{source="model"}') == 0.0
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "Still serving", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert verify(db).ok
    with sqlite3.connect(db) as conn:
        rows = [json.loads(b) for (b,) in conn.execute(
            "SELECT body FROM events WHERE kind = 'recommendation_issued'")]
        slo_seq = conn.execute("SELECT MIN(seq) FROM events WHERE kind = 'slo_violation'"
                               ).fetchone()[0]
        docs = dict(conn.execute("SELECT kind, COUNT(*) FROM kb_docs GROUP BY kind"))
    assert len(rows) >= 1
    p = rows[0]["payload"]
    assert (p["action"], p["source"], p["runbook"]["id"]) == ("page_human", "rules",
                                                              "queue-backlog-slo")
    assert p["fallback_reason"].startswith("model unavailable: HTTP 400")
    assert f"event:{slo_seq}" in rows[0]["evidence"]
    assert docs["runbook"] >= 48 and docs.get("event", 0) >= 1  # the knowledge in the same file


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
    on = agent_config(_args("--port", "8123"), event_config(_args()))
    assert on.own_server and on.endpoint.base_url == "http://127.0.0.1:8123/v1"
    assert agent_config(_args("--agent", "off"), event_config(_args())) is None
    assert agent_config(_args("--events", "off"), None) is None  # nothing to watch
    other = agent_config(_args("--agent-base-url", "http://gpu-box:8000/v1", "--agent-model",
                               "qwen"), event_config(_args()))
    assert not other.own_server and other.endpoint.model == "qwen"
