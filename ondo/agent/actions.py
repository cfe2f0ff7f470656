"""The actions the agent may propose, each with typed parameters, and their bounds.

The set is fixed here, in code: nothing the agent reads (events, runbooks, a request's text
that reached an event payload) can add to it. Five map to the governor's setters, the
other three are for a person:

| action | parameters | what applying it does |
| --- | --- | --- |
| `set_power_budget` | `power_budget_w` | the governor holds NVML's 1 s power at or under it |
| `set_governor_policy` | `policy` (off, reactive, predictive) | switches the governor's law |
| `cap_running_sequences` | `max_num_seqs` | seats for running sequences (admissions wait) |
| `set_token_budget` | `max_num_batched_tokens` | the scheduler's per-step token budget |
| `set_temperature_target` | `temp_target_c` | the die temperature the governor holds |
| `drain_and_restart` | `reason` | drain the server and restart its engine |
| `page_human` | `reason` | a person looks (facility, hardware, capacity) |
| `no_action` | — | nothing to do; the evidence says why |

Bounds that depend on the GPU (its idle power and power limit, its temperature limit and
inlet) come from `GpuLimits`; the JSON schema the model answers under carries them, and
`check_params` refuses anything outside them with the parameter named.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from ondo.twin.params import TwinParams


class Action(str, enum.Enum):
    SET_POWER_BUDGET = "set_power_budget"
    SET_GOVERNOR_POLICY = "set_governor_policy"
    CAP_RUNNING_SEQUENCES = "cap_running_sequences"
    SET_TOKEN_BUDGET = "set_token_budget"
    SET_TEMPERATURE_TARGET = "set_temperature_target"
    DRAIN_AND_RESTART = "drain_and_restart"
    PAGE_HUMAN = "page_human"
    NO_ACTION = "no_action"


ACTIONS: tuple[str, ...] = tuple(a.value for a in Action)
GOVERNOR_POLICIES = ("off", "reactive", "predictive")
URGENCIES = ("low", "medium", "high", "critical")
MAX_REASON_CHARS = 160
MAX_NUM_SEQS = 4096
MIN_TOKEN_BUDGET, MAX_TOKEN_BUDGET = 16, 1 << 20


@dataclass(frozen=True)
class GpuLimits:
    """What bounds the parameters: the GPU's power range and temperature limits."""

    idle_power_w: float = 120.0
    power_limit_w: float = 700.0
    die_limit_c: float = 87.0
    hbm_limit_c: float = 95.0
    ambient_c: float = 30.0

    @classmethod
    def from_params(cls, params: TwinParams) -> GpuLimits:
        return cls(idle_power_w=float(params.idle_power_w),
                   power_limit_w=float(params.power_limit_w),
                   die_limit_c=float(params.sw_thermal_c), hbm_limit_c=float(params.mem_max_c),
                   ambient_c=float(params.ambient_c))

    @property
    def power_budget_range_w(self) -> tuple[float, float]:
        """A budget must sit above idle power (else shaping load cannot hold it)."""
        return float(math.ceil(self.idle_power_w + 10.0)), self.power_limit_w

    @property
    def temp_target_range_c(self) -> tuple[float, float]:
        return float(math.ceil(self.ambient_c + 5.0)), self.die_limit_c


def param_schemas(limits: GpuLimits) -> dict[str, dict[str, Any]]:
    """Each action's `params` as a JSON schema object, bounds filled in."""
    lo_w, hi_w = limits.power_budget_range_w
    lo_c, hi_c = limits.temp_target_range_c
    reason = {"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS}

    def obj(**props: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": props, "required": list(props),
                "additionalProperties": False}

    return {
        "set_power_budget": obj(power_budget_w={"type": "integer", "minimum": int(lo_w),
                                                "maximum": int(hi_w)}),
        "set_governor_policy": obj(policy={"type": "string", "enum": list(GOVERNOR_POLICIES)}),
        "cap_running_sequences": obj(max_num_seqs={"type": "integer", "minimum": 1,
                                                   "maximum": MAX_NUM_SEQS}),
        "set_token_budget": obj(max_num_batched_tokens={"type": "integer",
                                                        "minimum": MIN_TOKEN_BUDGET,
                                                        "maximum": MAX_TOKEN_BUDGET}),
        "set_temperature_target": obj(temp_target_c={"type": "integer", "minimum": int(lo_c),
                                                     "maximum": int(hi_c)}),
        "drain_and_restart": obj(reason=reason),
        "page_human": obj(reason=reason),
        "no_action": obj(),
    }


class ParamError(ValueError):
    """Parameters that do not fit their action; the message names the parameter."""


def check_params(action: str, params: Any, limits: GpuLimits) -> dict[str, Any]:
    """`params` checked against `action`'s schema (types, bounds, no unknown names); the
    checked dict (integers as int). ParamError naming the first bad parameter."""
    if action not in ACTIONS:
        raise ParamError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    if not isinstance(params, dict):
        raise ParamError(f"params must be an object, got {type(params).__name__}")
    schema = param_schemas(limits)[action]
    props: dict[str, dict[str, Any]] = schema["properties"]
    unknown = sorted(set(params) - set(props))
    if unknown:
        raise ParamError(f"{action}: unknown parameter(s) {unknown}; it takes "
                         f"{sorted(props) or 'none'}")
    out: dict[str, Any] = {}
    for name, spec in props.items():
        if name not in params:
            raise ParamError(f"{action}: parameter {name!r} is missing")
        out[name] = _check_value(f"{action}.{name}", params[name], spec)
    return out


def _check_value(where: str, value: Any, spec: dict[str, Any]) -> Any:
    kind = spec["type"]
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value != int(value):
            raise ParamError(f"{where} must be a whole number, got {value!r}")
        value = int(value)
    elif kind == "string":
        if not isinstance(value, str) or not value.strip():
            raise ParamError(f"{where} must be a non-empty string, got {value!r}")
        if len(value) > spec.get("maxLength", len(value)):
            raise ParamError(f"{where} is longer than {spec['maxLength']} characters")
        if "enum" in spec and value not in spec["enum"]:
            raise ParamError(f"{where} must be one of {spec['enum']}, got {value!r}")
    if "minimum" in spec and value < spec["minimum"]:
        raise ParamError(f"{where}={value} is below its minimum {spec['minimum']}")
    if "maximum" in spec and value > spec["maximum"]:
        raise ParamError(f"{where}={value} is above its maximum {spec['maximum']}")
    return value
