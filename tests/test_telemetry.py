"""Telemetry: sources, derived series, store, hub, Prometheus and CLI, on real sources (the
simulated GPU, the recorded H100 traces, real SQLite); a fake NVML only where a call must fail."""

from __future__ import annotations

import csv
import logging
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import ondo.cli
from ondo.engine.step_stats import StepStats
from ondo.telemetry.derive import efficiency_windows, energy_used_j, throttle_time_fractions
from ondo.telemetry.engine_source import EngineSource
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.nvml_source import NvmlSource, NvmlUnavailable, open_nvml
from ondo.telemetry.pipeline import open_gpu_source
from ondo.telemetry.prometheus import PrometheusExporter
from ondo.telemetry.replay import ReplaySource
from ondo.telemetry.schema import (
    EngineSample,
    GpuSample,
    LoadDescriptor,
    ThrottleReason,
    throttle_reason_names,
)
from ondo.telemetry.sim_source import SimulatedGpuSource
from ondo.telemetry.store import AGGREGATED_COLUMNS, TelemetryStore, compact, connect

TRACES = Path(__file__).resolve().parent.parent / "data" / "traces"
FULL_LOAD = LoadDescriptor(1.0, 0.3)


def gpu_rows(db: Path, columns: str = "t_monotonic_s") -> np.ndarray:
    conn = sqlite3.connect(db)
    rows = conn.execute(f"SELECT {columns} FROM gpu_samples ORDER BY rowid").fetchall()
    conn.close()
    return np.array(rows, dtype=float)


def step(i: int, start_s: float, end_s: float, out_tokens: int = 8, flops: float = 0.0,
         bytes_moved: float = 0.0) -> StepStats:
    return StepStats(i, start_s, end_s, 0, out_tokens, out_tokens, 10, 100, 0, 0, 0, out_tokens,
                     0, out_tokens, flops, bytes_moved)


@pytest.mark.slow
def test_sim_source_100hz_for_60s_stores_99pct_with_monotonic_timestamps(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db)
    store.attach(hub)
    sim = SimulatedGpuSource(hub, hz=100, load_fn=lambda: FULL_LOAD)
    sim.start()
    time.sleep(60.0)
    sim.stop()
    store.close()
    t = gpu_rows(db)[:, 0]
    assert len(t) >= 0.99 * 60 * 100
    assert np.all(np.diff(t) > 0)
    assert store.dropped == 0 and store.stored == sim.produced


def test_one_second_aggregates_equal_numpy_over_raw_rows(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db, raw_retention_s=None)
    store.attach(hub)
    sim = SimulatedGpuSource(hub, hz=100, load_fn=lambda: FULL_LOAD)
    sim.start()
    time.sleep(3.2)
    sim.stop()
    store.close()
    cols = ["t_monotonic_s", *AGGREGATED_COLUMNS]
    conn = connect(db)
    raw = np.array(conn.execute(f"SELECT {', '.join(cols)} FROM gpu_samples").fetchall(), dtype=float)
    reasons = np.array([r[0] for r in conn.execute("SELECT throttle_reasons FROM gpu_samples")])
    folded = compact(conn, int(raw[:, 0].max()) + 1)
    assert folded == len(raw)
    assert conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0] == 0
    agg = {r[0]: r for r in conn.execute(
        "SELECT t_s, n, throttle_reasons_any, "
        + ", ".join(f"{c}_mean, {c}_min, {c}_max" for c in AGGREGATED_COLUMNS)
        + " FROM gpu_samples_1s")}
    conn.close()
    buckets = np.floor(raw[:, 0]).astype(int)
    assert sorted(agg) == sorted(set(buckets))
    for b, row in agg.items():
        sel = raw[buckets == b]
        assert row[1] == len(sel)
        assert row[2] == np.bitwise_or.reduce(reasons[buckets == b])
        for j, _ in enumerate(AGGREGATED_COLUMNS):
            x = sel[:, j + 1]
            mean, lo, hi = (np.nan if v is None else v for v in row[3 + 3 * j: 6 + 3 * j])
            if np.all(np.isnan(x)):
                assert np.isnan(mean) and np.isnan(lo) and np.isnan(hi)
                continue
            assert mean == pytest.approx(np.nanmean(x), rel=1e-12)
            assert (lo, hi) == (np.nanmin(x), np.nanmax(x))


def test_replay_h100_step_gives_the_traces_energy_and_sw_power_cap_fraction(tmp_path: Path) -> None:
    trace = TRACES / "h100_step.csv"
    data = np.genfromtxt(trace, delimiter=",", names=True, dtype=None, encoding="utf-8")
    t = data["t"].astype(float)
    expected_energy_j = (data["energy_mj"][-1] - data["energy_mj"][0]) / 1000.0
    capped = (data["event_reasons"].astype(int) & 0x4) != 0
    expected_cap_fraction = np.sum(np.diff(t)[capped[:-1]]) / (t[-1] - t[0])
    assert expected_cap_fraction > 0.3  # the 100 s load phase sits on the power cap

    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db)
    store.attach(hub)
    replay = ReplaySource(hub, trace, speed=float("inf"))
    assert replay.run() == len(t)
    store.close()
    stored = gpu_rows(db, "t_monotonic_s, energy_j, throttle_reasons")
    assert store.stored == len(t)
    assert energy_used_j(stored[:, 1]) == pytest.approx(expected_energy_j, rel=1e-9)
    fractions = throttle_time_fractions(stored[:, 0], stored[:, 2].astype(int))
    assert fractions["sw_power_cap"] == pytest.approx(expected_cap_fraction, rel=1e-6)


def test_replay_speed_paces_playback() -> None:
    hub = TelemetryHub()
    replay = ReplaySource(hub, TRACES / "h100_step.csv", speed=1000.0)
    span_s = replay.rows[-1][0] - replay.rows[0][0]
    t0 = time.monotonic()
    replay.run()
    assert time.monotonic() - t0 >= span_s / 1000.0 * 0.95


def test_storage_locked_mid_run_loses_only_counted_samples(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db, max_queue=40, busy_timeout_s=0.01)
    store.attach(hub)
    sim = SimulatedGpuSource(hub, hz=100, load_fn=lambda: FULL_LOAD)
    sim.start()
    time.sleep(0.5)
    locker = sqlite3.connect(db, timeout=5.0)
    locker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    time.sleep(1.5)
    produced_while_locked = sim.produced
    locker.rollback()
    locker.close()
    time.sleep(0.5)
    sim.stop()
    store.close()
    assert store.write_errors > 0
    assert store.dropped > 0
    assert store.stored + store.dropped == sim.produced
    assert len(gpu_rows(db)) == store.stored
    assert sim.produced > produced_while_locked  # the producer never stalled


def test_nvml_missing_falls_back_to_simulated_source_with_a_log_line(caplog) -> None:
    hub = TelemetryHub()
    with pytest.raises(NvmlUnavailable):
        open_nvml()  # the real pynvml: no GPU or no driver on CI
    with caplog.at_level(logging.WARNING):
        source = open_gpu_source("nvml", hub, 20.0)
    assert isinstance(source, SimulatedGpuSource)
    assert "NVML unavailable" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert open_gpu_source("nvml", hub, 20.0, fallback=None) is None
    assert "engine-only" in caplog.text


class _FailingPowerNvml:
    """The smallest NVML stand-in: one GPU whose power read fails once, energy refreshing
    every other poll."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_ERROR_NOT_SUPPORTED = 0, 1, 2, 3

    class NVMLError(Exception):
        value = 999

    def __init__(self) -> None:
        self.polls = 0

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, i: int) -> str: return "gpu0"
    def nvmlDeviceGetMaxClockInfo(self, h: str, clock: int) -> int: return 1980
    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        self.polls += 1
        return 40
    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        if self.polls == 2:
            raise self.NVMLError("GPU is lost")
        return 350_000
    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int: return 1_000_000 + 100 * (self.polls // 2)
    def nvmlDeviceGetClockInfo(self, h: str, clock: int) -> int: return 1400 if clock == 1 else 2619
    def nvmlDeviceGetCurrentClocksEventReasons(self, h: str) -> int: return 0x4
    def nvmlDeviceGetUtilizationRates(self, h: str) -> SimpleNamespace: return SimpleNamespace(gpu=100, memory=40)
    def nvmlDeviceGetMemoryInfo(self, h: str) -> SimpleNamespace: return SimpleNamespace(used=2**30)
    def nvmlDeviceGetFieldValues(self, h: str, ids: list[int]) -> list[SimpleNamespace]:
        return [SimpleNamespace(nvmlReturn=0 if f == 82 else 3, valueType=1, value=SimpleNamespace(uiVal=55))
                for f in ids]


def test_failing_nvml_call_is_counted_and_marked_and_polling_goes_on() -> None:
    hub = TelemetryHub()
    registry = CollectorRegistry()
    PrometheusExporter(registry, hub)
    source = NvmlSource(hub, hz=100, nvml=_FailingPowerNvml())
    s1, = source.poll_once()
    s2, = source.poll_once()
    s3, = source.poll_once()
    assert s1.power_w == 350.0 and s1.energy_j == 1000.0 and s1.temp_c == 40.0
    assert s1.mem_temp_c == 55.0 and s1.power_instant_w is None  # field 186 not supported
    assert s1.throttle_names == ("sw_power_cap",) and s1.sm_clock_ratio == pytest.approx(1400 / 1980)
    assert s2.power_w is None and s2.failed == frozenset({"power_w"})
    assert s2.temp_c == 40.0 and s2.energy_j == 1000.1  # the rest of the sample was read
    assert "energy_j" in s3.stale and s3.energy_j == s2.energy_j  # counter not refreshed
    assert s3.failed == frozenset()
    assert source.failed_reads == 1 and source.produced == 3
    assert registry.get_sample_value("ondo:nvml_read_failures_total", {"gpu": "0"}) == 1.0
    source.start()  # the thread keeps polling
    time.sleep(0.2)
    source.stop()
    assert source.produced > 3


def test_engine_step_becomes_sample_with_load_descriptor() -> None:
    hub = TelemetryHub()
    sub = hub.subscribe(maxsize=8)
    engine = EngineSource(hub)
    stats = step(3, 10.0, 10.02, flops=0.5 * 989e12 * 0.02, bytes_moved=0.25 * 3.35e12 * 0.02)
    sample = engine.on_step(stats)
    assert sub.queue.get(timeout=1.0) is sample
    assert sample.compute_activity == pytest.approx(0.5)
    assert sample.memory_activity == pytest.approx(0.25)
    assert sample.num_output_tokens == 8 and sample.duration_s == pytest.approx(0.02)
    saturated = engine.on_step(step(4, 0.0, 0.001, flops=1e20))
    assert saturated.compute_activity == 1.0


def test_simulated_gpu_follows_engine_load() -> None:
    hub = TelemetryHub()
    sim = SimulatedGpuSource(hub, hz=100)
    idle = sim.poll_once()
    engine = EngineSource(hub)
    assert idle.throttle_reasons == ThrottleReason.GPU_IDLE and idle.power_instant_w < 150.0
    # Full compute load for 2.5 s of real time: the twin's plant draws more than the
    # limit at once, then its power-limit controller pulls the clock down to hold 700 W.
    deadline = time.monotonic() + 2.5
    first = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        engine.on_step(step(0, now - 0.01, now, flops=989e12 * 0.01))
        loaded = sim.poll_once()
        first = first or loaded
        time.sleep(0.01)
    assert first.power_instant_w > idle.power_instant_w + 300.0
    assert abs(loaded.power_w - 700.0) < 35.0
    assert "sw_power_cap" in loaded.throttle_names and loaded.sm_mhz < 1600.0


def test_energy_per_output_token_uses_fresh_counter_readings_only() -> None:
    def g(t: float, e: float, stale: bool = False) -> GpuSample:
        return GpuSample(0, "sim", t, t, 0.1, 0.0, energy_j=e,
                         stale=frozenset({"energy_j"}) if stale else frozenset())

    def es(end: float, n: int) -> EngineSample:
        return EngineSource(TelemetryHub()).on_step(step(0, end - 0.01, end, out_tokens=n))

    windows = efficiency_windows(
        [g(0.0, 100.0), g(0.6, 160.0), g(1.05, 160.0, stale=True), g(1.1, 210.0), g(2.2, 320.0)],
        [es(0.3, 10), es(1.0, 15), es(1.1, 25), es(1.5, 40)],
    )
    assert [(w.t_start_s, w.t_end_s) for w in windows] == [(0.0, 1.1), (1.1, 2.2)]
    assert windows[0].energy_j == 110.0 and windows[0].output_tokens == 50
    assert windows[0].energy_per_output_token_j == pytest.approx(2.2)
    assert windows[1].tokens_per_j == pytest.approx(40 / 110.0)


def test_prometheus_exposes_gauges_per_gpu() -> None:
    hub = TelemetryHub()
    registry = CollectorRegistry()
    PrometheusExporter(registry, hub)
    replay = ReplaySource(hub, TRACES / "h100_step.csv", speed=0)
    replay.run()
    last_t, last = replay.rows[-1]
    text = generate_latest(registry).decode()
    for name in ("ondo:gpu_temperature_celsius", "ondo:gpu_memory_temperature_celsius",
                 "ondo:gpu_power_watts", "ondo:gpu_energy_joules_total", "ondo:gpu_sm_clock_mhz",
                 "ondo:gpu_throttle_active", "ondo:telemetry_samples_dropped_total",
                 "ondo:nvml_read_failures"):
        assert name in text
    get = registry.get_sample_value
    assert get("ondo:gpu_temperature_celsius", {"gpu": "0"}) == last["temp_c"]
    assert get("ondo:gpu_energy_joules_total", {"gpu": "0"}) == last["energy_j"]
    idle = bool(last["throttle_reasons"] & 1)
    assert get("ondo:gpu_throttle_active", {"gpu": "0", "reason": "gpu_idle"}) == float(idle)


def test_energy_per_token_gauge_from_sim_and_engine() -> None:
    hub = TelemetryHub()
    registry = CollectorRegistry()
    PrometheusExporter(registry, hub, efficiency_window_s=0.05)
    sim = SimulatedGpuSource(hub, hz=100, load_fn=lambda: FULL_LOAD)
    engine = EngineSource(hub)
    sim.poll_once()
    for i in range(12):
        time.sleep(0.01)
        now = time.monotonic()
        engine.on_step(step(i, now - 0.01, now, out_tokens=4))
        sim.poll_once()
    value = registry.get_sample_value("ondo:energy_per_output_token_joules", {"gpu": "0"})
    assert value is not None and 0.5 < value < 10.0  # ~700 W × 10 ms / 4 tokens ≈ 1.75 J


def test_hub_subscriber_queue_is_bounded_and_counts_drops() -> None:
    hub = TelemetryHub()
    slow = hub.subscribe(maxsize=3)
    seen: list[int] = []
    hub.subscribe(lambda s: seen.append(s), kinds=(int,))
    hub.subscribe(lambda s: 1 / 0)  # a broken subscriber does not stop the others
    for i in range(10):
        hub.publish(i)
    assert [slow.queue.get(0) for _ in range(3)] == [7, 8, 9]
    assert hub.dropped == 7 and seen == list(range(10)) and hub.callback_errors == 10


def test_throttle_reason_names_decode_bits() -> None:
    assert throttle_reason_names(0x1 | 0x4 | 0x40) == ("gpu_idle", "sw_power_cap", "hw_thermal_slowdown")
    assert throttle_reason_names(0) == ()


def _cli(argv: list[str], monkeypatch) -> int:
    # Only this package's commands: ondo/cli.py imports siblings that may not exist yet.
    monkeypatch.setattr(ondo.cli, "COMMAND_MODULES", ("ondo.telemetry.cli",))
    return ondo.cli.main(argv)


def test_cli_record_sim_and_export_csv(tmp_path: Path, monkeypatch, capsys) -> None:
    db, out = tmp_path / "t.db", tmp_path / "t.csv"
    assert _cli(["telemetry", "record", "--source", "sim", "--hz", "50", "--seconds", "0.5",
                 "--db", str(db)], monkeypatch) == 0
    assert '"stored":' in capsys.readouterr().out
    assert _cli(["telemetry", "export", "--db", str(db), "--format", "csv", "-o", str(out)],
                monkeypatch) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 20
    for col in ("t", "temp_c", "mem_temp_c", "power_w", "energy_j", "sm_mhz", "mem_mhz",
                "throttle_reasons", "util_pct"):
        assert col in rows[0]
    assert float(rows[0]["t"]) == 0.0 and rows[0]["source"] == "sim"


def test_cli_record_replay_and_parquet_needs_pyarrow(tmp_path: Path, monkeypatch, capsys) -> None:
    db = tmp_path / "t.db"
    assert _cli(["telemetry", "record", "--source", "replay", "--trace",
                 str(TRACES / "h100_prbs.csv"), "--speed", "inf", "--db", str(db)], monkeypatch) == 0
    assert len(gpu_rows(db)) == 9994
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        rc = _cli(["telemetry", "export", "--db", str(db), "--format", "parquet", "-o",
                   str(tmp_path / "t.parquet")], monkeypatch)
        assert rc == 2 and "error: parquet export needs the 'pyarrow' package" in capsys.readouterr().err


def test_store_submit_never_blocks_while_the_database_is_locked(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(db, max_queue=100, busy_timeout_s=1.0)
    locker = sqlite3.connect(db, timeout=5.0)
    locker.execute("BEGIN EXCLUSIVE")
    sample = GpuSample(0, "sim", 1.0, 1.0, 0.01, 0.0, temp_c=30.0)
    t0 = time.monotonic()
    for _ in range(1000):
        store.submit(sample)
    assert time.monotonic() - t0 < 0.5
    assert store.dropped >= 1000 - 2 * 100  # queue plus the batch the writer holds
    locker.rollback()
    locker.close()
    store.close()
    assert store.stored + store.dropped == 1000


def test_store_with_engine_steps_only_keeps_writing(tmp_path: Path) -> None:
    """No GPU source (the CPU, or telemetry engine-only): every step is still stored."""
    db = tmp_path / "engine.db"
    store = TelemetryStore(db)  # raw retention on, but no GPU sample to compact by
    source = EngineSource(TelemetryHub())
    for i in range(3):
        store.submit(source.on_step(step(i, 10.0 + i, 10.5 + i)))
        assert store.flush(timeout_s=2.0)
    store.close()
    assert (store.stored, store.dropped) == (3, 0)
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT step_index FROM engine_steps")] == [0, 1, 2]


def test_pipeline_wires_source_store_exporter_and_engine_hook(tmp_path: Path) -> None:
    from ondo.telemetry import Telemetry

    registry = CollectorRegistry()
    tel = Telemetry.start(tmp_path / "t.db", source="sim", hz=50, registry=registry)
    sub = tel.hub.subscribe(maxsize=1000, kinds=(EngineSample,))
    now = time.monotonic()
    tel.engine.on_step(step(0, now - 0.02, now, flops=989e12 * 0.02))
    time.sleep(0.3)
    tel.close()
    assert sub.queue.get(0).compute_activity == pytest.approx(1.0)
    assert tel.store.stored == tel.gpu.produced + 1 and tel.store.dropped == 0
    assert registry.get_sample_value("ondo:gpu_power_watts", {"gpu": "0"}) > 70.0


def test_store_writes_records_of_a_registered_table_in_the_same_file(tmp_path):
    from dataclasses import dataclass

    from ondo.telemetry.store import RecordTable

    @dataclass
    class Note:
        t_s: float
        text: str

    table = RecordTable(Note, "CREATE TABLE IF NOT EXISTS notes (t_s REAL, text TEXT);",
                        "INSERT INTO notes VALUES (?, ?)", lambda n: (n.t_s, n.text))
    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db, tables=[table])
    store.attach(hub)
    hub.publish(Note(1.5, "first"))
    hub.publish(EngineSource(TelemetryHub()).on_step(step(0, 10.0, 10.5)))
    hub.publish(Note(2.5, "second"))
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT t_s, text FROM notes ORDER BY t_s").fetchall() == [(1.5, "first"), (2.5, "second")]
    assert conn.execute("SELECT COUNT(*) FROM engine_steps").fetchone() == (1,)
    assert store.stored == 3 and store.dropped == 0


@pytest.mark.parametrize("lossless", [False, True])
def test_a_record_no_row_can_be_made_of_is_let_go_and_counted_and_holds_nothing_back(
        tmp_path, caplog, lossless):
    import json
    from dataclasses import dataclass

    from ondo.telemetry.store import RecordTable

    @dataclass
    class Note:
        t_s: float
        payload: object

    table = RecordTable(Note, "CREATE TABLE IF NOT EXISTS notes (t_s REAL, payload TEXT);",
                        "INSERT INTO notes VALUES (?, ?)",
                        lambda n: (n.t_s, json.dumps(n.payload)), lossless=lossless)
    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db, tables=[table])
    store.attach(hub)
    with caplog.at_level(logging.ERROR, logger="ondo.telemetry.store"):
        hub.publish(Note(1.0, {"ok": 1}))
        hub.publish(Note(2.0, {"not json": object()}))
        hub.publish(EngineSource(TelemetryHub()).on_step(step(0, 10.0, 10.5)))
        hub.publish(Note(3.0, [2]))
        assert store.flush(5.0)  # the bad record does not block what follows it
        store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT t_s FROM notes ORDER BY t_s").fetchall() == [(1.0,), (3.0,)]
    assert conn.execute("SELECT COUNT(*) FROM engine_steps").fetchone() == (1,)
    assert (store.stored, store.rejected, store.dropped, store.submitted) == (3, 1, 1, 4)
    assert sum("cannot write" in r.getMessage() and "Note" in r.getMessage()
               for r in caplog.records) == 1
