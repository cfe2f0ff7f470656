"""The governor GPU benchmark's figures: the poller's lateness read back from its readings'
times, the overhead's estimate from ABBA rounds with its noise, and one run's summary and
time series."""

from __future__ import annotations

import math

import pytest

from ondo.bench.governor_figures import (
    GpuPoint,
    TickAges,
    overhead_estimate,
    poll_lags,
    series_rows,
    summarize,
)
from ondo.control.decision import GovernorDecision

P = 0.05  # 20 Hz


def test_a_poller_on_time_is_never_late():
    times = [10.0 + k * P + 0.003 * (k % 3) for k in range(100)]  # read-time jitter
    assert max(poll_lags(times, P)) <= 0.006 + 1e-9


def test_a_stalled_poller_is_late_by_the_stall_and_catches_up_back_to_back():
    times = [k * P for k in range(20)]  # on time to 0.95 s
    stall_end = 0.95 + 0.7  # the next read, due at 1.0 s, happens at 1.65 s
    times += [stall_end + 0.002 * j for j in range(14)]  # then back to back to catch up
    times += [times[-1] + P * (j + 1) for j in range(5)]
    lags = poll_lags(times, P)
    assert lags[20] == pytest.approx(0.65)
    # Each back-to-back read is a period less late than the one before.
    assert lags[21] == pytest.approx(0.65 - P + 0.002)
    assert lags[33] == pytest.approx(0.65 - 13 * (P - 0.002))
    assert max(lags[:20]) < 1e-9


def test_past_a_second_behind_the_poller_skips_its_schedule():
    times = [0.0, 0.05, 1.75, 1.80, 1.85]  # 1.65 s late: skips whole periods, then on time
    lags = poll_lags(times, P)
    assert lags[2] == pytest.approx(1.65)
    assert lags[3] < P and lags[4] < P


def abba(rounds: int, drift_per_run: float, cost: float, noise: list[float] | None = None):
    runs = []
    for k in range(rounds):
        for j, policy in enumerate(("off", "predictive", "predictive", "off")):
            i = 4 * k + j
            tps = 20_000 * (1 - drift_per_run * i) * (1 - cost if policy == "predictive" else 1)
            if noise:
                tps *= 1 + noise[i % len(noise)]
            runs.append({"round": k, "policy": policy, "output_tokens_per_s": tps})
    return runs


def test_the_overhead_estimate_cancels_a_steady_drift_round_by_round():
    est = overhead_estimate(abba(4, 0.01, 0.005))  # 1 % lost per run to warming, 0.5 % cost
    assert est["rounds"] == 4
    assert est["overhead_fraction"] == pytest.approx(0.005, abs=3e-4)
    assert all(x == pytest.approx(0.005, abs=5e-4) for x in est["overhead_by_round"])
    assert est["overhead_se"] < 1e-4  # no noise: the rounds agree
    # The two off runs of a round are three runs of drift apart.
    assert est["off_to_off_fraction"] == pytest.approx(0.03, rel=0.15)
    # Set against each other as pairs (off first), the drift would have counted as cost.
    pairs = [r for r in abba(4, 0.01, 0.005) if r["round"] == 0][:2]
    assert 1 - pairs[1]["output_tokens_per_s"] / pairs[0]["output_tokens_per_s"] > 0.014


def test_the_overhead_noise_is_the_spread_of_the_rounds():
    noise = [0.01, -0.01, 0.004, -0.006, 0.0, 0.008, -0.01, 0.003]
    est = overhead_estimate(abba(4, 0.0, 0.0, noise))
    per = est["overhead_by_round"]
    mean = sum(per) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in per) / 3)
    assert est["overhead_se"] == pytest.approx(sd / 2)
    assert est["overhead_fraction"] == pytest.approx(mean)
    assert math.isnan(overhead_estimate(abba(1, 0.0, 0.01))["overhead_se"])


def test_a_run_summary_counts_what_fell_in_its_window():
    gpu = [GpuPoint(k * P, 480.0 + (30.0 if 40 <= k < 50 else 0.0), 1000.0 + 480.0 * k * P,
                    500.0, 0.002) for k in range(200)]
    gpu[120:140] = []  # a stall: 20 readings lost
    ticks = [TickAges(k * 0.2, 0.01 if k != 30 else 0.8, 0.02) for k in range(50)]
    row = summarize({"group": "budget", "policy": "predictive"}, 1.0, 9.0, 80_000, gpu, ticks,
                    500.0, P)
    assert row["output_tokens_per_s"] == pytest.approx(10_000.0)
    assert row["gpu_samples"] == 161 - 20 and row["expected_gpu_samples"] == 160
    assert row["over_budget_fraction"] == pytest.approx(10 / 141)
    assert row["poll_lag_max_s"] == pytest.approx(20 * P, abs=1e-6)  # the lost readings
    assert row["sample_age_max_s"] == 0.8 and row["sample_age_p99_s"] == 0.8
    assert row["joules_per_output_token"] == pytest.approx(480.0 * 8.0 / 80_000)


def test_the_series_puts_the_limits_in_force_and_the_ages_beside_each_decision():
    gpu = [GpuPoint(k * P, 490.0, None, 600.0, 0.001) for k in range(40)]
    limits = [(0.0, {"duty_cycle": 1.0, "max_num_seqs": None}), (1.02, {"duty_cycle": 0.7})]
    d = GovernorDecision(1.0, 0.0, "predictive", "power budget binds", {"duty_cycle": 0.7}, {
        "gpu_sample_age_s": 0.03, "engine_sample_age_s": 0.4, "power_w": 505.0},
        {"plan_levels": [0.7, 0.7]}, {})
    rows = series_rows({"group": "budget", "policy": "predictive"}, gpu, limits, [d], 0.5, 1.5,
                       P)
    readings = [r for r in rows if "decision" not in r]
    (dec,) = [r for r in rows if "decision" in r]
    assert dec["t_s"] == 0.5 and dec["engine_sample_age_s"] == 0.4
    assert dec["gpu_sample_age_s"] == 0.03 and dec["limits"] == {"duty_cycle": 0.7}
    assert readings[0]["limits"] == {} and readings[-1]["limits"] == {"duty_cycle": 0.7}
    assert all(r["poll_lag_s"] == 0.0 for r in readings)
