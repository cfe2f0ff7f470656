"""`/metrics`: the live twin's forecast, how sure it is, and its adapted constants
(`ondo:twin_*`), read from the live twin at scrape time."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ondo.twin.adapt_params import BOUNDS
from ondo.twin.live import LiveTwin


class TwinCollector:
    """One series per GPU (label `gpu`), one live twin each."""

    def __init__(self, twin: LiveTwin | Sequence[LiveTwin]) -> None:
        self.twins = [twin] if isinstance(twin, LiveTwin) else list(twin)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for twin in self.twins:
            for family in self._collect_one(twin):
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()

    def _collect_one(self, twin: LiveTwin) -> Iterator[Metric]:
        snap = twin.latest
        gpu = str(twin.tracker.gpu_index)
        peak = GaugeMetricFamily("ondo:twin_forecast_peak_celsius",
                                 "Highest sensor reading the twin forecasts within its horizon",
                                 labels=["gpu", "sensor"])
        band = GaugeMetricFamily("ondo:twin_forecast_band_celsius",
                                 "Half-width of the forecast's band (nominal 90 %)",
                                 labels=["gpu", "sensor"])
        ttt = GaugeMetricFamily("ondo:twin_time_to_throttle_seconds",
                                "Forecast time to a thermal slowdown (+Inf: none within the "
                                "horizon)", labels=["gpu"])
        prob = GaugeMetricFamily("ondo:twin_throttle_probability",
                                 "Probability of a thermal slowdown within the horizon",
                                 labels=["gpu"])
        if snap is not None:
            peak.add_metric([gpu, "die"], snap.die_peak_c)
            peak.add_metric([gpu, "hbm"], snap.hbm_peak_c)
            band.add_metric([gpu, "die"], snap.die_band_c)
            band.add_metric([gpu, "hbm"], snap.hbm_band_c)
            ttt.add_metric([gpu], math.inf if snap.time_to_throttle_s is None
                           else snap.time_to_throttle_s)
            prob.add_metric([gpu], snap.throttle_probability)
        yield from (peak, band, ttt, prob)
        adaptive = twin.tracker.adaptive
        if adaptive is None:
            return
        const = GaugeMetricFamily("ondo:twin_adapted_constant",
                                  "The twin's adapted constants, each in its own unit (name)",
                                  labels=["gpu", "name"])
        for b, v in zip(BOUNDS, adaptive.theta):
            const.add_metric([gpu, b.name], math.exp(v) if b.log else float(v))
        if adaptive.filter is not None:
            const.add_metric([gpu, "inlet_c"], float(adaptive.filter.x[6]))
        yield const
        rejected = CounterMetricFamily("ondo:twin_rejected_samples",
                                       "Readings the online twin refused, by reason",
                                       labels=["gpu", "reason"])
        for reason, n in adaptive.rejected().items():
            rejected.add_metric([gpu, reason], n)
        yield rejected
        resyncs = CounterMetricFamily("ondo:twin_resyncs",
                                      "Times the twin's state was re-synchronised to readings "
                                      "it had kept refusing", labels=["gpu"])
        resyncs.add_metric([gpu], adaptive.resyncs)
        yield resyncs
        excited = CounterMetricFamily("ondo:twin_identifiable_seconds",
                                      "Time during which the thermal constants could adapt",
                                      labels=["gpu"])
        excited.add_metric([gpu], adaptive.excited_s)
        yield excited


def register_twin_metrics(registry: CollectorRegistry,
                          twin: LiveTwin | Sequence[LiveTwin]) -> None:
    registry.register(TwinCollector(twin))  # type: ignore[arg-type]
