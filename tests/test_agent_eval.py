"""`ondo agent eval`: the scripted incidents end to end (telemetry -> detectors -> events ->
knowledge base -> retrieval -> rules or model -> check -> the log), and the agent against
ondo's own server with its embedded model."""

from __future__ import annotations

import pytest

from ondo.agent.client import ModelEndpoint
from ondo.agent.embedded import EmbeddedServer
from ondo.agent.eval.harness import report_text, run_eval
from ondo.agent.eval.incidents import INCIDENTS, incident


@pytest.mark.slow
def test_every_incident_gives_a_valid_cited_recommendation_in_the_log(tmp_path):
    assert len(INCIDENTS) >= 12
    assert any(i.source == "governor simulator" for i in INCIDENTS)
    assert any(i.source.endswith(".csv") for i in INCIDENTS)
    report = run_eval(None, folder=tmp_path)
    s = report.summary()
    text = report_text(report)
    assert s["incidents"] == len(INCIDENTS)
    assert (s["valid_pct"], s["cites_pct"], s["chain_ok_pct"]) == (100.0, 100.0, 100.0), text
    assert s["rules_action_right_pct"] >= 90.0, text
    assert s["retrieval_hit_pct"] >= 90.0, text
    assert s["retrieval_recall_at_3"]["fused"] >= 0.9
    for o in report.outcomes:  # every incident opened its condition and was answered on it
        assert o.events >= 1 and o.incident_kind == incident(o.name).trigger
        assert o.recommendation["evidence_event_ids"][0] == o.incident_seq


@pytest.mark.slow
def test_the_embedded_model_answers_through_the_openai_api(tmp_path):
    server = EmbeddedServer.start("--device", "cpu")
    try:
        endpoint = ModelEndpoint(server.base_url, timeout_s=120)
        report = run_eval(endpoint, [incident("power-cap-step"), incident("kv-undersized-serving")],
                          folder=tmp_path)
    finally:
        server.stop()
    text = report_text(report)
    for o in report.outcomes:  # the server held the model to the schema: its own answer
        assert o.valid and o.cites and o.chain_ok and o.source == "model", text
        rec = o.recommendation
        assert rec["model"] == "SmolLM2-135M-Instruct" and "fallback_reason" not in rec
        # The schema's rationale pattern starts with the incident's summary line.
        assert rec["rationale"].startswith(o.incident_kind + ": "), rec["rationale"]
    assert report.summary()["action_right_pct"] >= 50.0, text
