"""bench/governor_gpu.py runs end to end on the CPU (tiny model, simulated GPU, the twin
fitted on the H200 serving trace first) and prints its table and one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_settings_on_the_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "bench/governor_gpu.py", "--smoke", "--fit-twin-on",
         "data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("governor overhead (off vs predictive, nothing binding):")
    assert any(line.startswith("group | policy | token_budget") for line in lines)
    result = json.loads(lines[-1])["governor_gpu"]
    assert result["telemetry"] == "sim" and result["budget_w"] == 500.0
    assert list(result["budget"]) == ["off", "reactive", "predictive"]
    assert list(result["token_budgets"]) == ["32", "64", "128"]
    assert len(result["overhead_runs"]) == 4
    for row in [*result["budget"].values(), *result["token_budgets"].values()]:
        assert row["output_tokens"] > 0 and row["gpu_samples"] > 10
        assert row["joules_per_output_token"] > 0 and 0.0 <= row["over_budget_fraction"] <= 1.0
    fitted = json.loads(lines[0])
    assert fitted["twin_fitted_on"].endswith("h200.csv") and fitted["engine_compute_gain"] > 5
