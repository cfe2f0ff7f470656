"""The governor's deciding code: objectives checked against the GPU, the reactive and
predictive laws on the twin's own plant, decisions as records (hub, SQLite, /metrics), and
the fall-back to off when a policy raises."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ondo.control.decision import DECISION_TABLE, GovernorDecision
from ondo.control.governor import Governor
from ondo.control.inputs import GovernorInputs
from ondo.control.metrics import register_governor_metrics
from ondo.control.objectives import GpuFacts, ObjectiveError, Objectives, resolve_objectives
from ondo.control.policy import EngineConfig, TpotShaper, limits_for
from ondo.control.predictive import PredictivePolicy
from ondo.control.reactive import ReactivePolicy, ReactiveTuning
from ondo.control.thermal_model import forecast_plans, load_power, ripple_c
from ondo.engine.scheduler_limits import UNLIMITED
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.store import TelemetryStore
from ondo.twin.live import EngineLoad, TwinSnapshot
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state

CONFIG = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192)


def facts(ambient_c: float | None = None) -> GpuFacts:
    return GpuFacts.from_params(h100_params(), ambient_c)


def engine_load(busy: float = 1.0, compute: float = 0.25, memory: float = 0.4,
                waiting_tokens: int = 0) -> EngineLoad:
    return EngineLoad(compute, memory, busy, 0.42, 0.05, compute, memory, 150_000.0, 0.1,
                      1 if waiting_tokens else 0, waiting_tokens, 200, 0.0, 0.5, busy)


def model_power(p, load: EngineLoad, die_c: float) -> float:
    """What the twin's own power model says the load draws (the plant here is the twin)."""
    lp = load_power(p, load.compute_activity, load.memory_activity, 1980.0, die_c)
    return float(lp.total_w(load.busy_fraction_1s))


def inputs(t: float, die: float | None = 60.0, hbm: float | None = 60.0, power: float = 400.0,
           load: EngineLoad | None = None, twin: TwinSnapshot | None = None,
           energy: tuple = (), gpu_age_s: float = 0.02,
           engine_age_s: float = 0.01) -> GovernorInputs:
    """What a tick sees, its GPU reading and the engine's latest step that recent."""
    load = dataclasses.replace(load or engine_load(), last_step_end_s=t - engine_age_s)
    return GovernorInputs(t, 1e9 + t, die, hbm, power, power, 1980.0, 0, energy, load, twin,
                          None, gpu_sample_age_s=gpu_age_s)


def snapshot_at(plant: GpuPlant, t: float) -> TwinSnapshot:
    """The twin's estimate, here the plant's true state (the estimator is tested elsewhere)."""
    s = plant.state
    r = plant.reading()
    return TwinSnapshot(0, t, t, float(s.die_c), float(s.hbm_c), float(s.die_sensor_c),
                        plant.params.ambient_c, 0.3, 0.0, float(s.die_sensor_c),
                        float(s.hbm_sensor_c), r.power_w, None, None,
                        hbm_sensor_c=float(s.hbm_sensor_c), sink_c=float(s.sink_c),
                        board_c=float(s.board_c), power_w=r.power_w,
                        power_instant_w=r.power_instant_w, sm_mhz=r.sm_mhz)


# -- objectives -------------------------------------------------------------------------

def test_default_targets_sit_the_margin_under_the_gpu_thresholds():
    o = resolve_objectives(facts())
    assert o.temp_target_c == 87.0 - 5.0 and o.hbm_temp_target_c == 95.0 - 5.0
    assert o.power_budget_w is None and o.tpot_slo_s is None
    o = resolve_objectives(facts(), temp_margin_c=2.0, tpot_slo_ms=50.0, power_budget_w=450.0)
    assert (o.temp_target_c, o.hbm_temp_target_c, o.tpot_slo_s, o.power_budget_w) == \
        (85.0, 93.0, 0.05, 450.0)


@pytest.mark.parametrize("kwargs, flag", [
    ({"power_budget_w": 100.0}, "--power-budget-w"),  # under idle power
    ({"temp_target_c": 20.0}, "--temp-target-c"),  # under the inlet
    ({"temp_target_c": 36.0}, "--temp-target-c"),  # above the inlet, under the idle die
    ({"hbm_temp_target_c": 30.0}, "--hbm-temp-target-c"),
    ({"temp_margin_c": 80.0}, "--temp-margin-c"),  # default targets under the inlet
    ({"temp_margin_c": -1.0}, "--temp-margin-c"),
    ({"tpot_slo_ms": 0.0}, "--tpot-slo-ms"),
])
def test_an_objective_the_gpu_cannot_meet_is_refused_naming_its_flag(kwargs, flag):
    f = facts()
    assert f.idle_power_w > 100.0 and f.ambient_c > 30.0 and f.idle_die_c > 36.0
    with pytest.raises(ObjectiveError, match=flag) as e:
        resolve_objectives(f, **kwargs)
    assert e.value.flag == flag


# -- the reactive law ------------------------------------------------------------------

def test_reactive_cuts_on_a_reading_over_target_holds_in_the_band_and_releases_slowly():
    tuning = ReactiveTuning(decrease_factor=0.8, increase_step=0.05, hold_s=1.0, up_hold_s=1.0,
                            power_hysteresis_w=20.0)
    policy = ReactivePolicy(CONFIG, tuning)
    obj = Objectives(power_budget_w=450.0, temp_target_c=82.0, hbm_temp_target_c=90.0)
    duty = [policy.decide(inputs(0.0, power=455.0), obj, CONFIG).limits.duty_cycle]
    duty.append(policy.decide(inputs(0.5, power=470.0), obj, CONFIG).limits.duty_cycle)  # hold
    duty.append(policy.decide(inputs(1.0, power=460.0), obj, CONFIG).limits.duty_cycle)
    duty.append(policy.decide(inputs(2.0, power=440.0), obj, CONFIG).limits.duty_cycle)  # band
    duty.append(policy.decide(inputs(3.0, power=420.0), obj, CONFIG).limits.duty_cycle)
    duty.append(policy.decide(inputs(3.5, power=420.0), obj, CONFIG).limits.duty_cycle)
    duty.append(policy.decide(inputs(4.0, power=420.0), obj, CONFIG).limits.duty_cycle)
    assert duty == [0.8, 0.8, 0.6, 0.6, 0.6, 0.6, 0.65]
    v = policy.decide(inputs(5.0, die=83.0, power=300.0), obj, CONFIG)
    assert v.limits.duty_cycle == 0.55 and "die temperature" in v.reason  # 0.69 x 0.8


# -- the predictive law -----------------------------------------------------------------

def test_the_linear_model_forecasts_what_the_duty_cycled_plant_does():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.1, 0.1), p.ambient_c))
    snap = snapshot_at(plant, 0.0)
    lp = load_power(p, 0.6, 0.4, 1980.0, snap.die_c)
    z0 = np.array([snap.die_c, snap.hbm_c, snap.sink_c, snap.board_c, snap.die_sensor_c,
                   snap.hbm_sensor_c])
    half = np.array([0.5])
    temps = forecast_plans(p, z0, p.ambient_c, lp, half, half, 1.0, 20.0, 0.5)
    ripple_die, ripple_hbm = ripple_c(p, lp, half)
    die, hbm = [], []
    for k in range(2000):  # 20 s at half duty: 40 ms busy, 40 ms idle
        plant.step(0.01, Load(0.6, 0.4) if (k // 4) % 2 == 0 else Load())
        die.append(float(plant.state.die_sensor_c))
        hbm.append(float(plant.state.hbm_sensor_c))
    last = slice(-200, None)  # the last 2 s
    # The level-averaged forecast is the plant's average; with the busy ripple, its peak.
    assert float(temps[0, -1, 0] - ripple_die[0]) == pytest.approx(np.mean(die[last]), abs=1.0)
    assert float(temps[1, -1, 0] - ripple_hbm[0]) == pytest.approx(np.mean(hbm[last]), abs=1.0)
    assert max(die[last]) <= float(temps[0, -1, 0]) + 0.5
    assert max(die[last]) >= float(temps[0, -1, 0]) - 2.0
    assert ripple_die[0] > 1.0  # 0.0135 °C/W over a few hundred watts


def test_predictive_holds_full_load_when_nothing_binds_and_cuts_before_a_hot_gpu_overshoots():
    p = h100_params()
    obj = resolve_objectives(GpuFacts.from_params(p, p.ambient_c + 25.0))
    cool = GpuPlant(p, state=steady_state(p, Load(0.1, 0.1), p.ambient_c))
    policy = PredictivePolicy(p, CONFIG)
    load = engine_load(compute=0.5, memory=0.3)
    v = policy.decide(inputs(0.0, power=model_power(p, load, float(cool.state.die_c)),
                             twin=snapshot_at(cool, 0.0), load=load), obj, CONFIG)
    assert v.limits.duty_cycle == 1.0 and v.reason.startswith("no objective binds")
    # Hot inlet, heatsink already warm: full load would take the die past its target.
    hot = GpuPlant(p, ambient_c=p.ambient_c + 25.0,
                   state=steady_state(p, Load(0.3, 0.2), p.ambient_c + 25.0))
    assert hot.state.die_c < obj.temp_target_c
    policy = PredictivePolicy(p, CONFIG)
    load = engine_load(compute=0.9, memory=0.3)
    v = policy.decide(inputs(0.0, power=model_power(p, load, float(hot.state.die_c)),
                             twin=snapshot_at(hot, 0.0), load=load), obj, CONFIG)
    assert v.forecast["full_load_die_peak_c"] > obj.temp_target_c
    assert v.limits.duty_cycle < 1.0 and "die temperature" in v.reason
    assert v.forecast["die_peak_c"] <= obj.temp_target_c
    # The plant, run at the chosen level, stays under the target.
    u = v.limits.duty_cycle
    for k in range(int(30 / 0.01)):
        busy = (k % 8) < 8 * u
        hot.step(0.01, Load(0.9, 0.3) if busy else Load(), p.ambient_c + 25.0)
        assert hot.state.die_sensor_c < obj.temp_target_c + 0.5


def test_predictive_brings_the_one_second_average_back_under_the_budget_within_the_window():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.3, 0.3), p.ambient_c))
    policy = PredictivePolicy(p, CONFIG)
    obj = Objectives(power_budget_w=350.0)
    load = engine_load(busy=0.33, compute=0.6, memory=0.5)
    power = model_power(p, load, float(plant.state.die_c))
    assert 355.0 < power < 370.0  # the last second, a little over the budget
    v = policy.decide(inputs(1.0, power=power, twin=snapshot_at(plant, 1.0), load=load,
                             energy=((0.0, 0.0), (1.0, power))), obj, CONFIG)
    lp = load_power(p, 0.6, 0.5, 1980.0, float(plant.state.die_c))
    u = v.limits.duty_cycle
    # Half a second ahead the average is (0.5 s of the last second + 0.5 s at P(u)) / 1 s:
    # under the budget less its 15 W margin only if P(u) <= 2 (350 - 15) - P_last.
    bound = 2 * (350.0 - 15.0) - power
    assert "power budget" in v.reason
    assert float(lp.total_w(u)) <= bound + 0.5
    assert float(lp.total_w(u + 0.05)) > bound  # and no lower than the grid needs


def test_planned_prefill_moves_the_predictive_level_before_the_power_does():
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.2, 0.3), p.ambient_c))
    obj = Objectives(power_budget_w=420.0)
    levels = []
    for waiting in (0, 400_000):
        policy = PredictivePolicy(p, CONFIG)
        load = engine_load(busy=0.8, compute=0.2, memory=0.45, waiting_tokens=waiting)
        power = model_power(p, load, float(plant.state.die_c))
        v = policy.decide(inputs(1.0, power=power, twin=snapshot_at(plant, 1.0), load=load,
                                 energy=((0.0, 0.0), (1.0, power))), obj, CONFIG)
        levels.append(v.limits.duty_cycle)
    assert levels[1] < levels[0]  # a queue of prompts is power the sensors have not seen yet


# -- the governor: decisions as data, and its fall-back ----------------------------------

class Exploding:
    name = "predictive"
    period_s = 0.2

    def decide(self, *args):
        raise RuntimeError("model diverged")


def test_a_policy_that_raises_falls_back_to_off_logs_once_and_is_recorded(caplog):
    g = Governor(h100_params(), Objectives(power_budget_w=450.0), CONFIG, "reactive")
    assert g.tick(inputs(0.0, power=500.0)).limits["duty_cycle"] == 0.8
    caplog.set_level(logging.ERROR, logger="ondo.control.governor")
    for _ in range(2):
        g.policy = Exploding()
        d = g.tick(inputs(1.0, power=500.0))
        assert d.policy == "off" and "model diverged" in d.reason and "fell back to off" in d.reason
        assert d.limits == UNLIMITED.as_dict() and g.limits == UNLIMITED
    assert g.failures == 2
    assert len([r for r in caplog.records if "falling back" in r.getMessage()]) == 1
    assert g.tick(inputs(2.0, power=500.0)) is None  # off now: no change, no record


def test_decisions_only_on_change_published_and_stored_as_canonical_json(tmp_path):
    hub = TelemetryHub()
    db = tmp_path / "t.db"
    store = TelemetryStore(db, tables=[DECISION_TABLE])
    store.attach(hub)
    seen = []
    hub.subscribe(seen.append, kinds=(GovernorDecision,))
    g = Governor(h100_params(), Objectives(power_budget_w=450.0), CONFIG, "reactive")
    for t, power in ((0.0, 400.0), (0.2, 460.0), (0.4, 470.0), (0.6, 470.0)):
        d = g.tick(inputs(t, power=power))
        if d is not None:
            hub.publish(d)
    hub.publish(g.set_policy("predictive", now_s=1.0))
    store.close()
    assert [d.limits["duty_cycle"] for d in seen] == [0.8, 1.0]
    assert [d.policy for d in seen] == ["reactive", "predictive"]
    assert list(GovernorDecision.__dataclass_fields__)[:7] == [
        "t_monotonic_s", "t_wall_s", "policy", "reason", "limits", "inputs", "forecast"]
    rows = sqlite3.connect(db).execute(
        "SELECT t_monotonic_s, policy, reason, limits, inputs, objectives "
        "FROM governor_decisions ORDER BY t_monotonic_s").fetchall()
    assert [r[:2] for r in rows] == [(0.2, "reactive"), (1.0, "predictive")]
    assert rows[0][3] == json.dumps(seen[0].limits, sort_keys=True, separators=(",", ":"))
    assert json.loads(rows[0][4])["power_w"] == 460.0
    assert json.loads(rows[1][5])["power_budget_w"] == 450.0


def test_a_predictive_decision_made_on_numpy_readings_is_stored(tmp_path):
    """Readings arrive as numpy scalars from the poller; the decision built on them (its
    freshness flag, its ages) must still be plain JSON in the telemetry database."""
    p = h100_params()
    plant = GpuPlant(p, state=steady_state(p, Load(0.3, 0.3), p.ambient_c))
    load = engine_load(busy=0.33, compute=0.6, memory=0.5)
    power = np.float64(model_power(p, load, float(plant.state.die_c)))
    v = PredictivePolicy(p, CONFIG).decide(
        inputs(1.0, power=power, twin=snapshot_at(plant, 1.0), load=load,
               energy=((0.0, 0.0), (1.0, power)), gpu_age_s=np.float64(0.05),
               engine_age_s=np.float64(0.02)), Objectives(power_budget_w=350.0), CONFIG)
    assert "power budget" in v.reason and type(v.forecast["fresh"]) is bool
    decision = GovernorDecision(1.0, 1e9, "predictive", v.reason, v.limits.as_dict(),
                                {"power_w": power, "gpu_sample_age_s": np.float64(0.05),
                                 "fresh": np.bool_(True)}, v.forecast)
    db = tmp_path / "t.db"
    store = TelemetryStore(db, tables=[DECISION_TABLE])
    hub = TelemetryHub()
    store.attach(hub)
    hub.publish(decision)
    store.close()
    (row,) = sqlite3.connect(db).execute("SELECT inputs, forecast FROM governor_decisions")
    assert json.loads(row[0]) == {"power_w": float(power), "gpu_sample_age_s": 0.05,
                                  "fresh": True}
    assert json.loads(row[1])["fresh"] is True


def test_metrics_show_the_policy_objectives_and_limits_in_force():
    g = Governor(h100_params(), Objectives(power_budget_w=450.0, temp_target_c=82.0), CONFIG,
                 "reactive")
    registry = CollectorRegistry()
    register_governor_metrics(registry, g)
    g.tick(inputs(0.0, power=460.0))
    text = generate_latest(registry).decode()
    assert 'ondo:governor_policy{policy="reactive"} 1.0' in text
    assert 'ondo:governor_policy{policy="predictive"} 0.0' in text
    assert "ondo:governor_power_budget_watts 450.0" in text
    assert 'ondo:governor_temperature_target_celsius{sensor="die"} 82.0' in text
    assert 'ondo:governor_temperature_target_celsius{sensor="hbm"} +Inf' in text
    assert 'ondo:governor_limit{limit="duty_cycle"} 0.8' in text
    assert 'ondo:governor_limit{limit="max_num_seqs"} +Inf' in text
    assert "ondo:governor_decisions_total 1.0" in text
    with pytest.raises(ValueError, match="off, reactive, predictive"):
        g.set_policy("pid")


def test_the_tpot_slo_shrinks_the_batch_when_missed_and_gives_it_back_with_slack():
    shaper = TpotShaper(CONFIG, hold_s=1.0)
    assert not shaper.update(0.5, None, 0.0)  # no SLO: nothing shaped
    assert shaper.update(0.08, 0.05, 1.0)  # p99 80 ms against 50 ms: cut
    assert (shaper.seats, shaper.chunk) == (204, 4096)
    assert shaper.update(0.08, 0.05, 1.5)  # held: no second cut within hold_s
    assert (shaper.seats, shaper.chunk) == (204, 4096)
    shaper.update(0.08, 0.05, 2.5)
    assert (shaper.seats, shaper.chunk) == (163, 2048)
    shaper.update(0.04, 0.05, 4.0)  # inside the SLO but above 70 % of it: keep
    assert (shaper.seats, shaper.chunk) == (163, 2048)
    for k in range(20):  # well inside: give back, up to the configured limits
        shaper.update(0.02, 0.05, 5.0 + k)
    assert (shaper.seats, shaper.chunk) == (None, None)
    limits = limits_for(0.8, 163, 2048)
    assert (limits.max_num_seqs, limits.max_prefill_tokens, limits.duty_cycle) == (163, 2048, 0.8)


def test_the_service_acts_on_hub_samples_applies_limits_and_sends_them_again(monkeypatch):
    import time

    import ondo.control.service as service_mod
    from ondo.control.service import GovernorService
    from ondo.telemetry.schema import GpuSample

    monkeypatch.setattr(service_mod, "REAPPLY_S", 0.3)
    hub = TelemetryHub()
    decisions = []
    hub.subscribe(decisions.append, kinds=(GovernorDecision,))
    applied = []
    g = Governor(h100_params(), Objectives(power_budget_w=450.0), CONFIG, "reactive")
    service = GovernorService(hub, g, applied.append).start()
    try:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and len(decisions) < 2:
            now = time.monotonic()
            hub.publish(GpuSample(0, "sim", now, time.time(), 0.05, 0.0, 60.0, 60.0, 480.0,
                                  480.0, 1000.0 * now, 1980.0, 1980.0, 2619.0, 0, 90.0))
            time.sleep(0.05)
        n = len(applied)
        time.sleep(0.8)  # no new sample: no new decision, the limits sent again
    finally:
        service.stop()
    assert [d.reason for d in decisions[:2]] == ["policy set to reactive",
                                                 "power budget at or over target"]
    assert decisions[1].limits["duty_cycle"] == 0.8 and applied[1].duty_cycle == 0.8
    assert len(applied) > n and applied[-1] == g.limits
