"""The engine load map: ondo's load descriptor (achieved rate over spec peak) in the plant's
units, fitted on one part of a trace and scored on a part the fit did not see. Figures:
docs/twin.md, "The engine's load descriptor"."""

import argparse
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from ondo.twin.cli import register
from ondo.twin.engine_load import ENGINE_LOAD_NAMES, fit_engine_load, in_plant_units, plant_activity
from ondo.twin.fit import THERMAL_NAMES, fit_params
from ondo.twin.params import TwinParams, h100_params
from ondo.twin.replay import replay, score
from ondo.twin.traces import read_trace

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
P = h100_params()


class ServingSplit(NamedTuple):
    trace: str  # in data/traces/
    fit_until_s: float  # the map is fitted on t < fit_until_s and scored on the rest
    horizon_s: float  # forecasts scored this far ahead


# The 11 s trace allows a 5 s horizon from origins after the estimator's first second. The long
# recording (bench/record_serving_trace.py: idle 10, load 40, idle 30, load 30, idle 20 s) is
# scored with the full horizon, fitted on everything before its second load step:
#   ServingSplit("ondo_serving_steps_w1_qwen3-0.6b_h100.csv", fit_until_s=80.0, horizon_s=10.0)
SERVING = ServingSplit("ondo_serving_w1_qwen3-0.6b_h100.csv", fit_until_s=6.0, horizon_s=5.0)


def test_the_packaged_params_map_the_engine_load_to_itself():
    a_c, a_m = plant_activity(P, [0.0, 0.03, 0.2], [0.0, 0.45, 1.0])
    assert a_c == pytest.approx([0.0, 0.03, 0.2]) and a_m == pytest.approx([0.0, 0.45, 1.0])


def test_the_compute_map_is_steep_near_zero_and_saturates():
    p = P.replace(engine_compute_gain=10.0, engine_compute_inv_max=2.0, engine_memory_gain=0.9)
    a_c, a_m = plant_activity(p, [1e-6, 0.01, 10.0], [0.5, 0.5, 0.5])
    assert a_c[0] == pytest.approx(1e-5, rel=1e-5)  # slope 10 at zero
    assert a_c[1] == pytest.approx(0.1 * (1 - np.exp(-0.2)) / 0.2)  # 0.0906
    assert a_c[2] == pytest.approx(0.5)  # 1 / inv_max
    assert a_m == pytest.approx([0.45] * 3)


@pytest.fixture(scope="module")
def serving():
    return read_trace(TRACES / SERVING.trace)


def test_a_serving_trace_is_in_engine_units_and_mapping_it_twice_changes_nothing(serving):
    assert serving.load_units == "engine"
    assert serving.window(0.0, 5.0).load_units == "engine"
    assert read_trace(TRACES / "h100_prbs.csv").load_units == "plant"
    p = P.replace(engine_compute_gain=10.0, engine_compute_inv_max=2.0)
    once = in_plant_units(p, serving)
    assert once.load_units == "plant"
    assert in_plant_units(p, once).compute_activity is once.compute_activity


def test_the_plant_fit_refuses_a_serving_trace(serving):
    with pytest.raises(ValueError, match="engine-load"):
        fit_params([serving])


# ---------------------------------------------------------------- shared traces, engine units

MATMUL_OF_PEAK = 677 / 989  # the prbs matmul's achieved rate (data/traces/README.md) / bf16 peak
COPY_OF_PEAK = 3017 / 3350  # a device copy's measured bandwidth (bench/results) / HBM3 peak


@pytest.fixture(scope="module")
def prbs_engine_units():
    prbs = read_trace(TRACES / "h100_prbs.csv")
    return dataclasses.replace(
        prbs,
        compute_activity=prbs.compute_activity * MATMUL_OF_PEAK,
        memory_activity=prbs.memory_activity * COPY_OF_PEAK,
        load_units="engine",
    )


@pytest.fixture(scope="module")
def prbs_map(prbs_engine_units):
    return fit_engine_load(P, [prbs_engine_units.window(-np.inf, 77.0)])[0]


def test_the_map_fit_recovers_a_known_change_of_units(prbs_map):
    assert prbs_map.engine_compute_gain == pytest.approx(1 / MATMUL_OF_PEAK, rel=0.02)
    assert prbs_map.engine_compute_inv_max < 0.05  # linear: the matmul load does not saturate
    assert prbs_map.engine_memory_gain == pytest.approx(1 / COPY_OF_PEAK, rel=0.02)


def test_held_out_prbs_scores_in_engine_units_match_the_plant_units(prbs_map, prbs_engine_units):
    """Scored from 77 s on, as in test_twin_predict: 1.37 C, 1.39 C, 2.0 %, 98.6 % there."""
    s = score(replay(prbs_map, prbs_engine_units, 10.0), prbs_engine_units, start_s=77.0)
    assert s.rows == 5038
    assert s.temp_rmse_c <= 1.37 + 0.02
    assert s.mem_temp_rmse_c <= 1.39 + 0.02
    assert 0 < s.sm_mae_frac_capped <= 0.021
    assert s.power_cap_agreement >= 0.985
    unmapped = score(replay(P, prbs_engine_units, 10.0), prbs_engine_units, start_s=77.0)
    assert unmapped.sm_mae_frac_capped > 0.2  # without the map the twin caps far too seldom


# ---------------------------------------------------------------- ondo's serving trace


@pytest.fixture(scope="module")
def serving_map(serving):
    return fit_engine_load(P, [serving.window(-np.inf, SERVING.fit_until_s)])[0]


def test_the_params_say_which_part_of_the_serving_trace_was_fitted(serving_map):
    notes = serving_map.notes["engine_load"]
    assert notes["fitted_on"] == [f"{SERVING.trace}[-inf:{SERVING.fit_until_s:g}]"]
    assert serving_map.notes["fitted_on"] == P.notes["fitted_on"]  # the plant is the H100 fit
    for name in THERMAL_NAMES + ("compute_power_w", "memory_power_w", "idle_power_w"):
        assert getattr(serving_map, name) == getattr(P, name), name


@pytest.fixture(scope="module")
def serving_score(serving, serving_map):
    rep = replay(serving_map, serving, SERVING.horizon_s)
    return rep, score(rep, serving, start_s=SERVING.fit_until_s)


def test_held_out_serving_scores_meet_the_acceptance_figures(serving, serving_score):
    _, s = serving_score
    assert s.rows == int(np.sum(serving.t_s >= SERVING.fit_until_s)) > 0
    assert s.temp_rmse_c <= 1.5
    assert s.mem_temp_rmse_c <= 2.0
    assert s.sm_mae_frac_capped <= 0.05
    assert s.power_cap_agreement >= 0.95


def test_held_out_serving_power_is_unbiased_with_the_map(serving, serving_score):
    rep, _ = serving_score
    serving_rows = (serving.t_s >= SERVING.fit_until_s) & (serving.compute_activity > 0)
    bias_w = float(np.mean((rep.power_w_pred - serving.power_w)[serving_rows]))
    assert abs(bias_w) <= 25.0  # short trace: -5 W; unmapped: -107 W
    unmapped = replay(P, serving, SERVING.horizon_s)
    assert np.mean((unmapped.power_w_pred - serving.power_w)[serving_rows]) < -75.0


def test_fit_and_predict_cli_fit_on_one_part_and_score_the_rest(tmp_path, capsys, serving_map):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    params_json = tmp_path / "serving_params.json"
    trace = str(TRACES / SERVING.trace)
    until = str(SERVING.fit_until_s)
    args = parser.parse_args(
        [
            "twin",
            "fit",
            "--engine-load",
            "--trace",
            trace,
            "--until-s",
            until,
            "-o",
            str(params_json),
        ]
    )
    assert args.func(args) == 0
    fitted = TwinParams.load(params_json)
    for name in ENGINE_LOAD_NAMES:
        assert getattr(fitted, name) == pytest.approx(getattr(serving_map, name))
    capsys.readouterr()
    argv = ["twin", "predict", "--params", str(params_json), "--trace", trace]
    argv += ["--horizon-s", str(SERVING.horizon_s), "--score-from-s", until]
    args = parser.parse_args(argv + ["-o", str(tmp_path / "pred.csv")])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["from_s"] == SERVING.fit_until_s and printed["temp_rmse_c"] <= 1.5
