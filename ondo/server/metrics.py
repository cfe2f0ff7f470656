"""Prometheus metrics under vLLM's names with an `ondo:` prefix, on the app's own registry.

Gauges and token counters are read from `AsyncLLM.stats()` at scrape time (a custom
collector), so they are never staler than the engine thread's last step. Per-request
latencies are observed as outputs stream past (`observe`), in seconds of the
monotonic clock the engine stamps requests with.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ondo.engine.outputs import RequestOutput

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict[str, float]], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"ondo:{name}", doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        yield gauge("num_requests_running", "Requests in the running batch", s["num_running"])
        yield gauge("num_requests_waiting", "Requests waiting for their first schedule",
                    s["num_waiting"] + s.get("num_queued_adds", 0))
        yield gauge("num_requests_swapped", "Requests swapped out to CPU memory", s["num_swapped"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)",
                    s["kv_cache_usage"])
        yield gauge("cpu_swap_usage_perc", "Fraction of the CPU swap pool in use (1 = full)",
                    s["num_cpu_blocks_used"] / max(s["num_cpu_blocks"], 1))
        preempt = CounterMetricFamily("ondo:num_preemptions", "Preemptions, by mode",
                                      labels=[*labels, "mode"])
        preempt.add_metric([self.model_name, "swap"], s["num_preemptions_swap"])
        preempt.add_metric([self.model_name, "recompute"], s["num_preemptions_recompute"])
        yield preempt
        for name, key, doc in (
            ("prompt_tokens", "num_prompt_tokens_total", "Prompt tokens taken in"),
            ("generation_tokens", "num_generation_tokens_total", "Tokens generated"),
        ):
            c = CounterMetricFamily(f"ondo:{name}", doc, labels=labels)
            c.add_metric([self.model_name], s[key])
            yield c


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str,
                 stats: Callable[[], dict[str, float]]) -> None:
        self.registry = registry
        self.model_name = model_name
        registry.register(_EngineCollector(stats, model_name))  # type: ignore[arg-type]
        labels = ["model_name"]
        self.request_success = Counter(
            "ondo:request_success", "Finished requests, by finish reason",
            [*labels, "finished_reason"], registry=registry)
        self.ttft_s = Histogram(
            "ondo:time_to_first_token_seconds", "Arrival to first output token",
            labels, buckets=_TTFT_BUCKETS, registry=registry).labels(model_name)
        self.itl_s = Histogram(
            "ondo:inter_token_latency_seconds", "Time between a request's consecutive outputs",
            labels, buckets=_ITL_BUCKETS, registry=registry).labels(model_name)
        self.e2e_s = Histogram(
            "ondo:e2e_request_latency_seconds", "Arrival to last output",
            labels, buckets=_REQUEST_BUCKETS, registry=registry).labels(model_name)
        self.queue_s = Histogram(
            "ondo:request_queue_time_seconds", "Arrival to first schedule",
            labels, buckets=_REQUEST_BUCKETS, registry=registry).labels(model_name)

    async def observe(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, recording its latencies on the way."""
        last_token_s: float | None = None
        async for out in outputs:
            now = time.monotonic()
            if any(c.new_token_ids for c in out.outputs):  # n > 1: any of its sequences
                if last_token_s is None:
                    first = out.metrics.get("first_token_s")
                    arrival = out.metrics.get("arrival_time_s")
                    if first is not None and arrival is not None:
                        self.ttft_s.observe(max(first - arrival, 0.0))
                else:
                    self.itl_s.observe(now - last_token_s)
                last_token_s = now
            if out.finished:
                self._finished(out, now)
            yield out

    def _finished(self, out: RequestOutput, now: float) -> None:
        reason = out.outputs[0].finish_reason or "unknown"
        self.request_success.labels(self.model_name, reason).inc()
        arrival = out.metrics.get("arrival_time_s")
        if arrival is not None:
            self.e2e_s.observe(max(now - arrival, 0.0))
            scheduled = out.metrics.get("first_scheduled_s")
            if scheduled is not None:
                self.queue_s.observe(max(scheduled - arrival, 0.0))
