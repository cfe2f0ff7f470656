"""The engine load map: ondo's load descriptor (achieved rate over spec peak) in the plant's
units, fitted on one part of a trace and scored on a part the fit did not see. Figures:
docs/twin.md, "The engine's load descriptor"."""

import argparse
import csv
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from ondo.twin.cli import register
from ondo.twin.engine_load import (
    ENGINE_LOAD_NAMES,
    fit_engine_load,
    in_plant_units,
    plant_activity,
    refit_thermal,
)
from ondo.twin.fit import SPLIT_NAMES, THERMAL_NAMES, fit_params
from ondo.twin.params import TwinParams, h100_params
from ondo.twin.plant import GpuPlant, Load, advance, initial_state, largest_stable_step_s
from ondo.twin.replay import replay, score
from ondo.twin.traces import read_trace

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
P = h100_params()


class ServingSplit(NamedTuple):
    trace: str  # in data/traces/
    fit_until_s: float  # fitted on t < fit_until_s and scored on the rest
    horizon_s: float  # forecasts scored this far ahead
    refit_thermal: bool  # refit the thermal constants too (`--refit-thermal`), then the map


# ondo serving W1 on an H200 (bench/record_serving_trace.py; idle 10, load 30, idle 20, load 20,
# idle 10 s): fitted on the first load step and its cool-down, scored 10 s ahead on the second
# load step and the idle after it. The packaged thermal constants are the H100's: refitted.
SERVING = ServingSplit(
    "ondo_serving_steps_w1_qwen3-0.6b_h200.csv",
    fit_until_s=60.0,
    horizon_s=10.0,
    refit_thermal=True,
)
# The 11 s H100 trace: the GPU the base plant was fitted on, so there the map is all that
# changes; 5 s is the longest horizon whose origins lie after the estimator's first second.
SERVING_H100 = ServingSplit(
    "ondo_serving_w1_qwen3-0.6b_h100.csv", fit_until_s=6.0, horizon_s=5.0, refit_thermal=False
)


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


@pytest.fixture(scope="module", params=[SERVING, SERVING_H100], ids=lambda s: s.trace[:-4])
def split(request) -> ServingSplit:
    return request.param


@pytest.fixture(scope="module")
def serving(split):
    return read_trace(TRACES / split.trace)


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
def serving_h200_part():
    return read_trace(TRACES / SERVING.trace).window(-np.inf, SERVING.fit_until_s)


@pytest.fixture(scope="module")
def serving_map(split, serving):
    part = serving.window(-np.inf, split.fit_until_s)
    base = refit_thermal(P, [part])[0] if split.refit_thermal else P
    return fit_engine_load(base, [part])[0]


def test_the_params_say_which_part_of_the_serving_trace_was_fitted(split, serving_map):
    window = f"{split.trace}[-inf:{split.fit_until_s:g}]"
    notes = serving_map.notes
    assert notes["engine_load"]["fitted_on"] == [window]
    assert notes["fitted_on"] == P.notes["fitted_on"]  # the power and controller stages' fit
    for name in ("compute_power_w", "memory_power_w", "idle_power_w", "cap_gain_mhz_per_w_s"):
        assert getattr(serving_map, name) == getattr(P, name), name
    for name in ("sw_thermal_c", "hw_slowdown_c", "mem_max_c", "power_limit_w"):
        assert getattr(serving_map, name) == getattr(P, name), name  # NVML facts, not fitted
    if not split.refit_thermal:
        assert "thermal_refit" not in notes
        for name in THERMAL_NAMES + SPLIT_NAMES + ("ambient_c",):
            assert getattr(serving_map, name) == getattr(P, name), name
        return
    refit = notes["thermal_refit"]
    assert refit["fitted_on"] == [window]
    assert refit["fitted"] == list(THERMAL_NAMES + SPLIT_NAMES) + ["ambient_c"]
    assert "NVML facts" in notes["thresholds"] and "not fitted" in notes["thresholds"]
    assert "thermal_refit" in notes["engine_load"]["kept"]
    die_to_inlet = ("die_sink_c_per_w", "sink_board_c_per_w", "board_amb_c_per_w")
    h200 = sum(getattr(serving_map, n) for n in die_to_inlet)
    assert h200 < 0.8 * sum(getattr(P, n) for n in die_to_inlet)  # 0.030 against 0.049 C/W


def test_every_capacitance_keeps_its_floor_and_forecasts_step_stably(split, serving_map):
    """Without the heatsink's floor the H200 refit drives it to ~5e-4 J/C and forecasts
    diverge; at the floor (1 J/C, as the die and HBM nodes) the plant is stable to ~11 ms."""
    for name in ("die_c_j_per_c", "hbm_c_j_per_c", "sink_c_j_per_c", "board_c_j_per_c"):
        assert getattr(serving_map, name) >= 1.0 - 1e-9, name
    assert largest_stable_step_s(serving_map) >= 0.01  # replay and predictor step 10 ms


def test_the_largest_stable_step_is_where_the_plant_starts_to_diverge(serving_map):
    limit_s = largest_stable_step_s(serving_map)
    ends = []
    for dt_s in (0.95 * limit_s, 1.05 * limit_s):
        s = initial_state(serving_map, 45.0, 45.0, 44.0, 40.0, 1980.0, 120.0, shape=())
        for _ in range(2000):
            advance(s, serving_map, dt_s, 0.0, 0.0, serving_map.ambient_c)
        ends.append(float(s.sink_c))
    assert abs(ends[0] - serving_map.ambient_c) < 20.0
    assert not abs(ends[1] - serving_map.ambient_c) < 1e3  # diverged (or NaN)


def test_a_simulated_gpu_on_refitted_params_steps_stably_at_the_telemetry_rate(serving_map):
    """The simulated GPU source steps once per poll (50 ms at 20 Hz), past the refit's stable
    step (the H200 refit's, ~11 ms): the plant splits such a step, and lands where 10 ms
    steps land."""
    coarse, fine = GpuPlant(serving_map), GpuPlant(serving_map)
    busy = Load(compute_activity=0.8, memory_activity=0.5)
    for _ in range(200):  # 10 s
        a = coarse.step(0.05, busy)
        for _ in range(5):
            b = fine.step(0.01, busy)
    assert np.isfinite(coarse.state.die_c) and abs(a.temp_c - b.temp_c) <= 1
    assert a.temp_c > serving_map.ambient_c + 5  # it heated up


@pytest.fixture(scope="module")
def serving_score(split, serving, serving_map):
    rep = replay(serving_map, serving, split.horizon_s)
    return rep, score(rep, serving, start_s=split.fit_until_s)


@pytest.mark.parametrize(
    "check, threshold",
    [
        ("temp_rmse_c", 1.5),  # H200, refitted: 1.31 C (map only, H100 thermal: 2.10 C)
        ("mem_temp_rmse_c", 2.0),  # H200, refitted: 1.16 C
        # The H200 trace is capped only in short bursts (24 of its 601 scored rows, the clock
        # 0-105 MHz down): a forecast that never caps scores 1.2 % and 96.0 % there.
        ("sm_mae_frac_capped", 0.05),
        ("power_cap_agreement", 0.95),
    ],
)
def test_held_out_serving_scores_meet_the_acceptance_figures(
    split, serving, serving_score, check, threshold
):
    _, s = serving_score
    assert s.rows == int(np.sum(serving.t_s >= split.fit_until_s)) > 0
    value = getattr(s, check)
    if check == "power_cap_agreement":  # a share right; the others are errors
        assert value >= threshold
    else:
        assert value <= threshold


@pytest.fixture(scope="module")
def unmapped_replay(split, serving):
    return replay(P, serving, split.horizon_s)


def test_held_out_serving_power_is_unbiased_with_the_map(
    split, serving, serving_score, unmapped_replay
):
    rep, _ = serving_score
    serving_rows = (serving.t_s >= split.fit_until_s) & (serving.compute_activity > 0)
    bias_w = float(np.mean((rep.power_w_pred - serving.power_w)[serving_rows]))
    assert abs(bias_w) <= 25.0  # H200: -14 W, unmapped -309 W; H100 11 s: -5 W, unmapped -107 W
    unmapped_bias_w = np.mean((unmapped_replay.power_w_pred - serving.power_w)[serving_rows])
    assert unmapped_bias_w < -75.0


def test_held_out_serving_temperatures_are_closer_with_the_map(
    split, serving, serving_score, unmapped_replay
):
    """H200, 10 s ahead: 1.31 / 1.16 C refitted against 8.17 / 4.85 C for the packaged params
    (docs/twin.md)."""
    _, s = serving_score
    unmapped = score(unmapped_replay, serving, start_s=split.fit_until_s)
    assert s.temp_rmse_c < unmapped.temp_rmse_c
    assert s.mem_temp_rmse_c < unmapped.mem_temp_rmse_c


def _with_the_scored_part_scrambled(src: Path, dst: Path, from_s: float) -> None:
    """A copy of a serving trace whose rows from `from_s` on read 20 C hotter and 5x busier."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if float(r["t"]) >= from_s:
            if r["kind"] == "gpu":
                r["temp_c"] = str(float(r["temp_c"]) + 20)
                r["mem_temp_c"] = str(float(r["mem_temp_c"]) + 20)
            else:
                r["compute_activity"] = str(5 * float(r["compute_activity"]))
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_fit_and_predict_cli_fit_on_one_part_and_score_the_rest(
    tmp_path, capsys, split, serving_map, serving_score
):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    params_json = tmp_path / "serving_params.json"
    trace = str(TRACES / split.trace)
    until = str(split.fit_until_s)
    # The fit reads a copy whose scored part is garbage: it must not look there.
    scrambled = tmp_path / split.trace
    _with_the_scored_part_scrambled(TRACES / split.trace, scrambled, split.fit_until_s)
    argv = ["twin", "fit", "--engine-load", "--trace", str(scrambled), "--until-s", until]
    argv += ["--refit-thermal"] if split.refit_thermal else []
    args = parser.parse_args(argv + ["-o", str(params_json)])
    assert args.func(args) == 0
    fitted = TwinParams.load(params_json)
    for name in ENGINE_LOAD_NAMES + THERMAL_NAMES + SPLIT_NAMES + ("ambient_c",):
        assert getattr(fitted, name) == pytest.approx(getattr(serving_map, name)), name
    assert fitted.notes.get("thermal_refit", {}).get("fitted_on") == serving_map.notes.get(
        "thermal_refit", {}
    ).get("fitted_on")
    capsys.readouterr()
    argv = ["twin", "predict", "--params", str(params_json), "--trace", trace]
    argv += ["--horizon-s", str(split.horizon_s), "--score-from-s", until]
    args = parser.parse_args(argv + ["-o", str(tmp_path / "pred.csv")])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["from_s"] == split.fit_until_s and printed["horizon_s"] == split.horizon_s
    _, s = serving_score
    for name, value in dataclasses.asdict(s).items():
        assert printed[name] == pytest.approx(value, rel=1e-6), name


def test_the_thermal_refit_takes_the_gpus_nvml_facts_and_only_serving_traces(serving_h200_part):
    facts = {"name": "some GPU", "thr_gpu_max": 80, "thr_slowdown": 83, "thr_mem_max": 90}
    p, _ = refit_thermal(P, [serving_h200_part], {**facts, "enforced_limit_mw": 600000})
    assert (p.sw_thermal_c, p.hw_slowdown_c, p.mem_max_c, p.power_limit_w) == (80, 83, 90, 600)
    assert "NVML facts of this GPU (some GPU)" in p.notes["thresholds"]
    assert p.notes["thermal_refit"]["fitted_on"] == [serving_h200_part.name]
    with pytest.raises(ValueError, match="serving traces"):
        refit_thermal(P, [read_trace(TRACES / "h100_step.csv")])


def test_the_thermal_refit_refuses_a_network_the_forecast_cannot_step():
    """6 s of the H100 serving trace cannot pin the slow nodes: board-to-inlet goes to ~1e5 C/W
    and the heatsink to its floor, a network no plant step integrates."""
    part = read_trace(TRACES / SERVING_H100.trace).window(-np.inf, SERVING_H100.fit_until_s)
    with pytest.raises(ValueError, match="needs plant steps under"):
        refit_thermal(P, [part])


def test_refit_thermal_goes_with_engine_load(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["twin", "fit", "--refit-thermal", "--trace", str(TRACES / SERVING.trace)]
    args = parser.parse_args(argv + ["-o", str(tmp_path / "p.json")])
    assert args.func(args) == 2
    assert "--engine-load" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
