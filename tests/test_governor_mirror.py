"""The GPU benchmark's budget setting mirrored in the simulator, and the pieces that mirror
needs: the closed-loop load, the pacing ratio, the drift-robust overhead estimate, and a
predictive policy that leaves the engine alone (one plan, no limits) when nothing binds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondo.control.objectives import Objectives
from ondo.control.predictive import PredictivePolicy
from ondo.control.sim.arrivals import SimRequest
from ondo.control.sim.calibration import h100_serving_params, h100_step_time
from ondo.control.sim.scenarios import qwen3_06b_cost_shape
from ondo.control.sim.simulator import ClosedLoopSimulator, SimConfig
from ondo.engine.scheduler_limits import UNLIMITED
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state
from tests.test_governor import CONFIG, engine_load, inputs, model_power, snapshot_at

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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


def test_the_overhead_estimate_cancels_a_steady_drift():
    overhead_fraction = _bench_module("governor_gpu").overhead_fraction
    order = ("off", "predictive", "predictive", "off") * 2
    # 1 % lost per run to the GPU warming, 0.5 % to the governor.
    runs = [{"policy": p, "output_tokens_per_s": 20_000 * (1 - 0.01 * i)
             * (0.995 if p == "predictive" else 1.0)} for i, p in enumerate(order)]
    assert overhead_fraction(runs) == pytest.approx(0.005, abs=5e-4)
    # Alternated pairs (off first), averaged as before, would have blamed the drift on it.
    off = np.mean([r["output_tokens_per_s"] for r in runs if r["policy"] == "off"])
    on = np.mean([r["output_tokens_per_s"] for r in runs if r["policy"] == "predictive"])
    assert 1 - on / off > 0.004 and overhead_fraction(runs[:2]) > 0.01


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


@pytest.mark.slow
def test_the_mirrored_gpu_run_holds_the_budget_at_reactive_throughput():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/governor_sim_h200.py", "--seconds", "30"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["governor_sim_h200"]["policies"]
    off, reactive, predictive = rows["off"], rows["reactive"], rows["predictive"]
    assert off["over_budget_fraction"] == 1.0 and 620 < off["mean_power_w"] < 665
    assert predictive["over_budget_fraction"] <= 0.02
    assert predictive["over_budget_fraction"] <= reactive["over_budget_fraction"]
    assert predictive["output_tokens_per_s"] >= 0.98 * reactive["output_tokens_per_s"]
    assert predictive["decisions"] <= 2 * max(reactive["decisions"], 5)
