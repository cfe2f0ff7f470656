"""`ondo analyze`: lagged correlations, the load before each throttle episode, time throttled
and energy per token, on a synthetic trace whose answers are known by construction, on the
committed H200 serving trace, and on a database already folded into 1 s aggregates."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import ondo.cli
from bench.events_replay import write_synthetic_trace
from ondo.events.analysis.correlate import lagged_correlation
from ondo.events.analysis.report import analyze, format_text
from ondo.events.replay import replay_trace
from ondo.telemetry.derive import throttle_time_fractions
from ondo.telemetry.schema import GpuSample
from ondo.telemetry.store import TelemetryStore, compact, connect

TRACES = Path(__file__).resolve().parent.parent / "data" / "traces"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    trace = folder / "trace.csv"
    write_synthetic_trace(trace, seconds=120.0, hz=20.0)
    db = folder / "replay.db"
    replay_trace(trace, db)
    return trace, db


def test_lagged_correlation_finds_the_lag_and_the_sign() -> None:
    rng = np.random.default_rng(0)
    load = rng.normal(size=2000)
    power = np.r_[np.zeros(7), load[:-7]] + 0.1 * rng.normal(size=2000)
    c = lagged_correlation("flops", load, "power_w", power, 0.1, 5.0)
    assert c.lag_s == pytest.approx(0.7) and c.r > 0.95 and abs(c.r_at_zero) < 0.1
    clock = -power
    assert lagged_correlation("flops", load, "sm_mhz", clock, 0.1, 5.0).r < -0.95
    assert lagged_correlation("flops", load, "x", np.ones(2000), 0.1, 5.0).r is None


def test_each_power_cap_is_attributed_to_the_prefill_burst_before_it(synthetic) -> None:
    _, db = synthetic
    report = analyze(db)
    eps = report["episodes"]
    assert len(eps) == 8  # four bursts in each of the two 40 s load phases
    for ep in eps:
        load = ep["load"]
        assert ep["reason"] == "sw_power_cap" and load["kind"] == "prefill"
        assert load["burst_tokens"] == 15 * 8192  # 15 steps of 8192 prefill tokens
        assert load["burst_s"] == pytest.approx(0.595)
        assert load["lead_s"] == pytest.approx(0.4)
        assert ep["duration_s"] == pytest.approx(0.6)
        assert ep["text"].startswith("123k prefill tokens in 0.6 s preceded the sw_power_cap at ")
        assert " by 0.4 s" in ep["text"]
    by = {(c["load"], c["response"]): c for c in report["correlations"]}
    clock = by[("prefill_tokens", "sm_mhz")]
    assert clock["r"] < -0.9 and clock["lag_s"] == pytest.approx(0.4, abs=0.1)
    assert by[("decode_tokens", "power_w")]["r"] > 0.8


def test_time_throttled_and_energy_per_token_match_the_trace(synthetic) -> None:
    trace, db = synthetic
    with open(trace, newline="") as f:
        rows = list(csv.DictReader(f))
    gpu = [r for r in rows if r["kind"] == "gpu"]
    tokens = sum(int(r["num_output_tokens"]) for r in rows if r["kind"] == "engine")
    energy_j = float(gpu[-1]["energy_j"]) - float(gpu[0]["energy_j"])
    report = analyze(db)
    assert report["throttled"]["by_reason_s"]["sw_power_cap"] == pytest.approx(8 * 0.6, rel=1e-6)
    assert report["throttled"]["by_reason_s"]["hw_slowdown"] == 0.0
    e = report["energy"]
    assert e["energy_j"] == pytest.approx(energy_j) and e["output_tokens"] == tokens
    assert e["energy_per_output_token_j"] == pytest.approx(energy_j / tokens)
    gen = e["generating"]
    # Tokens after the energy counter's last window (the trace ends mid-load) are not in one.
    assert 0.98 * tokens < gen["output_tokens"] <= tokens
    assert gen["energy_per_output_token_j"] < e["energy_per_output_token_j"]  # idle left out


def test_analyze_cli_prints_text_and_one_json_object(synthetic, capsys) -> None:
    _, db = synthetic
    assert ondo.cli.main(["analyze", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "Throttle episodes and the load before them" in text
    assert "sw_power_cap" in text and "J per token" in text
    assert ondo.cli.main(["analyze", "--db", str(db), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["episodes"]) == 8 and len(report["correlations"]) == 12
    assert format_text(report) == text.rstrip("\n")


def test_h200_serving_trace_power_caps_follow_prefill_bursts(tmp_path: Path) -> None:
    trace = TRACES / "ondo_serving_steps_w1_qwen3-0.6b_h200.csv"
    db = tmp_path / "h200.db"
    replay_trace(trace, db)
    report = analyze(db)
    assert len(report["episodes"]) == 5
    for ep in report["episodes"]:
        assert ep["load"]["kind"] == "prefill" and 0.0 < ep["load"]["lead_s"] < 1.0
        assert ep["load"]["burst_tokens"] > 50_000
    with open(trace, newline="") as f:
        gpu = [r for r in csv.DictReader(f) if r["kind"] == "gpu"]
    t = np.array([float(r["t_monotonic_s"]) for r in gpu])
    bits = np.array([int(float(r["throttle_reasons"])) for r in gpu])
    expected = throttle_time_fractions(t, bits)["sw_power_cap"] * (t[-1] - t[0])
    assert report["throttled"]["by_reason_s"]["sw_power_cap"] == pytest.approx(expected)
    assert report["power_channel"] == "power_instant_w"
    by = {(c["load"], c["response"]): c for c in report["correlations"]}
    assert by[("decode_tokens", "power_w")]["r"] > 0.8


def test_analyze_reads_stretches_folded_into_1_s_aggregates(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(db, raw_retention_s=None)
    for i in range(600):  # 30 s at 20 Hz; power cap from 5 s to 8 s
        t = 100.0 + i * 0.05
        store.submit(GpuSample(0, "sim", t, 1.8e9 + t, 0.05, 0.001, temp_c=50.0, power_w=400.0,
                               energy_j=1000.0 + 400.0 * i * 0.05, sm_mhz=1980.0,
                               throttle_reasons=0x4 if 105.0 <= t < 108.0 else 0))
    store.close()
    conn = connect(db)
    assert compact(conn, 120) == 400  # the first 20 s become 1 s aggregates
    conn.close()
    report = analyze(db)
    assert report["window"]["aggregated_until_s"] == 120.0
    assert report["window"]["gpu_samples"] == 20 + 200
    (ep,) = report["episodes"]
    assert ep["start_s"] == 105.5 and ep["end_s"] == 108.5  # the aggregates' seconds, centred
    assert report["energy"]["energy_j"] == pytest.approx(400.0 * 599 * 0.05 - 400 * 0.05 * 9.5,
                                                         rel=1e-3)


def test_analyze_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    assert ondo.cli.main(["analyze", "--db", str(tmp_path / "none.db")]) == 2
    assert "no such database" in capsys.readouterr().err
    sqlite3.connect(tmp_path / "empty.db").close()
    assert ondo.cli.main(["analyze", "--db", str(tmp_path / "empty.db")]) == 2
    assert "not a telemetry database" in capsys.readouterr().err
    store = TelemetryStore(tmp_path / "t.db")
    store.submit(GpuSample(0, "sim", 1.0, 1.0, 0.05, None, power_w=100.0))
    store.close()
    assert ondo.cli.main(["analyze", "--db", str(tmp_path / "t.db"), "--gpu", "3"]) == 2
    assert "--gpu 3" in capsys.readouterr().err
    assert ondo.cli.main(["analyze", "--db", str(tmp_path / "t.db"), "--bin-s", "0"]) == 2
