"""Telemetry, twin and governor over several GPUs: the GPUs `CUDA_VISIBLE_DEVICES` names are
the ones NVML polls, simulated GPUs with their own inlets, the binding GPU chosen by slack,
and `ondo serve --sim-gpus 2` showing one series per GPU and governing by the hot one."""

from __future__ import annotations

import math
import re
import signal
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

from ondo.control.binding import NO_READINGS, binding_gpu, constraint_slacks
from ondo.control.inputs import GovernorInputs
from ondo.control.objectives import Objectives
from ondo.telemetry.gpu_selection import source_gpu_indices, visible_gpu_indices
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.nvml_source import NvmlSource, NvmlUnavailable
from ondo.telemetry.schema import GpuSample
from ondo.telemetry.sim_fleet import SimulatedGpuFleet, parse_inlets, sim_inlets
from ondo.twin.live import IDLE_ENGINE
from ondo.twin.params import h100_params
from tests.server_harness import wait_for
from tests.server_process import launch_server

UUIDS = ["GPU-aaaa-0", "GPU-bbbb-1", "GPU-cccc-2", "GPU-dddd-3"]


def test_the_gpus_cuda_visible_devices_names_are_resolved_in_its_order():
    assert visible_gpu_indices({}, UUIDS) is None  # unset: every GPU
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "3,1"}, UUIDS) == [3, 1]
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-cccc,0"}, UUIDS) == [2, 0]
    # CUDA stops at the first entry it cannot resolve, and so does the telemetry.
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "1,7,0"}, UUIDS) == [1]
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "0,GPU-,2"}, UUIDS) == [0]  # ambiguous
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": ""}, UUIDS) == []  # no GPU at all
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES='7' names no GPU of the 4"):
        visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "7"}, UUIDS)


class _NotSupported(Exception):
    value = 3


class _FourGpuNvml(SimpleNamespace):
    """Four GPUs whose die reads 40 + 10 * index °C and power 100 + index W; the rest is not
    supported."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_ERROR_NOT_SUPPORTED = 0, 1, 2, 3

    def nvmlInit(self): ...
    def nvmlShutdown(self): ...
    def nvmlDeviceGetCount(self): return 4
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetUUID(self, h): return UUIDS[h]
    def nvmlDeviceGetName(self, h): return "NVIDIA H200"
    def nvmlDeviceGetTemperature(self, h, sensor): return 40 + 10 * h
    def nvmlDeviceGetPowerUsage(self, h): return (100 + h) * 1000  # mW

    def __getattr__(self, name):
        def unsupported(*args):
            raise _NotSupported(name)
        return unsupported


def test_the_nvml_source_polls_the_engines_gpus_in_cuda_order():
    hub = TelemetryHub()
    got: list[GpuSample] = []
    hub.subscribe(got.append, kinds=(GpuSample,))
    source = NvmlSource(hub, nvml=_FourGpuNvml(), env={"CUDA_VISIBLE_DEVICES": "GPU-dddd,1"})
    assert source.gpu_indices == [3, 1] == source_gpu_indices(source)
    source.poll_once()
    assert [(s.gpu_index, s.temp_c, s.power_w) for s in got] == [(3, 70.0, 103.0),
                                                                 (1, 50.0, 101.0)]
    assert NvmlSource(TelemetryHub(), nvml=_FourGpuNvml(), env={}).gpu_indices == [0, 1, 2, 3]
    with pytest.raises(NvmlUnavailable, match="CUDA_VISIBLE_DEVICES='9'"):
        NvmlSource(TelemetryHub(), nvml=_FourGpuNvml(), env={"CUDA_VISIBLE_DEVICES": "9"})
    with pytest.raises(NvmlUnavailable, match="CUDA_VISIBLE_DEVICES names none"):
        NvmlSource(TelemetryHub(), nvml=_FourGpuNvml(), env={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(NvmlUnavailable, match="GPU index 4 asked for, NVML sees 4"):
        NvmlSource(TelemetryHub(), nvml=_FourGpuNvml(), gpu_indices=[0, 4])


def test_simulated_gpus_each_follow_their_own_inlet():
    hub = TelemetryHub()
    fleet = SimulatedGpuFleet(hub, hz=50.0, inlet_c=[25.0, 45.0, 35.0])
    try:
        samples = [fleet.poll_once() for _ in range(3)][-1]
    finally:
        fleet.stop()
    assert fleet.gpu_indices == [0, 1, 2] == source_gpu_indices(fleet)
    temps = [s.temp_c for s in samples]
    assert [s.gpu_index for s in samples] == [0, 1, 2]
    assert temps[0] < temps[2] < temps[1]  # ordered as the inlets are
    assert temps[1] - temps[0] == pytest.approx(20.0, abs=2.0)  # idle: die tracks the inlet
    assert fleet.identity(2) == ("ondo simulated GPU", "SIM-2") and fleet.identity(3) is None
    assert fleet.produced == 9


def test_the_simulated_gpus_flags_are_checked_naming_the_flag():
    assert sim_inlets(3, None) == [25.0, 25.0, 25.0]
    assert sim_inlets(2, [30.0]) == [30.0, 30.0]
    assert sim_inlets(2, parse_inlets("25, 38")) == [25.0, 38.0]
    with pytest.raises(ValueError, match="--sim-inlet-c: 3 temperatures for --sim-gpus 2"):
        sim_inlets(2, [20.0, 30.0, 40.0])
    with pytest.raises(ValueError, match="--sim-inlet-c 95: an inlet temperature"):
        sim_inlets(2, [25.0, 95.0])
    with pytest.raises(ValueError, match="--sim-gpus 0"):
        sim_inlets(0, None)
    with pytest.raises(ValueError, match="--sim-inlet-c 'hot'"):
        parse_inlets("hot")


def _inputs(gpu: int, die_c: float | None = None, hbm_c: float | None = None,
            power_w: float | None = None) -> GovernorInputs:
    return GovernorInputs(
        t_monotonic_s=1.0, t_wall_s=1.0, die_sensor_c=die_c, hbm_sensor_c=hbm_c,
        power_w=power_w, power_instant_w=power_w, sm_mhz=1980.0, throttle_reasons=0,
        energy_history=(), engine=IDLE_ENGINE, twin=None, tpot_p99_s=None, gpu_index=gpu)


def test_the_binding_gpu_is_the_one_with_the_least_slack_to_any_limit():
    params = h100_params()
    objectives = Objectives(power_budget_w=450.0, temp_target_c=82.0, hbm_temp_target_c=90.0)
    cool_but_near_budget = _inputs(0, die_c=70.0, hbm_c=75.0, power_w=440.0)  # 2.2 % left
    hot = _inputs(1, die_c=80.0, hbm_c=80.0, power_w=300.0)  # die: 2.4 % left
    b = binding_gpu({0: cool_but_near_budget, 1: hot}, objectives, params)
    assert (b.gpu_index, b.constraint) == (0, "power budget")
    assert b.slack == pytest.approx(10.0 / 450.0)
    over = _inputs(2, die_c=86.0, hbm_c=80.0, power_w=300.0)  # over its target: binds
    b = binding_gpu({0: cool_but_near_budget, 1: hot, 2: over}, objectives, params)
    assert (b.gpu_index, b.constraint) == (2, "die temperature") and b.slack < 0
    # No objectives: the hottest against the GPU's own slowdown temperature.
    b = binding_gpu({0: _inputs(0, 60.0, 62.0, 300.0), 1: _inputs(1, 71.0, 70.0, 300.0)},
                    Objectives(), params)
    assert (b.gpu_index, b.constraint) == (1, "die temperature")
    assert b.slack == pytest.approx((params.sw_thermal_c - 71.0) / params.sw_thermal_c)
    # A GPU without readings yet is no constraint; with none at all, the first index.
    assert binding_gpu({3: _inputs(3), 5: _inputs(5, 50.0)}, Objectives(), params).gpu_index == 5
    b = binding_gpu({3: _inputs(3), 5: _inputs(5)}, Objectives(), params)
    assert (b.gpu_index, b.constraint, b.slack) == (3, NO_READINGS, math.inf)
    assert [n for n, _ in constraint_slacks(_inputs(0, power_w=100.0), objectives, params)] \
        == ["power budget"]
    with pytest.raises(ValueError, match="at least one GPU"):
        binding_gpu({}, objectives, params)


def test_serve_refuses_simulated_gpu_flags_that_do_not_agree_naming_the_flag():
    proc = subprocess.run([sys.executable, "-m", "ondo", "serve", "--device", "cpu",
                           "--telemetry", "sim", "--sim-gpus", "2", "--sim-inlet-c", "25,30,35"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--sim-inlet-c: 3 temperatures for --sim-gpus 2" in proc.stderr
    assert "engine ready" not in proc.stderr


def _series(text: str, name: str) -> dict[str, float]:
    """{label text: value} of every series of `name` on /metrics."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M)}


def test_serve_with_two_simulated_gpus_shows_each_and_governs_by_the_hot_one(tmp_path):
    db = tmp_path / "telemetry.db"
    # GPU 1 idles at ~50 °C (45 °C inlet), over the 40 °C target; GPU 0 at ~29 °C.
    proc, base = launch_server("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks",
                               "64", "--telemetry", "sim", "--telemetry-hz", "50",
                               "--sim-gpus", "2", "--sim-inlet-c", "25,45",
                               "--telemetry-db", str(db), "--governor", "reactive",
                               "--temp-target-c", "40")

    def metrics() -> str:
        return httpx.get(base + "/metrics", timeout=5).text

    def bound_by_gpu1() -> bool:
        return _series(metrics(), "ondo:governor_binding_gpu").get(
            'constraint="die temperature",gpu="1"') == 1.0

    def twins_ready() -> bool:
        return len(_series(metrics(), "ondo:twin_time_to_throttle_seconds")) == 2

    try:
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "The GPU is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        assert wait_for(bound_by_gpu1, 30.0, 0.2)
        assert wait_for(twins_ready, 30.0, 0.2)
        text = metrics()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    temps = _series(text, "ondo:gpu_temperature_celsius")
    assert set(temps) == {'gpu="0"', 'gpu="1"'}
    assert temps['gpu="1"'] - temps['gpu="0"'] >= 15.0
    assert _series(text, "ondo:governor_binding_gpu")['constraint="",gpu="0"'] == 0.0
    peaks = _series(text, "ondo:twin_forecast_peak_celsius")
    assert set(peaks) == {'gpu="0",sensor="die"', 'gpu="0",sensor="hbm"',
                          'gpu="1",sensor="die"', 'gpu="1",sensor="hbm"'}
    assert peaks['gpu="1",sensor="die"'] > peaks['gpu="0",sensor="die"'] + 10.0
    assert len(re.findall(r"^# TYPE ondo:twin_forecast_peak_celsius ", text, re.M)) == 1
    # The reactive policy cut the load for GPU 1's temperature, and its record says so.
    rows = sqlite3.connect(db).execute(
        "SELECT gpu_index, inputs FROM governor_decisions WHERE inputs != '{}'").fetchall()
    assert rows, "no decision made on readings"
    assert all(g == 1 for g, _ in rows)
    assert '"binding_constraint":"die temperature","binding_gpu":1' in rows[0][1]
    gpus = {g for (g,) in sqlite3.connect(db).execute("SELECT DISTINCT gpu_index FROM gpu_samples")}
    assert gpus == {0, 1}


def test_only_the_engines_gpu_binds_the_governor_on_a_real_source():
    """NVML reads every visible GPU, but an engine runs on the first: a neighbour another job
    heats is monitored, never governed on. A simulated fleet stands for an engine on all."""
    from ondo.control.serve import engine_gpu_indices

    class NvmlLike:
        gpu_indices = [3, 1]

    assert engine_gpu_indices(NvmlLike(), [3, 1]) == [3]
    fleet = SimulatedGpuFleet(TelemetryHub(), hz=20.0, inlet_c=[25.0, 45.0])
    try:
        assert engine_gpu_indices(fleet, [0, 1]) == [0, 1]
    finally:
        fleet.stop()
