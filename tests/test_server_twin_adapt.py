"""`ondo serve` with GPU telemetry runs the adapting twin by default: its forecast's band and
throttle probability on /metrics, its constants saved per GPU in the telemetry database at
shutdown and resumed at the next start; `--twin-adapt off` keeps the packaged constants."""

import re
import signal
import sqlite3
import time

import httpx
import pytest

from ondo.twin.store_tables import latest_constants
from tests.server_process import launch_server

pytestmark = pytest.mark.slow

FLAGS = ("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64",
         "--telemetry", "sim")


def serve_once(db, *extra):
    proc, base = launch_server(*FLAGS, "--telemetry-db", str(db), *extra)
    try:
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        text = ""
        for _ in range(40):  # the twin publishes at 4 Hz once it has samples
            text = httpx.get(base + "/metrics", timeout=5).text
            if "ondo:twin_throttle_probability{" in text:
                break
            time.sleep(0.25)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    return text, proc.stdout.read()


def value(text, name, labels):
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def test_serve_adapts_saves_per_gpu_and_resumes(tmp_path):
    db = tmp_path / "telemetry.db"
    text, log = serve_once(db)
    assert 0.0 <= value(text, "ondo:twin_throttle_probability", '{gpu="0"}') <= 1.0
    assert value(text, "ondo:twin_forecast_band_celsius", '{gpu="0",sensor="die"}') > 0
    assert value(text, "ondo:twin_adapted_constant",
                 '{gpu="0",name="board_amb_c_per_w"}') > 0
    assert "twin: adapting from h100_params.json" in log
    saved = latest_constants(db, "SIM-0")
    assert saved is not None and saved.samples > 10
    forecasts = sqlite3.connect(db).execute("SELECT COUNT(*) FROM twin_forecasts").fetchone()
    assert forecasts[0] > 0
    _, log2 = serve_once(db)
    assert "twin: GPU SIM-0 (ondo simulated GPU) resumes the constants saved" in log2
    assert len(sqlite3.connect(db).execute("SELECT * FROM twin_params").fetchall()) == 2


def test_serve_with_adaptation_off_saves_nothing(tmp_path):
    db = tmp_path / "telemetry.db"
    text, log = serve_once(db, "--twin-adapt", "off")
    assert "not adapted (--twin-adapt off)" in log
    assert "ondo:twin_adapted_constant" not in text
    assert value(text, "ondo:twin_forecast_band_celsius", '{gpu="0",sensor="die"}') > 0
    assert latest_constants(db, "SIM-0") is None
