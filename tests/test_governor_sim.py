"""The closed-loop simulator: its calibration against ondo's H100 measurements, its arrivals,
the benchmark's output, and the governor's targets on shortened scenarios (predictive at
most half of reactive's throttled and over-budget seconds, at most 5 % less throughput)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ondo.cli import main as ondo_main
from ondo.control.sim.arrivals import BurstyArrivals, read_trace, write_trace
from ondo.control.sim.calibration import (
    H100_TRACE,
    check_throughput,
    fit_h100_step_time,
    h100_step_time,
)
from ondo.control.sim.scenarios import SCENARIOS, SUMMARY_FIELDS, run_scenario, scenario

REPO = Path(__file__).resolve().parents[1]


def test_the_packaged_step_time_model_is_the_fit_of_the_h100_trace():
    fitted, residuals = fit_h100_step_time()
    packaged = h100_step_time()
    for name in ("host_s", "per_seq_s", "memory_factor", "compute_factor",
                 "copy_bytes_per_s", "matmul_flops_per_s"):
        assert getattr(packaged, name) == pytest.approx(getattr(fitted, name), rel=1e-6), name
    assert residuals["steps"] == 1024
    assert residuals["mean_abs_pct"] < 10.0  # per step, on the trace it was fitted on
    assert abs(residuals["total_pct"]) < 0.1


def test_w1_replayed_in_the_simulator_takes_the_measured_steps_within_a_few_percent():
    w1 = check_throughput(workloads=("W1",))["W1"]
    assert w1["steps"] == w1["measured_steps"] == 1036  # the real scheduler's own decisions
    assert abs(w1["mean_step_error_pct"]) < 5.0  # -2.3 % (docs/governor.md)


def test_a_throttled_gpu_runs_its_steps_slower():
    m = h100_step_time()
    prefill = m.step_s(8e12, 2e9, 16, 1980.0)
    assert m.step_s(8e12, 2e9, 16, 990.0) > 1.5 * prefill
    decode = m.step_s(1e11, 2e10, 256, 1980.0)
    assert m.step_s(1e11, 2e10, 256, 990.0) < 1.1 * decode  # HBM-bound: its own clock


def test_the_bursty_trace_is_seeded_and_replays_from_jsonl(tmp_path):
    a = BurstyArrivals(2.0, 20.0, 5.0, 2.0, seed=3)
    first, again = a.trace(120.0), a.trace(120.0)
    assert first == again and len(first) > 100
    assert first != BurstyArrivals(2.0, 20.0, 5.0, 2.0, seed=4).trace(120.0)
    per_s = [0] * 120
    for r in first:
        per_s[int(r.arrival_s)] += 1
    assert max(per_s) >= 12 and min(per_s) <= 2  # bursts and calm, not a steady stream
    assert all(100 <= r.prompt_tokens <= 1024 and 100 <= r.output_tokens <= 1024 for r in first)
    path = tmp_path / "trace.jsonl"
    write_trace(path, first)
    assert read_trace(path) == first
    path.write_text(path.read_text() + '{"arrival_s": 1.0}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:\d+: not a request"):
        read_trace(path)


SHORT_S = {"nominal": 40.0, "hot-inlet": 90.0, "degraded-cooling": 90.0,
           "power-budget-450w": 60.0}
CI_SEED = 1  # a trace whose bursts come early enough for the shortened runs


def off_breaks(report: dict) -> float:
    off = report["policies"]["off"]
    return off["over_target_s"] + off["over_budget_s"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_predictive_beats_reactive_on_every_shortened_scenario(name):
    report, results = run_scenario(scenario(name).shortened(SHORT_S[name]), seed=CI_SEED)
    off, reactive, predictive = (report["policies"][p] for p in ("off", "reactive", "predictive"))
    for key in ("throttled_s", "over_budget_s"):
        assert predictive[key] <= 0.5 * reactive[key], (key, predictive, reactive)
    assert predictive["over_target_s"] <= max(0.5 * reactive["over_target_s"], 0.25)
    assert predictive["output_tokens_per_s"] >= 0.95 * reactive["output_tokens_per_s"]
    if name == "nominal":  # nothing binds: the governor costs nothing
        assert predictive["output_tokens_per_s"] == pytest.approx(off["output_tokens_per_s"],
                                                                  rel=0.01)
        assert not results["predictive"].decisions
    else:  # the scenario stresses: off breaks its objective, and reactive has to act
        assert off_breaks(report) > 3.0
        assert results["reactive"].decisions


def test_bench_governor_prints_one_object_with_the_fields_per_policy(capsys):
    assert ondo_main(["bench", "governor", "--scenario", "power-budget-450w", "--json",
                      "--duration-s", "25"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    assert report["scenario"] == "power-budget-450w"
    assert list(report["policies"]) == ["off", "reactive", "predictive"]
    for row in report["policies"].values():
        assert list(row) == list(SUMMARY_FIELDS)
    assert report["policies"]["off"]["over_budget_s"] > 0.0


def test_bench_governor_refuses_a_bad_duration(capsys):
    assert ondo_main(["bench", "governor", "--scenario", "nominal", "--duration-s", "5"]) == 2
    assert "--duration-s" in capsys.readouterr().err


def test_the_calibration_inputs_are_in_the_repository():
    assert H100_TRACE.exists()
    assert (REPO / "bench/results/throughput-h100-qwen3-0.6b-2026-11-24.json").exists()
