"""`ondo serve --governor`: flags checked before the engine starts (exit 2 naming the flag),
the governor on /metrics and in the telemetry database, and a policy that raises falling
back to off while the server keeps serving."""

from __future__ import annotations

import logging
import re
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest

from ondo.control.decision import DECISION_TABLE
from ondo.control.objectives import Objectives
from ondo.control.predictive import PredictivePolicy
from ondo.control.serve import GovernorSetup, ServerGovernor, start_server_governor
from ondo.telemetry.pipeline import Telemetry
from ondo.twin.params import h100_params
from tests.server_harness import make_async_llm, serve, wait_for
from tests.server_process import launch_server


def _serve_exit(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ondo", "serve", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, message", [
    (("--governor", "predictive", "--telemetry", "off"),
     "--governor predictive needs GPU telemetry"),
    (("--governor", "reactive", "--telemetry", "sim", "--power-budget-w", "50"),
     "--power-budget-w: a budget of 50 W is not above the GPU's idle power"),
    (("--telemetry", "sim", "--temp-target-c", "20"),
     "--temp-target-c: a die target of 20 °C is not above the inlet temperature"),
    (("--telemetry", "sim", "--hbm-temp-target-c", "30"), "--hbm-temp-target-c"),
    (("--telemetry", "sim", "--twin-params", "/nonexistent/params.json"), "--twin-params"),
])
def test_flags_the_governor_cannot_work_with_are_refused_before_the_engine_starts(flags, message):
    t0 = time.monotonic()
    proc = _serve_exit(*flags)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "engine ready" not in proc.stderr  # refused before loading anything
    assert time.monotonic() - t0 < 60


def test_a_policy_with_no_gpu_to_read_is_refused_naming_the_flag():
    setup = GovernorSetup("predictive", h100_params(), Objectives())
    telemetry = SimpleNamespace(gpu=None)
    with pytest.raises(ValueError, match="--governor predictive needs a GPU to read"):
        start_server_governor(setup, telemetry, async_llm=None)
    assert start_server_governor(GovernorSetup("off", h100_params(), Objectives()), None,
                                 async_llm=None) is None


def _gauge(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def test_serve_runs_the_governor_shows_it_on_metrics_and_stores_its_decisions(tmp_path):
    db = tmp_path / "telemetry.db"
    # The engine in its own process: the limits cross its pipe (the thread is the next test's).
    proc, base = launch_server("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks",
                               "64", "--telemetry", "sim", "--telemetry-db", str(db),
                               "--governor", "reactive", "--power-budget-w", "450",
                               "--tpot-slo-ms", "200", "--engine-process")
    try:
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        text = httpx.get(base + "/metrics", timeout=5).text
        assert _gauge(text, "ondo:governor_policy", '{policy="reactive"}') == 1.0
        assert _gauge(text, "ondo:governor_policy", '{policy="off"}') == 0.0
        assert _gauge(text, "ondo:governor_power_budget_watts") == 450.0
        assert _gauge(text, "ondo:governor_temperature_target_celsius", '{sensor="die"}') == 82.0
        assert _gauge(text, "ondo:governor_tpot_slo_seconds") == 0.2
        assert _gauge(text, "ondo:governor_limit", '{limit="duty_cycle"}') == 1.0
        assert _gauge(text, "ondo:governor_failures_total") == 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    rows = sqlite3.connect(db).execute(
        "SELECT policy, reason, limits FROM governor_decisions").fetchall()
    assert rows[0][:2] == ("reactive", "policy set to reactive")
    assert '"duty_cycle":1.0' in rows[0][2]


def test_a_governor_that_raises_falls_back_to_off_logs_once_and_serving_goes_on(
        tmp_path, monkeypatch, caplog):
    calls = []

    def explode(self, inputs, objectives, config):
        calls.append(inputs.t_monotonic_s)
        raise RuntimeError("forecast diverged")

    monkeypatch.setattr(PredictivePolicy, "decide", explode)
    caplog.set_level(logging.ERROR, logger="ondo.control.governor")
    llm = make_async_llm(max_model_len=256, num_kv_blocks=64)
    telemetry = Telemetry.start(tmp_path / "t.db", source="sim", hz=50.0,
                                tables=(DECISION_TABLE,))
    llm.add_step_listener(telemetry.engine.on_step)
    gov = ServerGovernor(GovernorSetup("predictive", h100_params(), Objectives()), telemetry, llm)
    try:
        assert wait_for(lambda: gov.governor.policy_name == "off", 10.0)
        with serve(llm) as server:
            for _ in range(2):
                r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                               json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
                assert r.status_code == 200
                assert r.json()["choices"][0]["finish_reason"] == "length"
        gov.set_policy("predictive")  # the console may try again: one more failure, no new log
        assert wait_for(lambda: gov.governor.failures == 2, 10.0)
    finally:
        gov.close()
        llm.close()
        telemetry.close()
    assert len(calls) == 2
    assert len([r for r in caplog.records if "falling back" in r.getMessage()]) == 1
    rows = sqlite3.connect(tmp_path / "t.db").execute(
        "SELECT policy, reason FROM governor_decisions ORDER BY t_monotonic_s").fetchall()
    assert [p for p, _ in rows] == ["predictive", "off", "predictive", "off"]
    assert "forecast diverged; fell back to off" in rows[1][1]
