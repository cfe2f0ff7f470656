"""The engine source: the engine calls `on_step(stats)` once per step; the step becomes an
`EngineSample` with its load descriptor and is published. Nothing here waits on storage."""

from __future__ import annotations

import time

from ondo.engine.step_stats import StepStats
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import (
    H100_PEAK_BYTES_PER_S,
    H100_PEAK_FLOPS,
    EngineSample,
    engine_sample_from_step,
)


class EngineSource:
    """Attach with `engine.add_step_hook(source.on_step)` (any `Callable[[StepStats], None]`)."""

    source_name = "engine"

    def __init__(
        self,
        hub: TelemetryHub,
        peak_flops: float = H100_PEAK_FLOPS,
        peak_bytes_per_s: float = H100_PEAK_BYTES_PER_S,
    ) -> None:
        self.hub = hub
        self.peak_flops = peak_flops
        self.peak_bytes_per_s = peak_bytes_per_s
        self.produced = 0

    def on_step(self, stats: StepStats) -> EngineSample:
        sample = engine_sample_from_step(stats, time.time(), self.peak_flops, self.peak_bytes_per_s)
        self.produced += 1
        self.hub.publish(sample)
        return sample
