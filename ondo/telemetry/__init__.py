"""ondo.telemetry: measure (NVML, simulated GPU, engine steps, replayed traces) → transform
(units, one clock, derived series) → transfer (SQLite store, Prometheus, live subscribers).

    from ondo.telemetry import Telemetry
    tel = Telemetry.start("ondo.db", source="nvml", hz=20, registry=registry)
    engine.add_step_hook(tel.engine.on_step)      # Callable[[StepStats], None]
    sub = tel.hub.subscribe(maxsize=256)          # sub.queue.get(timeout=...)
    tel.close()
"""

from ondo.telemetry.engine_source import EngineSource
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.nvml_source import NvmlSource, NvmlUnavailable
from ondo.telemetry.pipeline import Telemetry, open_gpu_source
from ondo.telemetry.prometheus import PrometheusExporter
from ondo.telemetry.replay import ReplaySource
from ondo.telemetry.schema import EngineSample, GpuSample, LoadDescriptor, ThrottleReason
from ondo.telemetry.sim_source import SimulatedGpuSource
from ondo.telemetry.store import TelemetryStore

__all__ = [
    "EngineSample",
    "EngineSource",
    "GpuSample",
    "LoadDescriptor",
    "NvmlSource",
    "NvmlUnavailable",
    "PrometheusExporter",
    "ReplaySource",
    "SimulatedGpuSource",
    "Telemetry",
    "TelemetryHub",
    "TelemetryStore",
    "ThrottleReason",
    "open_gpu_source",
]
