"""Prometheus exposition of the live telemetry, on a registry the server mounts on /metrics."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric

from ondo.telemetry.derive import EfficiencyTracker
from ondo.telemetry.hub import Subscription, TelemetryHub
from ondo.telemetry.schema import EngineSample, GpuSample, ThrottleReason
from ondo.telemetry.store import TelemetryStore


class _DroppedSamples:
    """Reads the drop counts of the store and the hub's subscriber queues at scrape time."""

    def __init__(self, hub: TelemetryHub | None, store: TelemetryStore | None) -> None:
        self.hub = hub
        self.store = store

    def collect(self) -> Iterator[Metric]:
        m = CounterMetricFamily(
            "ondo:telemetry_samples_dropped",
            "Telemetry samples dropped because a consumer fell behind",
            labels=["stage"],
        )
        m.add_metric(["store"], self.store.dropped if self.store else 0)
        m.add_metric(["subscriber"], self.hub.dropped if self.hub else 0)
        yield m
        errors = CounterMetricFamily(
            "ondo:telemetry_store_write_errors",
            "Failed writes of the telemetry store (disk full, file locked, I/O error); retried",
        )
        errors.add_metric([], self.store.write_errors if self.store else 0)
        yield errors


class PrometheusExporter:
    """Gauges of the latest GPU sample per GPU, energy per output token, and fault counters."""

    def __init__(
        self,
        registry: CollectorRegistry,
        hub: TelemetryHub | None = None,
        store: TelemetryStore | None = None,
        engine_gpu_index: int = 0,
        efficiency_window_s: float = 1.0,
    ) -> None:
        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, ["gpu", *labels], registry=registry)

        self.temp_c = gauge("ondo:gpu_temperature_celsius", "GPU die temperature")
        self.mem_temp_c = gauge("ondo:gpu_memory_temperature_celsius", "HBM temperature")
        self.power_w = gauge("ondo:gpu_power_watts", "GPU power, NVML ~1 s average")
        self.energy_j = gauge("ondo:gpu_energy_joules_total", "GPU energy counter")
        self.sm_mhz = gauge("ondo:gpu_sm_clock_mhz", "SM clock")
        self.throttle = gauge("ondo:gpu_throttle_active", "1 while a clock-event reason is active", "reason")
        self.energy_per_token = gauge(
            "ondo:energy_per_output_token_joules", "GPU energy per output token over the last window"
        )
        self.nvml_failures = Counter(
            "ondo:nvml_read_failures", "NVML reads that failed", ["gpu"], registry=registry
        )
        registry.register(_DroppedSamples(hub, store))  # type: ignore[arg-type]
        self.efficiency = EfficiencyTracker(engine_gpu_index, efficiency_window_s)
        self._sub: Subscription | None = None
        if hub is not None:
            self._sub = hub.subscribe(self.observe, kinds=(GpuSample, EngineSample))

    def observe(self, sample: GpuSample | EngineSample) -> None:
        if isinstance(sample, EngineSample):
            self.efficiency.on_engine(sample)
            return
        gpu = str(sample.gpu_index)
        for gauge_, value in (
            (self.temp_c, sample.temp_c),
            (self.mem_temp_c, sample.mem_temp_c),
            (self.power_w, sample.power_w),
            (self.energy_j, sample.energy_j),
            (self.sm_mhz, sample.sm_mhz),
        ):
            if value is not None:
                gauge_.labels(gpu).set(value)
        if sample.throttle_reasons is not None:
            for reason in ThrottleReason:
                active = 1.0 if sample.throttle_reasons & reason.value else 0.0
                self.throttle.labels(gpu, reason.name.lower()).set(active)  # type: ignore[union-attr]
        if sample.failed and sample.source == "nvml":
            self.nvml_failures.labels(gpu).inc(len(sample.failed))
        window = self.efficiency.on_gpu(sample)
        if window is not None and window.energy_per_output_token_j is not None:
            self.energy_per_token.labels(gpu).set(window.energy_per_output_token_j)

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
