"""The simulated GPU: NVML-shaped samples from a plant model driven by the engine's load."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.polling import PollingThread, period_from_hz
from ondo.telemetry.schema import IDLE_LOAD, EngineSample, GpuSample, LoadDescriptor, stale_columns
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant, Load, PlantReading


class Plant(Protocol):
    """What the simulated source needs of a plant: `ondo.twin.plant.GpuPlant` has this shape."""

    def step(self, dt_s: float, load: Load, ambient_c: float | None = None) -> PlantReading: ...


def default_plant() -> Plant:
    """The digital twin's plant, with the parameters fitted to the H100 traces."""
    return GpuPlant(h100_params())


DEFAULT_PLANT: Callable[[], Plant] = default_plant


class EngineLoadFollower:
    """The load of the engine's latest step, or idle once no step has ended for `idle_after_s`."""

    def __init__(self, hub: TelemetryHub, idle_after_s: float = 0.5) -> None:
        self.idle_after_s = idle_after_s
        self._latest: EngineSample | None = None
        self._sub = hub.subscribe(self._on_engine_sample, kinds=(EngineSample,))

    def _on_engine_sample(self, sample: EngineSample) -> None:
        self._latest = sample

    def __call__(self) -> LoadDescriptor:
        latest = self._latest
        if latest is None or time.monotonic() - latest.end_monotonic_s > self.idle_after_s:
            return IDLE_LOAD
        return latest.load

    def close(self) -> None:
        self._sub.close()


class SimulatedGpuSource:
    """Polls a plant at `hz` and publishes `GpuSample(source="sim")` to the hub."""

    source_name = "sim"

    def __init__(
        self,
        hub: TelemetryHub,
        hz: float = 20.0,
        plant: Plant | None = None,
        load_fn: Callable[[], LoadDescriptor] | None = None,
        ambient_c: float = 25.0,
        gpu_index: int = 0,
        sm_max_mhz: float = 1980.0,
    ) -> None:
        self.hub = hub
        self.period_s = period_from_hz(hz)
        self.plant = plant if plant is not None else DEFAULT_PLANT()
        self._follower = EngineLoadFollower(hub) if load_fn is None else None
        self.load_fn = load_fn if load_fn is not None else self._follower
        self.ambient_c = ambient_c
        self.gpu_index = gpu_index
        self.sm_max_mhz = sm_max_mhz
        self.produced = 0
        self._last_t: float | None = None
        self._previous: GpuSample | None = None
        self._thread = PollingThread(self.poll_once, self.period_s, name="ondo-telemetry-sim")

    def poll_once(self) -> GpuSample:
        t0 = time.monotonic()
        dt_s = self.period_s if self._last_t is None else t0 - self._last_t
        self._last_t = t0
        reading = self.plant.step(dt_s, self.load_fn(), self.ambient_c)
        t1 = time.monotonic()
        sample = GpuSample(
            gpu_index=self.gpu_index,
            source=self.source_name,
            t_monotonic_s=t0,
            t_wall_s=time.time(),
            period_s=self.period_s,
            read_latency_s=t1 - t0,
            temp_c=reading.temp_c,
            mem_temp_c=reading.mem_temp_c,
            power_w=reading.power_w,
            power_instant_w=reading.power_instant_w,
            energy_j=reading.energy_j,
            sm_mhz=reading.sm_mhz,
            sm_max_mhz=self.sm_max_mhz,
            mem_mhz=reading.mem_mhz,
            throttle_reasons=reading.throttle_reasons,
            util_pct=reading.util_pct,
        )
        sample = replace(sample, stale=stale_columns(self._previous, sample))
        self._previous = sample
        self.produced += 1
        self.hub.publish(sample)
        return sample

    def identity(self, index: int) -> tuple[str, str] | None:
        """(name, UUID) as NVML would give them: the simulated GPU is its own model."""
        return ("ondo simulated GPU", f"SIM-{index}") if index == self.gpu_index else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()
        if self._follower is not None:
            self._follower.close()

