"""The predictive law's budget side and the inputs it learns from: the held level moves at most
once a second and only out of its band, the brake leaves the operating point's noise alone
and acts on excursions, the adaptive margin settles where its share of readings is over the
budget, the window's energy does not follow a duty-cycled instant reading, the busy share is
taken over NVML's own window, and nothing is learnt from, nor released on, stale inputs."""

from __future__ import annotations

import dataclasses
import random

import pytest

from ondo.control.inputs import BusySpans, InputTracker
from ondo.control.objectives import Objectives
from ondo.control.power_budget import BudgetBounds, BudgetTuning, window_energy_j
from ondo.control.predictive import PredictivePolicy
from ondo.control.thermal_model import LoadPower
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state
from tests.test_governor import CONFIG, engine_load, inputs, model_power, snapshot_at

# 100 W idle, 600 W busy: a level of u draws 100 + 500 u W.
POWER = LoadPower(idle_w=100.0, busy_w=600.0, hbm_idle_w=40.0, hbm_busy_w=120.0, die_c=60.0)


def power_at(scale: float) -> LoadPower:
    """The same load drawing `scale` times the busy power over idle."""
    return dataclasses.replace(POWER, busy_w=100.0 + 500.0 * scale)


def steady_inputs(t: float, power_w: float = 400.0):
    """A tick whose energy history says the last second drew `power_w` throughout."""
    history = tuple((t - 1.0 + 0.1 * k, 1000.0 + power_w * 0.1 * k) for k in range(11))
    return inputs(t, power=power_w, energy=history)


def test_the_held_level_moves_at_most_once_a_second_and_only_out_of_its_band():
    bounds = BudgetBounds(BudgetTuning(margin_w=15.0, cut_band=0.01, rise_band=0.025,
                                       dwell_s=1.0, hold_tau_s=0.2))
    budget = 515.0  # the held level aims at 500 W: u = 0.8
    held = []
    rng = random.Random(1)
    t = 10.0
    for _ in range(25):  # the load's mix wiggles the level by +-0.004
        scale = 1.0 + rng.uniform(-0.005, 0.005)
        bounds.levels(steady_inputs(t), budget, power_at(scale), power_at(scale), 0.8, 0.2)
        held.append(bounds.held)
        t += 0.2
    assert held[0] == pytest.approx(0.8, abs=0.005)
    assert len(set(held)) == 1  # noise inside the band: never moved
    # The load draws 5 % more: the level to hold drops by 0.04, past the cut band.
    changes = []
    for _ in range(15):
        bounds.levels(steady_inputs(t), budget, power_at(1.05), power_at(1.05), 0.8, 0.2)
        if bounds.held != held[-1]:
            changes.append(t)
            held.append(bounds.held)
        t += 0.2
    assert 1 <= len(changes) <= 2 and held[-1] < 0.8 - 0.025
    assert len(changes) == 1 or changes[1] - changes[0] >= 1.0  # a dwell between moves


def test_the_brake_leaves_the_operating_point_alone_and_cuts_an_excursion():
    t = BudgetTuning(margin_w=15.0, window_margin_w=10.0, window_band=0.0125)
    budget = 515.0
    bounds = BudgetBounds(t)
    # At the operating point (the last second at 500 W = B - 15): the held level, no brake.
    first, hold = bounds.levels(steady_inputs(10.0, 500.0), budget, POWER, POWER, 0.8, 0.2)
    assert first == hold == pytest.approx(0.8)
    # A little above it (507 W: the brake's bound 0.786, less than a band under 0.8): alone.
    first, _ = bounds.levels(steady_inputs(10.2, 507.0), budget, POWER, POWER, 0.8, 0.2)
    assert first == pytest.approx(0.8)
    # An excursion (530 W over the last second): half a second at P(u) must bring the
    # window's average back to B - 10, so P(u) <= 2 * 505 - 530 = 480 W, u <= 0.76.
    first, hold = bounds.levels(steady_inputs(10.4, 530.0), budget, POWER, POWER, 0.8, 0.2)
    assert first == pytest.approx(0.76, abs=1e-6) and hold == pytest.approx(0.8)
    # A burst in the queue (planned over the recent load): the wider margin, 15 W.
    burst = power_at(1.02)
    first, _ = bounds.levels(steady_inputs(10.6, 500.0), budget, burst, POWER, 0.8, 0.2)
    assert first == pytest.approx((2 * (515.0 - 15.0) - 500.0 - 100.0) / 510.0, abs=1e-6)


def test_the_adaptive_margin_settles_where_its_share_of_readings_is_over_the_budget():
    t = BudgetTuning(over_share=0.05, over_rise_w_per_s=10.0, max_extra_margin_w=30.0)
    bounds = BudgetBounds(t)
    budget = 500.0
    # The way down from an unconstrained load does not count: not armed until under.
    for _ in range(10):
        bounds.track_readings(620.0, budget, 0.2, fresh=True)
    assert bounds.extra_margin_w == 0.0
    # A law whose readings spread +-20 W around B - 10 + ... less the margin: the tracker
    # moves the mean down until 5 % of readings are over.
    rng = random.Random(0)
    over = []
    for k in range(20_000):
        power = budget - 10.0 - bounds.extra_margin_w + rng.gauss(0.0, 12.0)
        bounds.track_readings(power, budget, 0.2, fresh=True)
        if k > 5_000:
            over.append(power > budget)
    assert sum(over) / len(over) == pytest.approx(0.05, abs=0.01)
    assert 5.0 < bounds.extra_margin_w < 20.0
    # Stale readings (the poller late) count nothing; the clip holds against a flood.
    before = bounds.extra_margin_w
    bounds.track_readings(600.0, budget, 0.2, fresh=False)
    assert bounds.extra_margin_w == before
    for _ in range(1000):
        bounds.track_readings(600.0, budget, 0.2, fresh=True)
    assert bounds.extra_margin_w == 30.0
    # A new budget: disarmed again until the average is under it.
    bounds.track_readings(600.0, 450.0, 0.2, fresh=True)
    bounds.track_readings(600.0, 450.0, 0.2, fresh=True)
    assert bounds.extra_margin_w == 30.0


def test_the_window_energy_since_the_last_refresh_is_the_levels_power_not_an_instant():
    history = ((9.0, 0.0), (9.9, 450.0))  # 500 W over the counter's last refreshes
    for instant_w in (130.0, 650.0):  # a duty-cycled GPU read idle, or busy
        tick = dataclasses.replace(inputs(10.0, power=500.0, energy=history),
                                   power_instant_w=instant_w)
        # 0.4 s from the counter (200 J) and 0.1 s since its last refresh at 480 W.
        assert window_energy_j(tick, 0.5, 480.0) == pytest.approx(200.0 + 48.0)


def test_the_busy_share_is_taken_over_a_window_and_overlapping_steps_count_once():
    spans = BusySpans()
    for k in range(10):  # steps of 30 ms every 50 ms, each scheduled 10 ms ahead
        start = k * 0.05
        spans.add(start - 0.01 if k else start, start + 0.03)
    # The first covers 30 ms, each later one 40 ms (from 10 ms before its slot): 0.39 s.
    assert spans.share(0.0, 0.5) == pytest.approx((0.03 + 9 * 0.04) / 0.5)
    assert spans.share(0.1, 0.2) == pytest.approx(0.8)  # [0.09, 0.13] and [0.14, 0.18]
    assert spans.share(1.0, 2.0) == 0.0


def test_the_inputs_carry_the_busy_share_over_the_readings_own_window_and_their_ages():
    tracker = InputTracker()
    for k in range(40):  # a step of 25 ms every 50 ms: half busy
        t = 1.0 + 0.05 * k
        tracker.on_engine_sample(EngineSample(k, t, t + 0.025, 0.0, 0, 256, 256, 256, 100,
                                              1000, 0, 0, 0, 256, 0, 1e12, 1e10, 0.2, 0.5))
    tracker.on_gpu_sample(GpuSample(0, "sim", 2.9, 0.0, 0.05, 0.001, 60.0, 60.0, 400.0, 400.0,
                                    1000.0, 1980.0, 1980.0, 2619.0, 0, 50.0))
    got = tracker.inputs(3.2, 0.0)
    assert got.power_window_end_s == pytest.approx(2.85)
    assert got.busy_share_power_window == pytest.approx(0.5, abs=0.03)
    assert got.gpu_sample_age_s == pytest.approx(0.3)
    assert got.engine_sample_age_s == pytest.approx(3.2 - (1.0 + 0.05 * 39 + 0.025))
    record = got.as_dict()
    assert record["gpu_sample_age_s"] == 0.3 and record["engine_sample_age_s"] == 0.225


def test_nothing_is_learnt_from_nor_released_on_stale_inputs():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.3, 0.3), p.ambient_c))
    obj = Objectives(power_budget_w=350.0)
    load = engine_load(busy=0.6, compute=0.5, memory=0.4)
    power = model_power(p, load, float(plant.state.die_c))
    fresh = PredictivePolicy(p, CONFIG)
    stale = PredictivePolicy(p, CONFIG)
    t = 1.0
    for _ in range(20):
        for policy, age in ((fresh, 0.01), (stale, 0.9)):  # the engine's steps 0.9 s late
            policy.decide(inputs(t, power=power + 60.0, twin=snapshot_at(plant, t), load=load,
                                 engine_age_s=age), obj, CONFIG)
        t += 0.2
    # The fresh policy learnt the 60 W its model misses; the stale one learnt nothing.
    assert fresh.calibration.offset_w > 20.0 or fresh.calibration.gain > 1.1
    assert stale.calibration.offset_w == 0.0 and stale.calibration.gain == 1.0
    # A level cut on fresh inputs is not released while they are stale.
    level = fresh.level
    assert level < 1.0
    for _ in range(15):
        fresh.decide(inputs(t, power=200.0, twin=snapshot_at(plant, t), load=load,
                            engine_age_s=0.9), obj, CONFIG)
        t += 0.2
    assert fresh.level <= level
    for _ in range(15):
        fresh.decide(inputs(t, power=200.0, twin=snapshot_at(plant, t), load=load), obj,
                     CONFIG)
        t += 0.2
    assert fresh.level > level  # released once they are fresh again
