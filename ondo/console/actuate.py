"""An approved action as a change of the running governor, planned before anything is recorded.

`plan_change` decides (pure): it checks the action's parameters against the GPU's bounds
(the agent's own `check_params`) and the governor's objectives against the GPU
(`resolve_objectives`), and returns the `Change`, or `ActionRefused` naming the parameter.
`apply_change` does it through the governor's run-time setters, which the engine receives
as scheduler limits:

| action | change |
| --- | --- |
| `set_governor_policy` | `set_policy(policy)` |
| `set_power_budget` | `set_objectives(power_budget_w=W)`, the other objectives kept |
| `set_temperature_target` | `set_objectives(temp_target_c=C)` |
| `cap_running_sequences` | `set_caps(max_num_seqs=n)`, other caps kept (n >= configured: none) |
| `set_token_budget` | `set_caps(max_num_batched_tokens=B)` |
| `page_human`, `drain_and_restart`, `no_action` | none: approving records that a person acts |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ondo.agent.actions import GpuLimits, ParamError, check_params
from ondo.control.objectives import GpuFacts, ObjectiveError, Objectives, resolve_objectives
from ondo.engine.scheduler_limits import SchedulerLimits


class ActionRefused(ValueError):
    """An action that cannot be applied as asked; the message names the parameter."""


@dataclass(frozen=True)
class Change:
    action: str
    params: dict[str, Any]
    policy: str | None = None
    objectives: Objectives | None = None
    caps: SchedulerLimits | None = None

    @property
    def applies(self) -> bool:
        return self.policy is not None or self.objectives is not None or self.caps is not None


def checked_params(action: str, params: Any, governor: Any) -> dict[str, Any]:
    """`params` checked for `action` against the GPU's bounds (ActionRefused)."""
    limits = GpuLimits.from_params(governor.governor.params) if governor is not None \
        else GpuLimits()
    try:
        return check_params(action, params, limits)
    except ParamError as e:
        raise ActionRefused(str(e)) from None


def plan_change(action: str, params: Any, governor: Any) -> Change:
    """`governor`: the server's `ServerGovernor`-like object (None: there is none)."""
    params = checked_params(action, params, governor)
    if action in ("page_human", "drain_and_restart", "no_action"):
        return Change(action, params)
    if governor is None:
        raise ActionRefused(f"{action}: this server runs no governor (it needs GPU telemetry: "
                            "--telemetry auto, nvml or sim)")
    g = governor.governor
    if action == "set_governor_policy":
        return Change(action, params, policy=params["policy"])
    if action in ("set_power_budget", "set_temperature_target"):
        o = g.objectives
        budget = params.get("power_budget_w", o.power_budget_w)
        target = params.get("temp_target_c", o.temp_target_c)
        try:
            new = resolve_objectives(
                GpuFacts.from_params(g.params), power_budget_w=budget, temp_target_c=target,
                hbm_temp_target_c=o.hbm_temp_target_c,
                tpot_slo_ms=None if o.tpot_slo_s is None else o.tpot_slo_s * 1e3)
        except ObjectiveError as e:
            name = "power_budget_w" if "power" in e.flag else "temp_target_c"
            raise ActionRefused(f"{action}.{name}: {e}") from None
        return Change(action, params, objectives=new)
    caps = g.caps
    if action == "cap_running_sequences":
        n = int(params["max_num_seqs"])
        return Change(action, params, caps=dataclasses.replace(
            caps, max_num_seqs=None if n >= g.config.max_num_seqs else n))
    if action == "set_token_budget":
        n = int(params["max_num_batched_tokens"])
        return Change(action, params, caps=dataclasses.replace(
            caps, max_num_batched_tokens=None if n >= g.config.max_num_batched_tokens else n))
    raise ActionRefused(f"action {action!r} has no run-time change")


def apply_change(change: Change, governor: Any) -> dict[str, Any]:
    """Apply through the governor's setters; the governor's state afterwards."""
    if change.policy is not None:
        governor.set_policy(change.policy)
    if change.objectives is not None:
        governor.set_objectives(change.objectives)
    if change.caps is not None:
        governor.set_caps(change.caps)
    return governor_view(governor)


def governor_view(governor: Any) -> dict[str, Any]:
    """Policy, objectives, limits in force and caps of a live governor."""
    g = governor.governor
    return {"policy": g.policy_name, "reason": g.reason, "objectives": g.objectives.as_dict(),
            "limits": g.limits.as_dict(), "caps": g.caps.as_dict(),
            "configured": {"max_num_seqs": g.config.max_num_seqs,
                           "max_num_batched_tokens": g.config.max_num_batched_tokens},
            "decisions": g.decisions}
