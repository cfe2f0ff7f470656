"""The detectors as one fold over a stream of records.

    detectors = DetectorSet(DetectorConfig.from_params())
    for record in stream:                    # GPU samples, engine steps, finished requests,
        for draft in detectors.feed(record): #   twin snapshots, governor decisions
            log.append(draft)

Each record goes to the detectors of its stream (per GPU for GPU samples and twin
snapshots); every record's time also ticks the detectors that need time to pass without
input (engine and request windows). The same records in the same order give the same drafts.
"""

from __future__ import annotations

from typing import Any

from ondo.events.config import DetectorConfig
from ondo.events.detectors.engine import EngineDetectors
from ondo.events.detectors.gpu import GpuDetectors
from ondo.events.detectors.requests import SloDetector
from ondo.events.detectors.twin import (
    TwinDetectors,
    governor_event,
    is_governor_decision,
    is_twin_snapshot,
)
from ondo.events.schema import Event, EventDraft
from ondo.telemetry.schema import EngineSample, GpuSample, RequestSample

__all__ = ["DetectorSet", "record_time"]


def record_time(record: Any) -> tuple[float, float] | None:
    """(monotonic, wall) time of a record the detectors read; None for anything else."""
    if isinstance(record, GpuSample):
        return record.t_monotonic_s, record.t_wall_s
    if isinstance(record, EngineSample):
        return record.end_monotonic_s, record.t_wall_s
    if isinstance(record, RequestSample):
        return record.finish_monotonic_s, record.t_wall_s
    if isinstance(record, Event):
        return None
    if is_twin_snapshot(record) or is_governor_decision(record):
        return float(record.t_monotonic_s), float(getattr(record, "t_wall_s", 0.0))
    return None


class DetectorSet:
    def __init__(self, config: DetectorConfig | None = None,
                 twin_basis: str = "live twin") -> None:
        self.config = config or DetectorConfig.from_params()
        self.twin_basis = twin_basis
        self.gpus: dict[int, GpuDetectors] = {}
        self.twins: dict[int, TwinDetectors] = {}
        self.engine = EngineDetectors(self.config)
        self.slo = SloDetector(self.config)
        self.records = 0

    def _gpu(self, index: int) -> GpuDetectors:
        d = self.gpus.get(index)
        if d is None:
            d = self.gpus[index] = GpuDetectors(self.config, index)
        return d

    def feed(self, record: Any) -> list[EventDraft]:
        """The events `record` completes (in a fixed order)."""
        self.records += 1
        if isinstance(record, GpuSample):
            out = self._gpu(record.gpu_index).feed(record)
            return out + self.tick(record.t_monotonic_s, record.t_wall_s)
        if isinstance(record, EngineSample):
            out = self.engine.feed(record)
            return out + self.slo.tick(record.end_monotonic_s, record.t_wall_s)
        if isinstance(record, RequestSample):
            out = self.slo.feed(record)
            return out + self.engine.tick(record.finish_monotonic_s, record.t_wall_s)
        if isinstance(record, Event):
            return []
        if is_twin_snapshot(record):
            gpu = int(record.gpu_index)
            twin = self.twins.get(gpu)
            if twin is None:
                twin = self.twins[gpu] = TwinDetectors(self.config, gpu, self.twin_basis)
            throttling = self._gpu(gpu).throttle.active_bits
            return twin.feed(record, throttling)
        if is_governor_decision(record):
            return [governor_event(record)]
        return []

    def tick(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        """Let time pass without a record of the engine or request streams."""
        return self.engine.tick(t_s, t_wall_s) + self.slo.tick(t_s, t_wall_s)
