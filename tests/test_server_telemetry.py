"""`ondo serve --telemetry sim`: GPU gauges on /metrics and rows in the telemetry database."""

from __future__ import annotations

import re
import signal
import sqlite3
import time

import httpx

from tests.server_process import launch_server


def _gauge(text: str, name: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{[^}}]*gpu="0"[^}}]*\}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_serve_exports_gpu_telemetry_and_stores_it(tmp_path):
    db = tmp_path / "telemetry.db"
    proc, base = launch_server("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64",
                               "--telemetry", "sim", "--telemetry-hz", "50", "--telemetry-db", str(db))
    try:
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        time.sleep(0.5)
        text = httpx.get(base + "/metrics", timeout=5).text
        temp = _gauge(text, "ondo:gpu_temperature_celsius")
        power = _gauge(text, "ondo:gpu_power_watts")
        clock = _gauge(text, "ondo:gpu_sm_clock_mhz")
        assert 15.0 < temp < 95.0 and 30.0 < power < 800.0 and 300.0 <= clock <= 1980.0
        assert re.search(r'^ondo:gpu_throttle_active\{.*reason="sw_power_cap".*\} [01]\.0$', text, re.M)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    with sqlite3.connect(db) as conn:
        gpu_rows = conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0]
        steps = conn.execute("SELECT SUM(num_output_tokens) FROM engine_steps").fetchone()[0]
    assert gpu_rows >= 25  # >= 0.5 s at 50 Hz
    assert steps == 8  # the completion's 8 tokens, each from one engine step
