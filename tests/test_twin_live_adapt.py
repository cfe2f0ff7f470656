"""The online twin inside the live path: the tracker forecasts with the adapted constants and
says how sure it is; the server's live twin saves them per GPU (NVML UUID) in a real SQLite
telemetry database and resumes them at the next start; /metrics shows them."""

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.nvml_source import NvmlSource
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.telemetry.sim_source import SimulatedGpuSource
from ondo.telemetry.store import TelemetryStore
from ondo.twin.adaptive import AdaptiveTwin
from ondo.twin.gpu_models import H200_PARAMS_PATH, GpuIdentity, packaged_params_for
from ondo.twin.live import TwinSnapshot, TwinTracker
from ondo.twin.live_adapt import gpu_identity, start_live_twin
from ondo.twin.metrics import register_twin_metrics
from ondo.twin.params import TwinParams, h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state
from ondo.twin.store_tables import (
    TWIN_TABLES,
    constants_history,
    drift,
    latest_constants,
)


def engine_sample(i: int, start: float, end: float, compute: float, memory: float):
    return EngineSample(i, start, end, end, 0, 64, 64, 64, 100, 1000, 0, 0, 0, 64, 0, 1e12,
                        1e10, compute, memory)


def gpu_sample(plant: GpuPlant, t: float, energy_j: float) -> GpuSample:
    r = plant.reading()
    return GpuSample(0, "sim", t, t, 0.05, 0.0, float(r.temp_c), float(r.mem_temp_c),
                     r.power_w, r.power_instant_w, energy_j, r.sm_mhz, 1980.0, r.mem_mhz,
                     r.throttle_reasons, r.util_pct)


def serve_virtual(plant, trackers, duration_s, load_at, ambient_c, every_s=0.25):
    """Run the plant under load_at(t) (engine units = its plant units), feeding each tracker
    the engine's steps and the GPU's polls; snapshots every every_s. Returns them per tracker."""
    dt, t, step, energy = 0.05, 0.0, 0, 0.0
    snaps = [[] for _ in trackers]
    while t < duration_s:
        c, m = load_at(t)
        plant.step(dt, Load(c, m), ambient_c)
        energy += plant.state.power_instant_w.item() * dt
        for tr in trackers:
            if c or m:
                tr.on_engine_sample(engine_sample(step, t, t + dt, c, m))
        t += dt
        step += 1
        for tr in trackers:
            tr.on_gpu_sample(gpu_sample(plant, t, energy))
        if step % int(round(every_s / dt)) == 0:
            for tr, out in zip(trackers, snaps):
                s = tr.snapshot(t, t)
                if s is not None:
                    out.append(s)
    return snaps


def test_the_adapting_tracker_forecasts_an_unseen_gpu_better_and_knows_how_well():
    """An H200-like plant (the packaged H200 fit as the truth, a hotter inlet); both trackers
    start from the H100 constants; one adapts. Its forecasts' errors, scored as their time
    comes, are smaller, and its band says so."""
    truth = TwinParams.load(H200_PARAMS_PATH).replace(engine_compute_gain=1.0,
                                                      engine_compute_inv_max=0.0,
                                                      engine_memory_gain=1.0)
    plant = GpuPlant(truth, 34.0, state=steady_state(truth, Load(), 34.0))
    fixed = TwinTracker(h100_params(), horizon_s=10.0)
    adapting = TwinTracker(h100_params(), horizon_s=10.0,
                           adaptive=AdaptiveTwin(h100_params(), "plant"))

    def load_at(t):  # 30 s on, 30 s off, half compute-bound, half memory-bound
        return (0.5, 0.4) if int(t // 30) % 2 == 1 else (0.0, 0.0)

    fixed_snaps, snaps = serve_virtual(plant, [fixed, adapting], 180.0, load_at, 34.0)
    assert snaps[-1].adapted and not fixed_snaps[-1].adapted
    assert adapting.scorer.die.errors > 100
    assert adapting.scorer.die.mean_abs_c < 0.75 * fixed.scorer.die.mean_abs_c
    assert adapting.scorer.hbm.mean_abs_c < fixed.scorer.hbm.mean_abs_c
    last = snaps[-1]
    assert last.die_band_c >= 0.5 and math.isfinite(last.hbm_band_c)
    assert last.die_band_c < fixed_snaps[-1].die_band_c
    assert 0.0 <= last.throttle_probability < 0.01  # 50 °C and falling: nowhere near 87


def test_the_throttle_probability_rises_ahead_of_a_thermal_slowdown():
    p = h100_params()
    hot = p.ambient_c + 25.0  # as tests/test_live_twin.py: a slowdown under full load
    plant = GpuPlant(p, hot, state=steady_state(p, Load(), hot))
    tracker = TwinTracker(p, horizon_s=40.0, adaptive=AdaptiveTwin(p, "plant"))
    snaps = serve_virtual(plant, [tracker], 150.0, lambda t: (0.9, 0.1) if t > 5 else (0, 0),
                          hot, every_s=1.0)[0]
    slowed = next((s.t_monotonic_s for s in snaps if s.throttle_reasons & 0x60), None)
    assert slowed is not None
    first = snaps[2]
    assert first.throttle_probability < 0.05
    warned = [s for s in snaps if s.t_monotonic_s <= slowed - 10.0]
    assert warned and warned[-1].throttle_probability > 0.5


@pytest.fixture()
def db(tmp_path):
    return tmp_path / "telemetry.db"


def run_live(db, seconds=1.5, adapt=True):
    """The server's live twin beside the simulated GPU for a while, then stopped."""
    hub = TelemetryHub()
    store = TelemetryStore(db, tables=TWIN_TABLES)
    store.attach(hub)
    source = SimulatedGpuSource(hub, hz=50.0)
    ident = gpu_identity(source)
    twin = start_live_twin(hub, ident, None, adapt, db)
    registry = CollectorRegistry()
    register_twin_metrics(registry, twin)
    source.start()
    try:
        t0 = end = time.monotonic()
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            hub.publish(engine_sample(0, end, now, 0.4, 0.3))
            end = now
            time.sleep(0.01)
        deadline = time.monotonic() + 5.0
        while twin.latest is None and time.monotonic() < deadline:
            time.sleep(0.05)
        scrape = generate_latest(registry).decode()
    finally:
        source.stop()
        twin.stop()
        store.close()
    return twin, scrape


def test_the_constants_are_saved_under_the_gpu_uuid_and_resumed_at_the_next_start(db):
    first, _ = run_live(db)
    saved = latest_constants(db, "SIM-0")
    assert saved is not None and saved.gpu_name == "ondo simulated GPU"
    np.testing.assert_allclose(saved.theta, first.tracker.adaptive.theta)
    assert saved.samples == first.tracker.adaptive.samples > 20
    assert saved.params["idle_power_w"] == pytest.approx(saved.values()["idle_power_w"])
    second, _ = run_live(db)
    np.testing.assert_allclose(second.tracker.adaptive.theta0, saved.theta)
    history = constants_history(db, "SIM-0")
    assert len(history) == 2 and history[0].t_wall_s < history[1].t_wall_s
    ratios = drift(history)
    assert set(ratios) >= {"board_amb_c_per_w", "idle_power_w"}
    assert latest_constants(db, "GPU-other") is None


def test_the_forecasts_and_their_confidence_are_stored_and_on_metrics(db):
    import sqlite3

    twin, scrape = run_live(db)
    assert twin.published >= 3
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT die_band_c, throttle_probability, adapted FROM "
                            "twin_forecasts").fetchall()
    assert len(rows) == twin.published
    assert all(r[0] > 0 and 0.0 <= r[1] <= 1.0 and r[2] == 1 for r in rows)
    for name in ('ondo:twin_forecast_band_celsius{gpu="0",sensor="die"}',
                 'ondo:twin_throttle_probability{gpu="0"}',
                 'ondo:twin_adapted_constant{gpu="0",name="board_amb_c_per_w"}',
                 'ondo:twin_rejected_samples_total{gpu="0",reason="stuck"}'):
        assert name in scrape


def test_with_adaptation_off_nothing_is_saved_and_the_band_is_still_given(db):
    twin, scrape = run_live(db, adapt=False)
    assert twin.tracker.adaptive is None
    assert latest_constants(db, "SIM-0") is None
    assert twin.latest is not None and twin.latest.die_band_c > 0
    assert "ondo:twin_adapted_constant" not in scrape


def test_the_packaged_fit_is_chosen_by_nvml_name():
    assert packaged_params_for("NVIDIA H200")[1] == "h200_params.json"
    assert packaged_params_for("NVIDIA H100 80GB HBM3")[1] == "h100_params.json"
    assert packaged_params_for("NVIDIA A100-SXM4-80GB")[1] == "h100_params.json"
    assert packaged_params_for(None)[1] == "h100_params.json"


class _NamedNvml(SimpleNamespace):
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_ERROR_NOT_SUPPORTED = 0, 1, 2, 3

    def nvmlInit(self): ...
    def nvmlShutdown(self): ...
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return f"gpu{i}"
    def nvmlDeviceGetMaxClockInfo(self, h, clock): return 1980
    def nvmlDeviceGetName(self, h): return b"NVIDIA H200" if h == "gpu1" else "NVIDIA H100"
    def nvmlDeviceGetUUID(self, h):
        if h == "gpu0":
            raise RuntimeError("not supported")
        return "GPU-1234"


def test_the_nvml_source_reports_each_gpu_name_and_uuid():
    source = NvmlSource(TelemetryHub(), nvml=_NamedNvml())
    assert gpu_identity(source, 1) == GpuIdentity(1, "NVIDIA H200", "GPU-1234")
    assert gpu_identity(source, 0) == GpuIdentity(0, "NVIDIA H100", "")
    assert gpu_identity(source, 5) is None


def test_a_snapshot_still_builds_from_positional_fields_alone():
    snap = TwinSnapshot(0, 1.0, 2.0, 60, 61, 60, 30, 0.5, 10, 70, 71, 500, None, 3.0)
    assert math.isnan(snap.die_band_c) and not snap.adapted
