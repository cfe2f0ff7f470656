"""The live twin: estimator and forecast fed sample by sample (virtual time, against the
twin's own plant), and on its own thread from a real hub with the simulated GPU."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.telemetry.sim_source import SimulatedGpuSource
from ondo.twin.live import EngineLoadTracker, LiveTwin, TwinSnapshot, TwinTracker
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state

CONTRACT = ("gpu_index", "t_monotonic_s", "t_wall_s", "die_c", "hbm_c", "die_sensor_c",
            "ambient_c", "die_std_c", "forecast_horizon_s", "die_peak_c", "hbm_peak_c",
            "power_peak_w", "time_to_throttle_s", "time_to_power_cap_s")


def engine_sample(i: int, start: float, end: float, compute: float, memory: float,
                  prefill: int = 0, waiting: int = 0) -> EngineSample:
    return EngineSample(i, start, end, end, prefill, 0 if prefill else 64, 64, 64, 100, 1000,
                        0, 0, waiting, 64, 0, 1e12, 1e10, compute, memory,
                        num_waiting_tokens=waiting * 500)


def gpu_sample(plant: GpuPlant, t: float) -> GpuSample:
    r = plant.reading()
    return GpuSample(0, "sim", t, t, 0.05, 0.0, r.temp_c, r.mem_temp_c, r.power_w,
                     r.power_instant_w, r.energy_j, r.sm_mhz, 1980.0, r.mem_mhz,
                     r.throttle_reasons, r.util_pct)


def test_the_snapshot_keeps_the_field_names_and_order_other_layers_read():
    names = [f.name for f in dataclasses.fields(TwinSnapshot)]
    assert tuple(names[:len(CONTRACT)]) == CONTRACT
    snap = TwinSnapshot(0, 1.0, 2.0, 60, 61, 60, 30, 0.5, 10, 70, 71, 500, None, 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.die_c = 1.0  # type: ignore[misc]


def test_engine_load_counts_overlapping_steps_once_and_the_gaps_as_idle():
    tracker = EngineLoadTracker(tau_s=0.2)
    t = 0.0
    for i in range(200):  # 10 ms steps, each span overlapping the last (scheduling ahead)
        tracker.add(engine_sample(i, t - 0.01, t + 0.01, 0.5, 0.25))
        t += 0.01
    load = tracker.load(t)
    assert load.busy_fraction == pytest.approx(1.0, abs=0.01)
    assert load.compute_activity == pytest.approx(0.5, abs=1e-3)
    for i in range(200, 400):  # 10 ms steps, 10 ms gaps
        tracker.add(engine_sample(i, t, t + 0.01, 0.5, 0.25))
        t += 0.02
    assert tracker.load(t).busy_fraction == pytest.approx(0.5, abs=0.05)
    assert tracker.load(t + 5.0).busy_fraction < 0.01  # idle since


def test_the_tracker_sees_through_the_sensors_and_forecasts_the_slowdown_ahead():
    p = h100_params()  # engine units are plant units here (the packaged identity map)
    hot = p.ambient_c + 25.0
    plant = GpuPlant(p, hot, state=steady_state(p, Load(), hot))
    tracker = TwinTracker(p, horizon_s=40.0)
    warned_at = throttled_at = None
    dt, t, step = 0.05, 0.0, 0
    while t < 120.0 and throttled_at is None:
        load = Load(0.9, 0.1)
        plant.step(dt, load, hot)
        tracker.on_engine_sample(engine_sample(step, t, t + dt, load.compute_activity,
                                               load.memory_activity))
        t += dt
        step += 1
        tracker.on_gpu_sample(gpu_sample(plant, t))
        if step % 40 == 0:  # every 2 s
            snap = tracker.snapshot(t, t)
            if warned_at is None and snap.time_to_throttle_s is not None:
                warned_at = t
        if plant.reading().throttle_reasons & 0x60:
            throttled_at = t
    assert throttled_at is not None and warned_at is not None
    assert throttled_at - warned_at >= 10.0  # seen coming well ahead
    snap = tracker.snapshot(t, t, with_forecast=False)
    assert snap.die_c == pytest.approx(float(plant.state.die_c), abs=1.5)
    assert snap.hbm_c == pytest.approx(float(plant.state.hbm_c), abs=2.0)
    assert snap.ambient_c == pytest.approx(hot, abs=3.0)
    assert snap.gpu_samples == step


def test_the_live_twin_publishes_snapshots_from_the_simulated_gpu_on_its_own_thread():
    hub = TelemetryHub()
    got = hub.subscribe(maxsize=64, kinds=(TwinSnapshot,))
    source = SimulatedGpuSource(hub, hz=50.0)
    twin = LiveTwin(hub, h100_params(), period_s=0.1, horizon_s=5.0).start()
    source.start()
    try:
        t0 = time.monotonic()
        end = t0
        while time.monotonic() - t0 < 1.0:
            now = time.monotonic()
            hub.publish(engine_sample(0, end, now, 0.4, 0.3))
            end = now
            time.sleep(0.01)
        deadline = time.monotonic() + 10.0
        snaps = []
        while len(snaps) < 3 and time.monotonic() < deadline:
            s = got.queue.get(timeout=0.5)
            if s is not None:
                snaps.append(s)
    finally:
        source.stop()
        twin.stop()
    assert len(snaps) >= 3
    last = snaps[-1]
    assert last.gpu_samples > 10 and last.forecast_horizon_s == 5.0
    assert all(math.isfinite(getattr(last, f)) for f in ("die_c", "hbm_c", "die_peak_c",
                                                         "power_peak_w", "ambient_c"))
    assert last.die_peak_c >= last.die_sensor_c - 1e-9
    assert twin.errors == 0 and twin.published >= 3
