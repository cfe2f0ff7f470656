"""`ondo serve` with its event detectors (on by default): a real server on loopback, real
requests, the log in the telemetry database, on /metrics, and verifiable after SIGTERM."""

from __future__ import annotations

import argparse
import re
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from ondo.events.verify import verify
from ondo.server.launch import event_config, start_telemetry
from tests.server_process import launch_server

# The agent's own entries (it recommends on incidents by default) are tested in
# test_server_agent.py; here the log holds the detectors' alone.
SERVER = ("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64", "--agent", "off")
# Every request misses a 1 us time-to-first-token objective, one is enough to report; none
# misses a 1000 s time-per-token one, however slow the shared CPU.
SLO_FLAGS = ("--slo-ttft-s", "0.000001", "--slo-tpot-s", "1000",
             "--detector", "slo_min_violations=1")


def _complete(base: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        ids.append(r.json()["id"])
    return ids


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_serve_logs_an_slo_violation_into_the_telemetry_database(tmp_path) -> None:
    db = tmp_path / "telemetry.db"
    proc, base = launch_server(*SERVER, "--telemetry", "sim", "--telemetry-hz", "50",
                               "--telemetry-db", str(db), *SLO_FLAGS)
    try:
        ids = _complete(base, 2)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(base + "/metrics", timeout=5).text
            if _metric(text, 'ondo:events_total{kind="slo_violation"}'):
                break
            time.sleep(0.2)
        assert _metric(text, 'ondo:events_total{kind="slo_violation"}') == 1.0
        assert _metric(text, "ondo:event_log_entries") >= 1.0
        assert _metric(text, "ondo:event_detector_records_dropped_total") == 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    result = verify(db)
    assert result.ok and result.entries >= 1
    with sqlite3.connect(db) as conn:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY seq")]
        body = conn.execute("SELECT body FROM events WHERE kind = 'slo_violation'").fetchone()[0]
        gpu_rows = conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0]
    assert kinds.count("slo_violation") == 1 and gpu_rows > 0  # events beside the samples
    assert f'"request:{ids[0]}' in body  # the evidence names the request (its sequence id)


@pytest.mark.slow
def test_events_without_gpu_telemetry_run_on_engine_only_telemetry(tmp_path) -> None:
    # The engine in a process of its own: finished requests still reach the SLO detector.
    db = tmp_path / "events.db"
    proc, base = launch_server(*SERVER, "--engine-process", "--telemetry", "off",
                               "--telemetry-db", str(db), *SLO_FLAGS)
    try:
        _complete(base, 1)
        time.sleep(1.0)
        text = httpx.get(base + "/metrics", timeout=5).text
        assert "ondo:gpu_temperature_celsius" not in text
        assert _metric(text, 'ondo:events_total{kind="slo_violation"}') == 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert verify(db).ok and verify(db).entries == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0] == 0
        assert conn.execute("SELECT SUM(num_output_tokens) FROM engine_steps").fetchone()[0] == 4


def test_events_off_with_telemetry_off_starts_no_pipeline(tmp_path) -> None:
    args = argparse.Namespace(events="off", telemetry="off", telemetry_db=str(tmp_path / "x.db"))
    assert event_config(args) is None and start_telemetry(args, None) is None
    assert not (tmp_path / "x.db").exists()
    on = argparse.Namespace(events="on", detector=["backlog_waiting=8"], power_budget_w=550.0,
                            slo_ttft_s=None, slo_tpot_s=None)
    config = event_config(on)
    assert (config.backlog_waiting, config.power_budget_w, config.die_limit_c) == (8, 550.0, 87.0)


def test_a_bad_detector_flag_is_refused_before_the_engine_starts() -> None:
    out = subprocess.run([sys.executable, "-m", "ondo", "serve", "--device", "cpu",
                          "--detector", "kv_pressure=0.9"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "--detector 'kv_pressure=0.9'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ondo", "serve", "--device", "cpu",
                          "--slo-tpot-s", "-1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--slo-tpot-s must be > 0" in out.stderr
