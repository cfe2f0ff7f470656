"""bench/governor_gpu.py runs end to end on the CPU (tiny model, simulated GPU, the twin
fitted on the H200 serving trace first), with its load in a process of its own: it prints
the planned duration, its table, the overhead with its noise and one JSON line, and writes
the time series with the poller's lateness beside each reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_settings_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    series = tmp_path / "series.jsonl"
    proc = subprocess.run(
        [sys.executable, "bench/governor_gpu.py", "--smoke", "--series-out", str(series),
         "--fit-twin-on", "data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "load process exited" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    planned = json.loads(lines[0])
    assert planned["runs"] == 3 + 3 + 8 and planned["planned_s"] > 30
    fitted = json.loads(lines[1])
    assert fitted["twin_fitted_on"].endswith("h200.csv") and fitted["engine_compute_gain"] > 5
    assert any(line.startswith("group | policy | token_budget") for line in lines)
    overhead = next(line for line in lines if line.startswith("governor overhead"))
    assert "standard error over 2 ABBA rounds" in overhead and "two off runs differ" in overhead
    result = json.loads(lines[-1])["governor_gpu"]
    assert result["telemetry"] == "sim" and result["budget_w"] == 500.0
    assert list(result["budget"]) == ["off", "reactive", "predictive"]
    assert list(result["token_budgets"]) == ["32", "64", "128"]
    assert len(result["overhead_runs"]) == 8 and result["rounds"] == 2
    assert len(result["overhead_by_round"]) == 2 and result["overhead_se"] >= 0.0
    assert result["requests_completed"] > 50 and result["requests_failed"] == 0
    rows = [*result["budget"].values(), *result["token_budgets"].values(),
            *result["overhead_runs"]]
    for row in rows:
        assert row["output_tokens"] > 0 and row["gpu_samples"] > 10
        assert row["joules_per_output_token"] > 0 and 0.0 <= row["over_budget_fraction"] <= 1.0
        assert 0.0 <= row["poll_lag_p99_s"] <= row["poll_lag_max_s"] < 1.0
        assert 0.0 <= row["sample_age_p99_s"] <= row["sample_age_max_s"]
        assert row["ticks"] >= 1
    written = [json.loads(line) for line in series.read_text().splitlines()]
    readings = [r for r in written if "decision" not in r]
    assert {(r["group"], r["policy"]) for r in readings} >= {
        ("budget", "off"), ("budget", "reactive"), ("budget", "predictive"),
        ("overhead", "off"), ("overhead", "predictive")}
    assert all(r["poll_lag_s"] >= 0.0 and r["read_latency_s"] >= 0.0 for r in readings)
    # (The simulated GPU under the tiny model stays far under any budget above its idle
    # power: no decision rows here; test_bench_governor_figures.py checks theirs.)


def test_the_gpu_benchmark_refuses_a_bad_flag_naming_it():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/governor_gpu.py", "--overhead-rounds", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--overhead-rounds" in proc.stderr
