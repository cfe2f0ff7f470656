"""Decisions are data: every change of the scheduler's limits is a `GovernorDecision`,
published on the telemetry hub and stored in the telemetry database (`DECISION_TABLE`).

The dict fields are stored as canonical JSON (sorted keys, no spaces), so the same decision
always gives the same bytes, which a hash-chained log can commit to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ondo.telemetry.store import RecordTable


@dataclass(frozen=True)
class GovernorDecision:
    t_monotonic_s: float
    t_wall_s: float
    policy: str  # "off", "reactive", "predictive"
    reason: str  # why the limits are what they are now
    limits: dict  # SchedulerLimits.as_dict(): the limits now in force
    inputs: dict  # what the policy saw: sensor readings, twin estimate, engine load
    forecast: dict  # what it expected under the chosen limits (empty for reactive and off)
    objectives: dict = field(default_factory=dict)
    gpu_index: int = 0


def plain_json(value: Any) -> Any:
    """`json.dumps`'s `default`: a numpy scalar (a reading or a flag computed with numpy)
    as the Python value."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} in a governor decision is not JSON")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True,
                      default=plain_json)


DECISION_TABLE = RecordTable(
    kind=GovernorDecision,
    ddl="""
CREATE TABLE IF NOT EXISTS governor_decisions (
    t_monotonic_s REAL, t_wall_s REAL, gpu_index INTEGER, policy TEXT, reason TEXT,
    limits TEXT, inputs TEXT, forecast TEXT, objectives TEXT
);
CREATE INDEX IF NOT EXISTS governor_decisions_t ON governor_decisions (t_monotonic_s);
""",
    insert_sql="INSERT INTO governor_decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    row=lambda d: (d.t_monotonic_s, d.t_wall_s, d.gpu_index, d.policy, d.reason,
                   canonical_json(d.limits), canonical_json(d.inputs),
                   canonical_json(d.forecast), canonical_json(d.objectives)),
)
