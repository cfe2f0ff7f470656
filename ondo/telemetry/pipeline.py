"""Wiring: a GPU source (NVML, else simulated) and the engine source publish to one hub; the
store, the Prometheus exporter and live subscribers read from it."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ondo.telemetry.engine_source import EngineSource
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.nvml_source import NvmlSource, NvmlUnavailable
from ondo.telemetry.prometheus import PrometheusExporter
from ondo.telemetry.replay import ReplaySource
from ondo.telemetry.sim_fleet import SimulatedGpuFleet
from ondo.telemetry.sim_source import SimulatedGpuSource
from ondo.telemetry.store import RecordTable, TelemetryStore

log = logging.getLogger(__name__)


class GpuSource(Protocol):
    source_name: str
    produced: int

    def start(self) -> None: ...
    def stop(self) -> None: ...


def open_gpu_source(
    kind: str,
    hub: TelemetryHub,
    hz: float = 20.0,
    *,
    fallback: str | None = "sim",
    trace: str | Path | None = None,
    speed: float = 1.0,
    nvml: Any | None = None,
    sim_inlet_c: Sequence[float] | None = None,
    **sim_kwargs: Any,
) -> GpuSource | None:
    """The source named by `kind` ("nvml", "sim", "replay", or "none": engine-only, returns
    None). Without NVML or a GPU, "nvml" logs why and falls back to `fallback` ("sim", or
    None: engine-only, returns None). "nvml" reads the GPUs `CUDA_VISIBLE_DEVICES` names
    (all where unset); `sim_inlet_c`: one simulated GPU per inlet temperature (sim_fleet.py)."""
    if kind == "none":
        return None
    if sim_inlet_c is not None and len(sim_inlet_c) > 1:
        def make_sim() -> GpuSource:
            return SimulatedGpuFleet(hub, hz, sim_inlet_c)
    else:
        if sim_inlet_c:
            sim_kwargs = {"ambient_c": float(sim_inlet_c[0])} | sim_kwargs

        def make_sim() -> GpuSource:
            return SimulatedGpuSource(hub, hz, **sim_kwargs)
    if kind == "nvml":
        try:
            return NvmlSource(hub, hz, nvml=nvml, env=os.environ)
        except NvmlUnavailable as e:
            if fallback == "sim":
                log.warning("NVML unavailable (%s); using the simulated GPU source", e)
                return make_sim()
            log.warning("NVML unavailable (%s); engine-only telemetry, no GPU source", e)
            return None
    if kind == "sim":
        return make_sim()
    if kind == "replay":
        if trace is None:
            raise ValueError("replay needs a trace CSV")
        return ReplaySource(hub, trace, speed=speed)
    raise ValueError(f"unknown telemetry source {kind!r}: nvml, sim or replay")


class Telemetry:
    """The running pipeline of one server process.

    tel = Telemetry.start(db_path, registry=registry)
    engine.add_step_hook(tel.engine.on_step)
    sub = tel.hub.subscribe(maxsize=256)   # twin, governor, console
    ...
    tel.close()
    """

    def __init__(self, hub: TelemetryHub, gpu: GpuSource | None, engine: EngineSource,
                 store: TelemetryStore | None, exporter: PrometheusExporter | None) -> None:
        self.hub = hub
        self.gpu = gpu
        self.engine = engine
        self.store = store
        self.exporter = exporter

    @classmethod
    def start(
        cls,
        db_path: str | Path | None,
        source: str = "nvml",
        hz: float = 20.0,
        registry: CollectorRegistry | None = None,
        tables: tuple[RecordTable, ...] = (),
        **source_kwargs: Any,
    ) -> Telemetry:
        """`tables`: further record types (governor decisions, events) the store keeps."""
        hub = TelemetryHub()
        store = None
        if db_path is not None:
            store = TelemetryStore(db_path, tables=tables)
            store.attach(hub)
        exporter = PrometheusExporter(registry, hub, store) if registry is not None else None
        engine = EngineSource(hub)
        gpu = open_gpu_source(source, hub, hz, **source_kwargs)
        if gpu is not None:
            gpu.start()
        return cls(hub, gpu, engine, store, exporter)

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.stop()
        if self.exporter is not None:
            self.exporter.close()
        if self.store is not None:
            self.store.close()
