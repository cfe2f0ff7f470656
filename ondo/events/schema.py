"""The event schema: every kind of event, its severity, what it is about (subject) and its
typed payload. Version `SCHEMA_VERSION` is written into every entry.

Detectors and the layers above make `EventDraft`s; the log (`ondo/events/log.py`) checks a
draft against its kind's `KindSpec`, gives it a sequence number and a hash, and returns the
`Event`. Evidence names what an event rests on: `gpu:0@12.345000` (a GPU sample of GPU 0 at
that monotonic time), `step:812` (an engine step), `request:<id>`, `event:17` (an entry of
this log).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ondo.events.canonical import canonical_float, plain

SCHEMA_VERSION = 1


class EventKind(str, enum.Enum):
    THROTTLE_STARTED = "throttle_started"
    THROTTLE_ENDED = "throttle_ended"
    THROTTLE_PREDICTED = "throttle_predicted"
    THERMAL_MARGIN_LOW = "thermal_margin_low"
    HBM_MARGIN_LOW = "hbm_margin_low"
    POWER_BUDGET_EXCEEDED = "power_budget_exceeded"
    POWER_CAP_SUSTAINED = "power_cap_sustained"
    PREEMPTION = "preemption"
    SWAP_STORM = "swap_storm"
    KV_CACHE_PRESSURE = "kv_cache_pressure"
    QUEUE_BACKLOG = "queue_backlog"
    SLO_VIOLATION = "slo_violation"
    SENSOR_STALE = "sensor_stale"
    SENSOR_FAILED = "sensor_failed"
    TELEMETRY_GAP = "telemetry_gap"
    CONDITION_CLEARED = "condition_cleared"
    GOVERNOR_DECISION = "governor_decision"
    RECOMMENDATION_ISSUED = "recommendation_issued"
    OPERATOR_DECISION = "operator_decision"
    ACTION_APPLIED = "action_applied"
    ACTION_OUTCOME = "action_outcome"


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class KindSpec:
    """A kind's default severity, subject keys and payload fields.

    Field types: "float", "int", "str", "bool", "dict", "list"; a trailing "?" allows None.
    Fields in `optional` may be left out; any field not named here is refused."""

    doc: str
    severity: Severity
    subject: tuple[str, ...]
    payload: dict[str, str]
    optional: dict[str, str] = field(default_factory=dict)
    made_by: str = "detector"


_EPISODE = {"since_s": "float"}
_SPECS: dict[EventKind, KindSpec] = {
    EventKind.THROTTLE_STARTED: KindSpec(
        "the GPU reports a clock-event (throttle) reason: one sample opens the episode",
        Severity.WARNING, ("gpu", "reason"),
        {"reason": "str", "reason_bit": "int", **_EPISODE, "sm_mhz": "float?",
         "power_w": "float?", "temp_c": "float?"}),
    EventKind.THROTTLE_ENDED: KindSpec(
        "the reason has been clear for the release time; the episode's figures",
        Severity.INFO, ("gpu", "reason"),
        {"reason": "str", "reason_bit": "int", "started_s": "float", "ended_s": "float",
         "duration_s": "float", "min_sm_mhz": "float?", "max_power_w": "float?",
         "max_temp_c": "float?", "onset_seq": "int"}),
    EventKind.THROTTLE_PREDICTED: KindSpec(
        "the twin forecasts a throttle (thermal slowdown or power cap) within the lead time",
        Severity.WARNING, ("gpu", "reason"),
        {"reason": "str", "time_to_throttle_s": "float", "horizon_s": "float",
         "die_peak_c": "float?", "hbm_peak_c": "float?", "power_peak_w": "float?",
         "basis": "str"}),
    EventKind.THERMAL_MARGIN_LOW: KindSpec(
        "the die (measured, or the twin's forecast peak) is within the margin of its limit",
        Severity.WARNING, ("gpu", "basis"),
        {"temp_c": "float", "limit_c": "float", "margin_c": "float", "threshold_c": "float",
         **_EPISODE}),
    EventKind.HBM_MARGIN_LOW: KindSpec(
        "the HBM (measured, or the twin's forecast peak) is within the margin of its limit",
        Severity.WARNING, ("gpu", "basis"),
        {"temp_c": "float", "limit_c": "float", "margin_c": "float", "threshold_c": "float",
         **_EPISODE}),
    EventKind.POWER_BUDGET_EXCEEDED: KindSpec(
        "NVML's averaged power has stayed above the power budget",
        Severity.WARNING, ("gpu",),
        {"power_w": "float", "budget_w": "float", **_EPISODE}),
    EventKind.POWER_CAP_SUSTAINED: KindSpec(
        "the SW power cap has held for the sustain time: throughput is power-bound",
        Severity.WARNING, ("gpu",),
        {"held_s": "float", "sm_mhz": "float?", "sm_clock_ratio": "float?", **_EPISODE}),
    EventKind.PREEMPTION: KindSpec(
        "the scheduler preempted running sequences (a burst opens with the first step)",
        Severity.WARNING, ("engine",),
        {"preemptions": "int", "mode": "str", "swapped_blocks_delta": "int",
         "step_index": "int", "num_waiting": "int", "num_running": "int", **_EPISODE}),
    EventKind.SWAP_STORM: KindSpec(
        "KV blocks crossing the host link within the window exceed a share of the cache",
        Severity.WARNING, ("engine",),
        {"window_s": "float", "swapped_blocks_moved": "int", "kv_blocks_total": "int",
         "fraction": "float", **_EPISODE}),
    EventKind.KV_CACHE_PRESSURE: KindSpec(
        "KV-cache blocks in use have stayed above the threshold",
        Severity.WARNING, ("engine",),
        {"kv_blocks_used": "int", "kv_blocks_total": "int", "usage": "float",
         "threshold": "float", **_EPISODE}),
    EventKind.QUEUE_BACKLOG: KindSpec(
        "requests waiting for their first schedule have stayed above the threshold",
        Severity.WARNING, ("engine",),
        {"num_waiting": "int", "num_running": "int", "threshold": "int", **_EPISODE}),
    EventKind.SLO_VIOLATION: KindSpec(
        "a share of the requests finished in the window missed the TTFT or TPOT objective",
        Severity.WARNING, ("metric",),
        {"metric": "str", "slo_s": "float", "window_s": "float", "requests": "int",
         "violating": "int", "fraction": "float", "worst_s": "float",
         "worst_request_id": "str", **_EPISODE}),
    EventKind.SENSOR_STALE: KindSpec(
        "a reading the source refreshes on its own schedule has not changed for the stale time",
        Severity.WARNING, ("gpu", "field"), {"field": "str", **_EPISODE}),
    EventKind.SENSOR_FAILED: KindSpec(
        "reads of a field fail (the value is missing)",
        Severity.CRITICAL, ("gpu", "field"), {"field": "str", **_EPISODE}),
    EventKind.TELEMETRY_GAP: KindSpec(
        "samples are missing: a gap in a GPU's series, or samples a queue dropped",
        Severity.WARNING, ("stage",),
        {"stage": "str", "dropped": "int"},
        optional={"gap_s": "float", "period_s": "float", "gpu": "int", "suppressed": "int"}),
    EventKind.CONDITION_CLEARED: KindSpec(
        "a condition opened by an earlier event has been clear for its release time",
        Severity.INFO, (),
        {"kind": "str", "onset_seq": "int", "started_s": "float", "ended_s": "float",
         "duration_s": "float", "summary": "dict"}),
    EventKind.GOVERNOR_DECISION: KindSpec(
        "the governor changed the scheduler's limits",
        Severity.INFO, ("policy",),
        {"policy": "str", "reason": "str", "limits": "dict", "inputs": "dict",
         "forecast": "dict"}, made_by="governor"),
    EventKind.RECOMMENDATION_ISSUED: KindSpec(
        "the agent (or a person, or a revision) proposes an action, with its rationale and "
        "the events it rests on",
        Severity.INFO, ("recommendation_id",),
        {"recommendation_id": "str", "action": "str", "parameters": "dict",
         "rationale": "str"},
        optional={"confidence": "float", "urgency": "str", "runbook": "dict", "source": "str",
                  "model": "str", "fallback_reason": "str", "proposed_by": "str",
                  "revision_of": "str"}, made_by="agent or console"),
    EventKind.OPERATOR_DECISION: KindSpec(
        "a person approved, rejected or deferred a recommendation",
        Severity.INFO, ("recommendation_id",),
        {"recommendation_id": "str", "decision": "str", "operator": "str"},
        optional={"comment": "str"}, made_by="console"),
    EventKind.ACTION_APPLIED: KindSpec(
        "an approved action took effect",
        Severity.INFO, ("action_id",),
        {"action_id": "str", "action": "str", "parameters": "dict"},
        optional={"recommendation_id": "str"}, made_by="governor or console"),
    EventKind.ACTION_OUTCOME: KindSpec(
        "what an applied action did, measured over a window after it",
        Severity.INFO, ("action_id",),
        {"action_id": "str", "outcome": "str", "metrics": "dict"},
        optional={"recommendation_id": "str", "action": "str"}, made_by="console"),
}
KIND_SPECS: dict[EventKind, KindSpec] = _SPECS
OPERATOR_DECISIONS = ("approve", "reject", "defer")


@dataclass(frozen=True)
class EventDraft:
    """An event before the log numbers and chains it.

    `opens`: this event opens an episode under that key (a condition, a throttle); `closes`:
    it ends the episode opened under that key. The log links the two: the closing event's
    payload gets `onset_seq` and its evidence `event:<seq>` of the opening one."""

    kind: EventKind
    t_monotonic_s: float
    t_wall_s: float
    subject: dict[str, Any]
    payload: dict[str, Any]
    evidence: tuple[str, ...] = ()
    severity: Severity | None = None  # None: the kind's default
    opens: str | None = None
    closes: str | None = None


@dataclass(frozen=True)
class Event:
    """An entry of the log. `body` is its canonical JSON, what `hash` covers."""

    seq: int
    t_monotonic_s: float
    t_wall_s: float
    kind: EventKind
    severity: Severity
    subject: dict[str, Any]
    payload: dict[str, Any]
    evidence: tuple[str, ...]
    schema_version: int
    prev_hash: str
    hash: str
    body: str


class SchemaError(ValueError):
    """A draft that does not match its kind's spec; the message names the field."""


_TYPES: dict[str, tuple[type, ...]] = {
    "float": (float, int),
    "int": (int,),
    "str": (str,),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
}


def _check(kind: EventKind, name: str, type_name: str, value: Any) -> Any:
    nullable = type_name.endswith("?")
    base = type_name.rstrip("?")
    if value is None:
        if nullable:
            return None
        raise SchemaError(f"{kind.value}: payload field {name!r} must not be null")
    ok = isinstance(value, _TYPES[base]) and not (base != "bool" and isinstance(value, bool))
    if not ok:
        raise SchemaError(f"{kind.value}: payload field {name!r} must be {base}, "
                          f"got {type(value).__name__} {value!r}")
    if base == "float":
        value = float(value)
        canonical_float(value)  # finite
    return value


def checked_payload(kind: EventKind, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as plain JSON values, floats as floats; SchemaError naming the first field
    that is missing, unknown, or of the wrong type."""
    spec = KIND_SPECS[kind]
    payload = plain(payload)
    out: dict[str, Any] = {}
    for name, type_name in spec.payload.items():
        if name not in payload:
            raise SchemaError(f"{kind.value}: payload field {name!r} is missing")
        out[name] = _check(kind, name, type_name, payload[name])
    for name, value in payload.items():
        if name in spec.payload:
            continue
        if name not in spec.optional:
            raise SchemaError(f"{kind.value}: unknown payload field {name!r}")
        out[name] = _check(kind, name, spec.optional[name], value)
    if kind is EventKind.OPERATOR_DECISION and out["decision"] not in OPERATOR_DECISIONS:
        raise SchemaError(f"operator_decision: decision must be one of {OPERATOR_DECISIONS}, "
                          f"got {out['decision']!r}")
    return out


def checked_subject(kind: EventKind, subject: dict[str, Any]) -> dict[str, Any]:
    subject = plain(subject)
    for key in KIND_SPECS[kind].subject:
        if key not in subject:
            raise SchemaError(f"{kind.value}: subject needs {key!r}, got {sorted(subject)}")
    return subject


def schema_table_markdown() -> str:
    """The schema as a Markdown table (docs/events.md holds this text)."""
    lines = ["| kind | when | severity | subject | payload (`?`: may be null; [optional]) | "
             "made by |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind, spec in KIND_SPECS.items():
        fields = [f"`{n}` {t}" for n, t in spec.payload.items()]
        fields += [f"[`{n}` {t}]" for n, t in spec.optional.items()]
        subject = ", ".join(f"`{k}`" for k in spec.subject) or "the opening event's"
        lines.append(f"| `{kind.value}` | {spec.doc} | {spec.severity.value} | {subject} | "
                     f"{', '.join(fields)} | {spec.made_by} |")
    return "\n".join(lines)
