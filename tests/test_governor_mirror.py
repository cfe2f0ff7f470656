"""The GPU benchmark's budget setting mirrored in the simulator, and the pieces that mirror
needs: the closed-loop load, the server process's stalls, the pacing ratio, and a predictive
policy that leaves the engine alone when nothing binds (one plan; none at all, ticking once
a second, when nothing can bind); the previous law's failure reproduced with the gate on
fresh inputs off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondo.control.objectives import Objectives
from ondo.control.predictive import PredictivePolicy, PredictiveTuning
from ondo.control.sim.arrivals import SimRequest
from ondo.control.sim.calibration import h100_serving_params, h100_step_time
from ondo.control.sim.h200_mirror import MirrorSettings, run_mirror
from ondo.control.sim.scenarios import qwen3_06b_cost_shape
from ondo.control.sim.simulator import ClosedLoopSimulator, SimConfig
from ondo.control.sim.stalls import StallSchedule
from ondo.engine.scheduler_limits import UNLIMITED
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state
from tests.test_governor import CONFIG, engine_load, inputs, model_power, snapshot_at

ROOT = Path(__file__).resolve().parents[1]


def test_the_closed_loop_keeps_its_requests_in_flight_and_replaces_the_finished():
    requests = [SimRequest(100.0 + i, 64, 8 + i % 5) for i in range(5000)]  # times unused
    config = SimConfig(qwen3_06b_cost_shape(), h100_step_time(), h100_serving_params())
    result = ClosedLoopSimulator(config, requests, "off", concurrency=6).run(2.0)
    in_flight = result.series["num_running"] + result.series["num_waiting"]
    assert in_flight.max() == 6 and np.all(in_flight[1:] == 6)
    finished = int((result.output_tokens >= np.array(
        [r.output_tokens for r in requests[:len(result.output_tokens)]])).sum())
    assert finished > 20  # many replaced
    assert len(result.arrival_s) == finished + 6  # each finish released exactly one
    assert result.arrival_s.max() > 1.0  # released when a slot freed, not at the trace time


def test_predictive_with_nothing_binding_forecasts_full_load_and_sets_no_limit():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.3, 0.3), p.ambient_c))
    policy = PredictivePolicy(p, CONFIG)
    load = engine_load(busy=1.0, compute=0.3, memory=0.3)
    power = model_power(p, load, float(plant.state.die_c))
    budget = min(power + 50.0, p.power_limit_w - 10.0)
    assert power + 20.0 < budget < p.power_limit_w  # a budget that could bind, but does not
    for t in (1.0, 1.2, 1.4, 1.6):
        v = policy.decide(inputs(t, power=power, twin=snapshot_at(plant, t), load=load),
                          Objectives(power_budget_w=budget, temp_target_c=85.0), CONFIG)
        assert v.limits == UNLIMITED and v.reason == "no objective binds"
        assert v.forecast["plan_levels"] == [1.0, 1.0] and policy.period_s == 0.2


def test_predictive_plans_nothing_while_the_power_limit_cannot_bind_and_plans_again_at_once():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.3, 0.3), p.ambient_c))
    policy = PredictivePolicy(p, CONFIG)
    load = engine_load(busy=1.0, compute=0.3, memory=0.3)
    power = model_power(p, load, float(plant.state.die_c))
    free = Objectives(temp_target_c=85.0, hbm_temp_target_c=90.0)
    v = policy.decide(inputs(1.0, power=power, twin=snapshot_at(plant, 1.0), load=load), free,
                      CONFIG)
    assert v.limits == UNLIMITED and v.reason == "no objective binds at the GPU's power limit"
    assert v.forecast["power_w"] == p.power_limit_w  # the most any load can draw
    # The bound is a forecast at that power: hotter than the die now, under the targets.
    assert plant.state.die_sensor_c < v.forecast["full_load_die_peak_c"] <= 85.0 - 1.0
    assert policy.period_s == 1.0  # it ticks once a second
    # A target the power limit could reach: the full planning again, at the fast period.
    v = policy.decide(inputs(2.0, power=power, twin=snapshot_at(plant, 2.0), load=load),
                      Objectives(temp_target_c=v.forecast["full_load_die_peak_c"] - 0.5), CONFIG)
    assert v.reason == "no objective binds" and policy.period_s == 0.2
    # So does a budget under the power limit, set between two checks of the bound.
    policy.decide(inputs(3.0, power=power, twin=snapshot_at(plant, 3.0), load=load), free, CONFIG)
    assert policy.period_s == 1.0
    v = policy.decide(inputs(3.2, power=power, twin=snapshot_at(plant, 3.2), load=load),
                      Objectives(power_budget_w=power - 100.0), CONFIG)
    assert policy.period_s == 0.2 and v.limits.duty_cycle < 1.0


def test_the_pacing_ratio_learns_what_share_a_paced_engine_steps():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.3, 0.3), p.ambient_c))
    policy = PredictivePolicy(p, CONFIG)
    obj = Objectives(power_budget_w=300.0)
    t = 1.0
    for _ in range(40):  # the engine steps 80 % of the level it is given
        share = 0.8 * policy.level
        load = engine_load(busy=share, compute=0.5, memory=0.5)
        power = model_power(p, load, float(plant.state.die_c))
        policy.decide(inputs(t, power=power, twin=snapshot_at(plant, t), load=load), obj,
                      CONFIG)
        t += 0.2
    assert policy.level < 1.0
    assert 0.75 < policy.pacing_ratio < 0.9


def test_a_stalled_server_process_reads_nothing_ticks_not_admits_nothing_and_catches_up_late():
    requests = [SimRequest(0.0, 64, 200) for _ in range(2000)]
    stalls = StallSchedule((2.0,), (3.0,), catch_up=0.25)
    config = SimConfig(qwen3_06b_cost_shape(), h100_step_time(), h100_serving_params(),
                       stalls=stalls)
    sim = ClosedLoopSimulator(config, requests, "reactive", concurrency=64)  # 5 ticks a second
    ages: list[tuple[float, float | None]] = []
    tick = sim.governor.tick

    def observed(inputs):
        ages.append((inputs.t_monotonic_s, inputs.engine_sample_age_s))
        return tick(inputs)

    sim.governor.tick = observed
    result = sim.run(4.0)
    t = result.series["t_s"]
    assert not ((t > 2.0) & (t < 3.0)).any()  # no reading in the stall
    assert not any(2.0 < s < 3.0 for s, _ in ages)  # no tick
    running = result.series["num_running"]
    before, after = running[t < 2.0][-1], running[t >= 3.0][0]
    assert before == 64 and after < before  # requests finished, none admitted
    assert running[t > 3.5].max() == 64  # admitted again once it ended
    # The first tick after it knows the engine only up to the stall's start: the steps it
    # ran meanwhile come in over the next quarter of a second.
    first_after = [a for s, a in ages if s >= 3.0]
    assert first_after[0] > 0.9 and first_after[2] < 0.15
    assert stalls.held_until(2.5) == pytest.approx(3.125) and stalls.held_until(3.2) == 3.2
    assert stalls.stalled_fraction(0.0, 4.0) == 0.25


def test_random_stalls_are_seeded_and_within_their_bounds():
    a = StallSchedule.random(3.0, (0.2, 1.7), 600.0, seed=4)
    assert a == StallSchedule.random(3.0, (0.2, 1.7), 600.0, seed=4)
    spans = [e - s for s, e in zip(a.starts_s, a.ends_s)]
    assert min(spans) >= 0.2 and max(spans) <= 1.7 and len(spans) > 100
    assert all(e < s for e, s in zip(a.ends_s, a.starts_s[1:]))  # disjoint, in order
    assert 0.12 < a.stalled_fraction(0.0, 600.0) < 0.3
    with pytest.raises(ValueError, match="duration"):
        StallSchedule.random(3.0, (0.5, 0.2), 10.0)


@pytest.mark.slow
def test_learning_from_stale_inputs_drives_the_gain_to_its_floor_and_the_power_over_budget():
    """The mirror's stalls with the fresh-input gate off: what the GPU runs showed (the
    power model's gain at its floor, readings over the budget, tens of decisions); on, the
    budget holds."""
    settings = MirrorSettings(seed=1)
    results = {}
    for name, tuning in (("gate off", PredictiveTuning(fresh_s=1e9)),
                         ("gate on", PredictiveTuning())):
        row, result = run_mirror(settings, "predictive", predictive=tuning)
        gains = [d.forecast["power_gain"] for d in result.decisions
                 if "power_gain" in d.forecast and d.t_monotonic_s > settings.settle_s]
        results[name] = (row, min(gains, default=1.0))
    off_row, off_gain = results["gate off"]
    on_row, on_gain = results["gate on"]
    assert off_gain <= 0.3 and off_row["over_budget_fraction"] > 0.05
    assert off_row["decisions"] > 25
    assert on_gain > 0.5 and on_row["over_budget_fraction"] <= 0.01
    assert on_row["decisions"] <= 12


@pytest.mark.slow
def test_the_mirrored_gpu_run_holds_the_budget_at_reactive_throughput():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/governor_sim_h200.py", "--seeds", "0", "1",
                           "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])["governor_sim_h200"]["policies"]

    def mean(policy: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs[policy]]))

    assert min(r["over_budget_fraction"] for r in runs["off"]) == 1.0
    assert 620 < mean("off", "mean_power_w") < 665 and mean("off", "output_tokens_per_s") > 2e4
    assert max(r["over_budget_fraction"] for r in runs["predictive"]) <= 0.02
    assert mean("predictive", "over_budget_fraction") <= max(
        0.5 * mean("reactive", "over_budget_fraction"), 0.005)
    assert mean("predictive", "output_tokens_per_s") >= 0.96 * mean("reactive",
                                                                     "output_tokens_per_s")
    assert mean("predictive", "decisions") <= 2 * max(mean("reactive", "decisions"), 5)
