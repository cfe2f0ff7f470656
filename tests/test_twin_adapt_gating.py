"""Bad readings never reach the online twin's constants: a 200 °C spike, a sensor stuck at a
value, a sample out of time order, a missing or non-finite reading are each refused and
counted by reason; readings that keep failing the gate but move together re-synchronise it."""

import dataclasses
import math

import numpy as np
import pytest

from ondo.telemetry.schema import GpuSample
from ondo.twin.adapt_replay import forecast_rows, run_trace, score
from ondo.twin.adaptive import AdaptiveTwin
from ondo.twin.gpu_models import H200_PARAMS_PATH
from ondo.twin.params import TwinParams, h100_params
from ondo.twin.synthetic_serving import serving_records

SCHEDULE = [(10, 0.0), (40, 0.9), (30, 0.0), (40, 0.9), (20, 0.0)]


@pytest.fixture(scope="module")
def clean():
    truth = TwinParams.load(H200_PARAMS_PATH)
    records = serving_records(truth, SCHEDULE, 32.0, seed=11)
    return records, run_trace(records, h100_params())


def corrupt(records, change):
    """The records with `change(trace time, sample)` applied to each GPU sample."""
    t0 = next(r.t_monotonic_s for r in records.records if isinstance(r, GpuSample))
    out = [change(r.t_monotonic_s - t0, r) if isinstance(r, GpuSample) else r
           for r in records.records]
    return dataclasses.replace(records, records=out)


def test_a_clean_trace_has_nothing_refused(clean):
    _, run = clean
    assert run.twin.rejected() == {"innovation": 0, "implausible": 0, "stuck": 0,
                                   "out_of_order": 0}


def test_a_200_c_spike_is_refused_and_counted_and_changes_nothing(clean):
    records, run = clean
    spikes = (25.0, 65.0, 95.0)

    def spike(t, s):
        if any(abs(t - x) < 0.026 for x in spikes):
            return dataclasses.replace(s, temp_c=200.0, mem_temp_c=float("nan"))
        return s

    bad = run_trace(corrupt(records, spike), h100_params())
    got = bad.twin.rejected()
    assert got["implausible"] == 2 * len(spikes)  # the die's 200 °C and the HBM's NaN
    assert bad.twin.die.counts.implausible == len(spikes)
    np.testing.assert_allclose(bad.twin.theta, run.twin.theta, rtol=0.02, atol=0.5)


def test_a_plausible_but_wild_reading_fails_the_innovation_gate(clean):
    records, run = clean

    def jump(t, s):
        return dataclasses.replace(s, mem_temp_c=s.mem_temp_c + 25.0) if abs(
            t - 70.0) < 0.026 else s

    bad = run_trace(corrupt(records, jump), h100_params())
    assert bad.twin.hbm.counts.innovation == 1
    assert bad.twin.rejected()["implausible"] == 0


def test_a_stuck_sensor_is_refused_once_the_power_moves_and_it_does_not(clean):
    records, run = clean
    stuck_from, stuck_to = 75.0, 105.0  # idle, then a load step at 80 s that it never sees

    def stick(t, s):
        return dataclasses.replace(s, temp_c=34.0) if stuck_from <= t < stuck_to else s

    bad = run_trace(corrupt(records, stick), h100_params())
    counts = bad.twin.die.counts
    rows = int(round((stuck_to - stuck_from - 80.0 + 75.0) / 0.05))  # polls after the step
    assert counts.stuck >= 0.7 * rows
    assert bad.twin.hbm.counts.stuck == 0  # the other sensor is read as ever
    # Once it reads again, the forecasts are as good as without the fault.
    fc_bad, fc = forecast_rows(bad, 10.0), forecast_rows(run, 10.0)
    assert score(bad, fc_bad, 116.0).temp_rmse_c <= score(run, fc, 116.0).temp_rmse_c + 0.5


def test_out_of_order_and_duplicate_samples_are_dropped_whole():
    twin = AdaptiveTwin(h100_params(), "engine")
    sample = GpuSample(0, "nvml", 10.0, 10.0, 0.05, 0.0, 40.0, 41.0, 120.0, 120.0, 1000.0,
                       1980.0, 1980.0, 2619.0, 0, 0.0)
    twin.on_gpu_sample(sample)
    twin.on_gpu_sample(sample)  # the same time again
    twin.on_gpu_sample(dataclasses.replace(sample, t_monotonic_s=9.0))
    twin.flush()
    assert twin.out_of_order == 2
    assert twin.samples == 1


def test_missing_readings_are_counted_and_the_rest_of_the_sample_is_used():
    twin = AdaptiveTwin(h100_params(), "engine")
    base = GpuSample(0, "nvml", 0.0, 0.0, 0.05, 0.0, 40.0, 41.0, 120.0, 120.0, 1000.0,
                     1980.0, 1980.0, 2619.0, 0, 0.0)
    for k in range(1, 41):
        s = dataclasses.replace(base, t_monotonic_s=0.05 * k, energy_j=1000.0 + 6.0 * k,
                                mem_temp_c=None if k % 2 else 41.0,
                                temp_c=math.inf if k == 7 else 40.0)
        twin.on_gpu_sample(s)
    twin.flush()
    assert twin.hbm.counts.missing == 19  # 20, less the first: the die's reading starts it
    assert twin.die.counts.implausible == 1
    assert twin.die.counts.accepted == 38  # the first sample starts the filter
    assert twin.samples == 40


def test_readings_that_keep_failing_the_gate_together_resynchronise_the_filter():
    """A reading stream that jumps 12 °C and stays there is the filter's error, not the
    sensor's: after RESYNC_AFTER_S of refusals the state follows it."""
    twin = AdaptiveTwin(h100_params(), "engine")
    for k in range(200):
        jump = 12.0 if k >= 100 else 0.0
        wobble = 0.0 if k % 20 < 10 else 1.0  # readings that move
        s = GpuSample(0, "nvml", 0.05 * k, 0.05 * k, 0.05, 0.0, 40.0 + jump + wobble,
                      41.0, 120.0, 120.0, 1000.0 + 6.0 * k, 1980.0, 1980.0, 2619.0, 0, 0.0)
        twin.on_gpu_sample(s)
    twin.flush()
    assert twin.die.counts.resyncs >= 1
    assert twin.die.counts.innovation >= 10
    assert twin.estimate().die_sensor_c == pytest.approx(52.5, abs=1.0)
