"""The rule-based recommender: the incident's entries and facts -> a runbook -> its first
action whose parameters the facts can fill. It answers whenever the model cannot (endpoint
down, too slow, an answer that fails the check) and is the baseline the model is measured
against.

The rules, first match wins (sensors first: every other reading rests on them; then heat,
which costs the hardware; then memory, latency, power):

1. `sensor_failed`, `sensor_stale`, `telemetry_gap` -> sensor-stale-or-failed
2. power or heat events while the GPU is busy (`gpu_busy_fraction` >= 0.3) and this engine
   nearly idle (`engine_busy_fraction` < 0.05) -> noisy-neighbour
3. heat (`thermal_margin_low`, `hbm_margin_low`, a thermal throttle or its forecast):
   only the HBM, the die >= 15 °C from its limit -> hbm-hot; the idle die >= 8 °C above the
   fitted plant's -> high-inlet; else the die >= 8 °C above the plant's steady state at
   that power -> degraded-cooling; else only the HBM -> hbm-hot; else thermal-margin-low
4. `swap_storm` -> swap-thrashing
5. `kv_cache_pressure` with no preemption or with few sequences running (<= 16: a handful
   of contexts fill the cache) -> kv-cache-undersized; `preemption` -> preemption-storm
6. `slo_violation` or `queue_backlog`: after a governor decision that set limits ->
   governor-overlimiting; a backlog or a TTFT breach -> queue-backlog-slo; else (TPOT) ->
   tpot-slo-breach
7. `power_budget_exceeded` -> power-budget-exceeded; `power_cap_sustained` ->
   power-cap-sustained
8. anything else (short throttles) -> transient-throttle
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ondo.agent.actions import ACTIONS, GpuLimits, ParamError, check_params, param_schemas
from ondo.agent.context import IncidentContext
from ondo.agent.recommendation import MAX_EVIDENCE, Recommendation, plain_rationale
from ondo.agent.runbook import Runbook, evaluate

INLET_EXCESS_C = 8.0
HEATING_EXCESS_C = 8.0
HBM_ONLY_DIE_MARGIN_C = 15.0  # only the HBM is hot: a hot inlet would heat the die too
NEIGHBOUR_GPU_BUSY = 0.3
NEIGHBOUR_ENGINE_BUSY = 0.05
FEW_RUNNING = 16
RULES_CONFIDENCE = 0.5
THERMAL_REASONS = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown", "thermal")


@dataclass(frozen=True)
class Diagnosis:
    runbook_id: str
    evidence: tuple[int, ...]  # entry seqs, the incident first
    why: str  # one sentence from the facts


def _f(ctx: IncidentContext, name: str) -> float | None:
    v = ctx.facts.get(name)
    return None if v is None or not math.isfinite(v) else float(v)


def _thermal(e: dict[str, Any]) -> bool:
    if e["kind"] in ("thermal_margin_low", "hbm_margin_low"):
        return True
    reason = str(e["payload"].get("reason", ""))
    return e["kind"] in ("throttle_started", "throttle_predicted") and \
        any(r in reason for r in THERMAL_REASONS)


def _limits_set(decision: dict[str, Any]) -> bool:
    limits = decision.get("limits") or {}
    return any(limits.get(k) is not None for k in ("max_num_batched_tokens", "max_num_seqs",
                                                   "max_prefill_tokens",
                                                   "prefill_tokens_per_s")) \
        or float(limits.get("duty_cycle", 1.0) or 1.0) < 1.0


def diagnose(ctx: IncidentContext) -> Diagnosis:
    def seqs(events: list[dict[str, Any]]) -> tuple[int, ...]:
        ids = [int(ctx.incident["seq"])] + [int(e["seq"]) for e in reversed(events)]
        return tuple(dict.fromkeys(ids))[:MAX_EVIDENCE]

    ev = ctx.of_kind
    fmt = lambda name, unit="": f"{_f(ctx, name):g}{unit}" if _f(ctx, name) is not None \
        else "unknown"  # noqa: E731
    sensors = ev("sensor_failed", "sensor_stale", "telemetry_gap")
    if sensors:
        return Diagnosis("sensor-stale-or-failed", seqs(sensors),
                         f"{len(sensors)} sensor or telemetry event(s): "
                         f"{', '.join(sorted({e['kind'] for e in sensors}))}")
    thermal = [e for e in ctx.events if _thermal(e)]
    power = ev("power_cap_sustained")
    throttles = ev("throttle_started")
    gpu_busy, engine_busy = _f(ctx, "gpu_busy_fraction"), _f(ctx, "engine_busy_fraction")
    if (thermal or power or throttles) and gpu_busy is not None and engine_busy is not None \
            and gpu_busy >= NEIGHBOUR_GPU_BUSY and engine_busy < NEIGHBOUR_ENGINE_BUSY:
        return Diagnosis("noisy-neighbour", seqs(thermal + power + throttles),
                         f"the GPU is busy {fmt('gpu_busy_fraction')} of the window while "
                         f"this engine is busy {fmt('engine_busy_fraction')}")
    if thermal:
        idle, heat = _f(ctx, "idle_die_excess_c"), _f(ctx, "heating_excess_c")
        die = [e for e in thermal if e["kind"] != "hbm_margin_low"]
        die_margin = _f(ctx, "die_margin_c")
        if not die and (die_margin is None or die_margin >= HBM_ONLY_DIE_MARGIN_C):
            return Diagnosis("hbm-hot", seqs(thermal),
                             f"HBM margin {fmt('hbm_margin_c', ' °C')} while the die keeps "
                             f"{fmt('die_margin_c', ' °C')}: memory traffic heats the HBM")
        if idle is not None and idle >= INLET_EXCESS_C:
            return Diagnosis("high-inlet", seqs(thermal),
                             f"the coolest die reading is {fmt('idle_die_excess_c', ' °C')} "
                             "above the fitted plant's idle die: the inlet is hot")
        if heat is not None and heat >= HEATING_EXCESS_C:
            return Diagnosis("degraded-cooling", seqs(thermal),
                             f"the die ran {fmt('heating_excess_c', ' °C')} above the fitted "
                             "plant's steady state at that power: cooling is worse")
        if not die:
            return Diagnosis("hbm-hot", seqs(thermal),
                             f"HBM margin {fmt('hbm_margin_c', ' °C')}, die margin "
                             f"{fmt('die_margin_c', ' °C')}")
        return Diagnosis("thermal-margin-low", seqs(thermal),
                         f"die margin {fmt('die_margin_c', ' °C')} at a normal inlet and "
                         "cooling")
    if ev("swap_storm"):
        return Diagnosis("swap-thrashing", seqs(ev("swap_storm", "preemption")),
                         f"swap storm; up to {fmt('swapped_blocks_max')} blocks swapped")
    kv, pre = ev("kv_cache_pressure"), ev("preemption")
    running = _f(ctx, "num_running")
    if kv and (not pre or (running is not None and running <= FEW_RUNNING)):
        return Diagnosis("kv-cache-undersized", seqs(kv + pre),
                         f"KV usage up to {fmt('kv_usage_max')} with at most "
                         f"{fmt('num_running')} sequences running")
    if pre:
        return Diagnosis("preemption-storm", seqs(pre + kv),
                         f"{fmt('preemptions')} preemptions with up to {fmt('num_running')} "
                         "sequences running")
    slo, backlog = ev("slo_violation"), ev("queue_backlog")
    if slo or backlog:
        if any(_limits_set(d) for d in ctx.governor):
            return Diagnosis("governor-overlimiting",
                             seqs(slo + backlog + ev("governor_decision")),
                             "the governor set scheduler limits before the breach")
        if backlog or any(e["payload"].get("metric") == "ttft" for e in slo):
            return Diagnosis("queue-backlog-slo", seqs(backlog + slo),
                             f"up to {fmt('num_waiting')} requests waiting")
        return Diagnosis("tpot-slo-breach", seqs(slo),
                         f"TPOT breach; the largest step held {fmt('max_batched_tokens')} "
                         "tokens")
    budget = ev("power_budget_exceeded")
    if budget:
        return Diagnosis("power-budget-exceeded", seqs(budget),
                         f"power at {fmt('power_w', ' W')} over the budget with "
                         f"{'no governor decision' if not ctx.governor else 'the governor on'}")
    if power:
        return Diagnosis("power-cap-sustained", seqs(power + throttles),
                         f"power at {fmt('power_w', ' W')} against a "
                         f"{fmt('power_limit_w', ' W')} limit, SM clock down to "
                         f"{fmt('sm_clock_ratio_min')} of its maximum")
    return Diagnosis("transient-throttle", seqs(throttles),
                     f"{len(throttles)} short throttle episode(s), none sustained")


def _urgency(ctx: IncidentContext, action: str) -> str:
    if action == "no_action":
        return "low"
    if any(e["severity"] == "critical" for e in ctx.events) or \
            any(_thermal(e) and e["kind"] == "throttle_started" for e in ctx.events):
        return "critical"
    if any(_thermal(e) for e in ctx.events):
        return "high"
    return "medium"


def fill_params(action: str, template: dict[str, Any], facts: dict[str, Any],
                limits: GpuLimits) -> dict[str, Any]:
    """A runbook action's parameters for these facts, rounded and held inside the action's
    bounds; KeyError naming a fact the incident lacks."""
    props = param_schemas(limits)[action]["properties"]
    out: dict[str, Any] = {}
    for name, value in template.items():
        spec = props[name]
        x = evaluate(value, facts, numeric=spec["type"] != "string")
        if spec["type"] == "integer":
            x = int(round(float(x)))
            x = max(spec.get("minimum", x), min(spec.get("maximum", x), x))
        out[name] = x
    return check_params(action, out, limits)


def rules_recommendation(ctx: IncidentContext, runbooks: dict[str, Runbook],
                         limits: GpuLimits, fallback_reason: str | None = None) -> Recommendation:
    d = diagnose(ctx)
    book = runbooks[d.runbook_id]
    for template in book.actions:
        try:
            params = fill_params(template.action, template.params, ctx.facts, limits)
        except (KeyError, ParamError):
            continue
        action = template.action
        break
    else:
        action, params = "page_human", {"reason": f"{book.title}: the facts needed for its "
                                                  "actions are missing"}
    assert action in ACTIONS
    why = f"{book.title}. {d.why[:1].upper()}{d.why[1:]}. Runbook {book.id} proposes " \
          f"{action.replace('_', ' ')}."
    return Recommendation(action, params, plain_rationale(why), d.evidence, book.id, "actions",
                          RULES_CONFIDENCE, _urgency(ctx, action), "rules",
                          fallback_reason=fallback_reason)
