"""`/metrics`: the governor's policy, objectives and the limits in force (`ondo:governor_*`),
read from the governor at scrape time."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ondo.control.governor import POLICIES, Governor


class GovernorCollector:
    def __init__(self, governor: Governor, gpu_indices: Sequence[int] = ()) -> None:
        """`gpu_indices`: the engine's GPUs, one `ondo:governor_binding_gpu` series each."""
        self.governor = governor
        self.gpu_indices = list(gpu_indices) or [governor.gpu_index]

    def collect(self) -> Iterator[Metric]:
        g = self.governor
        policy = GaugeMetricFamily("ondo:governor_policy",
                                   "1 for the governor's policy now in force", labels=["policy"])
        for name in POLICIES:
            policy.add_metric([name], 1.0 if g.policy_name == name else 0.0)
        yield policy
        o = g.objectives
        budget = GaugeMetricFamily("ondo:governor_power_budget_watts",
                                   "Power budget on NVML's 1 s average (+Inf: none)")
        budget.add_metric([], _value(o.power_budget_w))
        yield budget
        target = GaugeMetricFamily("ondo:governor_temperature_target_celsius",
                                   "Temperature target (+Inf: none)", labels=["sensor"])
        target.add_metric(["die"], _value(o.temp_target_c))
        target.add_metric(["hbm"], _value(o.hbm_temp_target_c))
        yield target
        slo = GaugeMetricFamily("ondo:governor_tpot_slo_seconds",
                                "p99 time per output token SLO (+Inf: none)")
        slo.add_metric([], _value(o.tpot_slo_s))
        yield slo
        limits = GaugeMetricFamily("ondo:governor_limit",
                                   "Scheduler limit in force (+Inf: the configured value)",
                                   labels=["limit"])
        for name, value in g.limits.as_dict().items():
            limits.add_metric([name], _value(value))
        yield limits
        binding = GaugeMetricFamily("ondo:governor_binding_gpu",
                                    "1 for the GPU whose readings the governor acts on (the "
                                    "least slack to a limit), 0 for the others",
                                    labels=["gpu", "constraint"])
        for index in self.gpu_indices:
            bound = index == g.binding_gpu
            binding.add_metric([str(index), g.binding if bound else ""], 1.0 if bound else 0.0)
        yield binding
        decisions = CounterMetricFamily("ondo:governor_decisions",
                                        "Changes of the scheduler's limits")
        decisions.add_metric([], g.decisions)
        yield decisions
        failures = CounterMetricFamily("ondo:governor_failures",
                                       "Policy failures (each fell back to off)")
        failures.add_metric([], g.failures)
        yield failures


def _value(x: float | int | None) -> float:
    return math.inf if x is None else float(x)


def register_governor_metrics(registry: CollectorRegistry, governor: Governor,
                              gpu_indices: Sequence[int] = ()) -> None:
    registry.register(GovernorCollector(governor, gpu_indices))  # type: ignore[arg-type]
