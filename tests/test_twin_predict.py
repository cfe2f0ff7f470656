"""Estimator and predictor against the real H100 traces, scored on data the fit did not see.

The packaged params were fitted on h100_step.csv and h100_prbs.csv before t = 77 s
(see ondo/twin/h100_params.json notes); 10 s-ahead scores use h100_prbs.csv from 77 s on."""

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest

from ondo.twin.cli import register
from ondo.twin.params import h100_params
from ondo.twin.replay import replay, score
from ondo.twin.scenarios import hot_inlet
from ondo.twin.traces import read_trace

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
HOLDOUT_START_S = 77.0
P = h100_params()


@pytest.fixture(scope="module")
def prbs():
    return read_trace(TRACES / "h100_prbs.csv")


@pytest.fixture(scope="module")
def step():
    return read_trace(TRACES / "h100_step.csv")


@pytest.fixture(scope="module")
def holdout_score(prbs):
    return score(replay(P, prbs, 10.0), prbs, start_s=HOLDOUT_START_S)


def test_params_say_they_were_not_fitted_on_the_holdout():
    assert "h100_prbs.csv[-inf:77]" in P.notes["fitted_on"]
    assert "h100_prbs.csv" not in P.notes["fitted_on"]
    assert "NVML facts" in P.notes["thresholds"]


def test_ten_seconds_ahead_temperature_rmse(holdout_score):
    assert holdout_score.rows > 4000
    assert holdout_score.temp_rmse_c <= 1.5


def test_ten_seconds_ahead_hbm_temperature_rmse(holdout_score):
    assert holdout_score.mem_temp_rmse_c <= 2.0


def test_ten_seconds_ahead_clock_error_while_capped(holdout_score):
    assert 0 < holdout_score.sm_mae_frac_capped <= 0.05


def test_ten_seconds_ahead_power_cap_state(holdout_score):
    assert holdout_score.power_cap_agreement >= 0.95


@pytest.fixture(scope="module")
def step_60s(step):
    return replay(P, step, 60.0)


@pytest.mark.parametrize("step_start_s", [15.21, 115.44])  # matmul on, matmul off (both >= 60 s)
def test_one_second_after_a_step_the_twin_sees_the_temperature_60_s_ahead(
    step, step_60s, step_start_s
):
    rep = step_60s
    i = np.searchsorted(step.t_s, step_start_s + 1.0 + 60.0)
    origin_t = step.t_s[np.searchsorted(step.t_s, step.t_s[i] - 60.0, side="right") - 1]
    assert abs(origin_t - (step_start_s + 1.0)) < 0.05
    # The sensor one second in still reads far from where it is heading.
    j = np.searchsorted(step.t_s, step_start_s + 1.0)
    assert abs(step.temp_c[j] - step.temp_c[i]) > 5
    assert abs(rep.temp_c_pred[i] - step.temp_c[i]) <= 1.5


def test_hot_inlet_slowdown_predicted_ten_seconds_ahead_with_right_clock():
    res = hot_inlet(P, inlet_rise_c=25.0)
    assert res.lead_s is not None and res.lead_s >= 10.0
    assert (
        abs(res.predicted_clock_after_mhz - res.plant_clock_after_mhz)
        <= 0.05 * res.plant_clock_after_mhz
    )
    assert res.plant_clock_after_mhz < 1300  # the thermal controller, not the power cap, sets it


def test_estimator_heading_under_matmul_is_above_the_lagging_reading(step):
    from ondo.twin.estimator import ThermalEstimator
    from ondo.twin.replay import hbm_power_w

    hbm_w = float(hbm_power_w(P, 0.0))
    est = ThermalEstimator(P, step.temp_c[0], step.mem_temp_c[0], step.power_fast_w[0], hbm_w)
    end = np.searchsorted(step.t_s, 20.0)
    for i in range(1, end):
        est.update(
            step.t_s[i] - step.t_s[i - 1],
            step.power_fast_w[i - 1],
            hbm_w,
            step.temp_c[i],
            step.mem_temp_c[i],
        )
    e = est.estimate(700.0, hbm_w)
    assert e.heading_temp_c > step.temp_c[end] + 5  # it still has the slow creep ahead
    assert abs(e.heading_temp_c - 64) < 4  # the step trace ends its load near 63 C, still rising
    assert 0 < e.die_std_c < 2


def test_predict_cli_writes_one_row_per_trace_row(tmp_path, prbs):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "pred.csv"
    args = parser.parse_args(
        [
            "twin",
            "predict",
            "--trace",
            str(TRACES / "h100_prbs.csv"),
            "--horizon-s",
            "10",
            "-o",
            str(out),
        ]
    )
    assert args.func(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(prbs)
    assert list(rows[0]) == [
        "t",
        "temp_c_pred",
        "mem_temp_c_pred",
        "power_w_pred",
        "sm_mhz_pred",
        "power_cap_pred",
        "thermal_slowdown_pred",
    ]
    assert {r["power_cap_pred"] for r in rows} == {"0", "1"}


def test_what_if_half_load_lowers_power_and_lifts_clock_off_the_cap():
    from ondo.twin.plant import Load, steady_state
    from ondo.twin.predictor import forecast_constant

    state = steady_state(P, Load(), P.ambient_c)
    full = forecast_constant(P, state, 10.0, 1.0, 0.0, P.ambient_c, dt_s=0.02)
    half = forecast_constant(P, state, 10.0, 1.0, 0.0, P.ambient_c, dt_s=0.02, load_scale=0.5)
    assert full.time_to_power_cap_s is not None and full.time_to_power_cap_s < 1.0
    assert full.time_to_throttle_s is None  # no thermal slowdown at the fitted inlet
    assert half.power_w[-1] < full.power_w[-1] - 50
    assert half.sm_mhz[-1] > full.sm_mhz[-1]
