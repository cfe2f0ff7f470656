"""The online twin against the committed traces and against its own plant made into GPUs the
packaged fits have never seen: starting from the packaged H100 constants, it adapts while it
forecasts, and its 10 s-ahead forecasts meet the acceptance figures."""

import numpy as np
import pytest

from ondo.events.trace_input import read_trace_records
from ondo.twin.adapt_replay import forecast_rows, run_trace, score
from ondo.twin.gpu_models import H200_PARAMS_PATH
from ondo.twin.params import TwinParams, h100_params
from ondo.twin.replay import replay
from ondo.twin.replay import score as static_score
from ondo.twin.synthetic_serving import serving_records
from ondo.twin.traces import read_trace

H200_SERVING = "data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv"
SCHEDULE = [(20, 0.0), (40, 0.95), (30, 0.0), (60, 0.5), (20, 1.0), (30, 0.0), (40, 0.7),
            (20, 0.0)]


def adapted(records, horizon_s=10.0):
    run = run_trace(records, h100_params())
    return run, forecast_rows(run, horizon_s)


def test_h200_serving_trace_meets_the_targets_from_the_h100_constants():
    run, fc = adapted(read_trace_records(H200_SERVING))
    s = score(run, fc, 30.0)
    assert s.rows == 1201
    assert s.temp_rmse_c <= 1.5
    assert s.mem_temp_rmse_c <= 2.0
    assert min(s.temp_band_coverage, s.mem_temp_band_coverage) >= 0.8
    # The packaged H100 constants as they are miss by far more (docs/twin.md: 7.4 / 4.3 °C).
    tr = read_trace(H200_SERVING)
    static = static_score(replay(h100_params(), tr, 10.0), tr, start_s=tr.t_s[0] + 30.0)
    assert static.temp_rmse_c > 3 * s.temp_rmse_c
    assert s.temp_persistence_rmse_c > 5 * s.temp_rmse_c


MIXED_SERVING = ["data/traces/ondo_serving_mixed_w1_qwen3-0.6b_h200_b.csv.xz",
                 "data/traces/ondo_serving_mixed_w1_qwen3-0.6b_h200_c.csv.xz"]


@pytest.mark.parametrize("path", MIXED_SERVING)
def test_mixed_serving_traces_from_other_h200s_meet_the_targets_unfitted(path):
    """Eight minutes of rates changing over minutes, bursts and idle stretches, recorded on
    another H200 and never fitted on: the targets hold from the H100 constants."""
    run, fc = adapted(read_trace_records(path))
    s = score(run, fc, 30.0)
    assert s.rows >= 9000
    assert s.temp_rmse_c <= 1.5
    assert s.mem_temp_rmse_c <= 2.0
    assert min(s.temp_band_coverage, s.mem_temp_band_coverage) >= 0.8
    assert s.temp_persistence_rmse_c > 2 * s.temp_rmse_c


@pytest.mark.slow
@pytest.mark.parametrize("name, from_s", [("h100_step.csv", 30.0), ("h100_prbs.csv", 77.0)])
def test_adapting_on_the_h100_traces_costs_the_offline_fit_under_0_2_c(name, from_s):
    path = f"data/traces/{name}"
    run, fc = adapted(read_trace_records(path))
    s = score(run, fc, from_s)
    tr = read_trace(path)
    offline = static_score(replay(h100_params(), tr, 10.0), tr, start_s=from_s)
    assert s.rows == offline.rows
    assert s.temp_rmse_c <= offline.temp_rmse_c + 0.2
    assert s.mem_temp_rmse_c <= offline.mem_temp_rmse_c + 0.2


@pytest.mark.parametrize("scale_board, ambient_c", [(1.0, 30.0), (1.6, 33.0)])
def test_a_gpu_never_seen_is_learnt_online(scale_board, ambient_c):
    """The plant as the GPU, with the H200 fit's constants (and a board path 1.6 times as
    resistive: a different machine), idle 33-37 °C; the twin starts from the H100's."""
    h200 = TwinParams.load(H200_PARAMS_PATH)
    truth = h200.replace(board_amb_c_per_w=h200.board_amb_c_per_w * scale_board)
    run, fc = adapted(serving_records(truth, SCHEDULE, ambient_c, seed=3))
    s = score(run, fc, 30.0)
    assert s.temp_rmse_c <= 1.5 and s.mem_temp_rmse_c <= 2.0
    assert min(s.temp_band_coverage, s.mem_temp_band_coverage) >= 0.8
    # The heat path to the inlet it found is the plant's, to 15 %.
    p = run.params_at(len(run.t_s) - 1)
    r = p.die_sink_c_per_w + p.sink_board_c_per_w + p.board_amb_c_per_w
    r_true = truth.die_sink_c_per_w + truth.sink_board_c_per_w + truth.board_amb_c_per_w
    assert r == pytest.approx(r_true, rel=0.15)
    assert r_true != pytest.approx(0.049, rel=0.15)  # not where it started (H100: 0.049)


def test_idle_stretches_leave_the_thermal_constants_where_they_were():
    """Once the response to the last load step has died away (two minutes without the power
    moving), nothing identifies R and C: they do not move, however long the idle lasts."""
    h200 = TwinParams.load(H200_PARAMS_PATH)
    run, _ = adapted(serving_records(h200, [(10, 0.0), (30, 0.9), (250, 0.0)], 30.0, seed=5))
    t = run.t_s - run.t0_s
    assert run.excited[np.searchsorted(t, 100.0)]  # the cooling still teaches
    before, after = np.searchsorted(t, 170.0), len(t) - 1
    assert not run.excited[before:].any()
    np.testing.assert_array_equal(run.z[before, 7:15], run.z[after, 7:15])


def test_each_forecast_reads_nothing_at_or_after_its_origin():
    """Scrambling the readings from T on leaves every forecast made before T unchanged."""
    records = serving_records(h100_params(), [(5, 0.0), (25, 0.9), (10, 0.0)], 30.0, seed=7)
    _, fc = adapted(records, horizon_s=5.0)
    cut_s = 22.0
    rng = np.random.default_rng(0)
    import dataclasses

    from ondo.telemetry.schema import GpuSample

    scrambled = [dataclasses.replace(r, temp_c=float(rng.integers(30, 90)),
                                     power_instant_w=float(rng.uniform(50, 700)))
                 if isinstance(r, GpuSample) and r.t_monotonic_s >= cut_s else r
                 for r in records.records]
    _, fc2 = adapted(dataclasses.replace(records, records=scrambled), horizon_s=5.0)
    early = fc.t_s[fc.origin] < cut_s - 1e-9
    early &= fc.t_s < cut_s + 5.0 - 0.06  # origin strictly before the cut (one poll's margin)
    assert early.sum() > 50
    np.testing.assert_array_equal(fc.temp_c_pred[early], fc2.temp_c_pred[early])
    np.testing.assert_array_equal(fc.temp_c_band[early], fc2.temp_c_band[early])
    late = fc.t_s > cut_s + 6.0
    assert not np.array_equal(fc.temp_c_pred[late], fc2.temp_c_pred[late])
