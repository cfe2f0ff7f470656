"""A proposal's what-if: the twin's forecast from its estimated state with the load as it is,
and with the load the action would leave.

An action changes the engine's load level u (the share of its present activity it keeps):

| action | u |
| --- | --- |
| `set_power_budget` W | the largest level, in steps of 0.05, whose steady state draws <= W |
| `set_temperature_target` C | the largest level whose steady die sensor reads <= C |
| `set_governor_policy` reactive or predictive | the largest level meeting the objectives in force |
| `set_governor_policy` off | 1 |
| `cap_running_sequences` n | min(1, n / sequences running): decode load goes with the batch |
| `set_token_budget` B | min(1, B / the budget in force), on the compute activity only |
| the others | 1 (a person acts) |

The steady-state levels are what the governor works towards; the caps' are first-order
estimates (a token budget bounds prefill chunks, which are compute; memory traffic stays).
Both forecasts use the twin's plant from the same state over `horizon_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ondo.twin.estimator import Estimate
from ondo.twin.params import TwinParams
from ondo.twin.plant import THROTTLE_SW_POWER_CAP, Load, steady_state
from ondo.twin.predictor import forecast_constant, state_from_estimate

HORIZON_S = 120.0
DT_S = 0.1
LEVEL_STEP = 0.05
MIN_LEVEL = 0.1


@dataclass(frozen=True)
class LoadContext:
    """What the level of a cap depends on: the engine's sequences and the limits in force."""

    num_running: int | None = None
    max_num_batched_tokens: int | None = None
    power_budget_w: float | None = None
    temp_target_c: float | None = None


def _steady(params: TwinParams, a_c: float, a_m: float, u: float, ambient_c: float):
    s = steady_state(params, Load(a_c * u, a_m * u), ambient_c)
    return float(s.power_avg_w), float(s.die_sensor_c)


def level_meeting(params: TwinParams, a_c: float, a_m: float, ambient_c: float,
                  power_w: float | None = None, temp_c: float | None = None) -> float:
    """The largest level (steps of LEVEL_STEP, at least MIN_LEVEL) whose steady state meets
    the power and temperature given."""
    u = 1.0
    while u > MIN_LEVEL + 1e-9:
        p, t = _steady(params, a_c, a_m, u, ambient_c)
        if (power_w is None or p <= power_w) and (temp_c is None or t <= temp_c):
            return round(u, 4)
        u -= LEVEL_STEP
    return MIN_LEVEL


def action_level(action: str, params: dict[str, Any], twin: TwinParams,
                 state: dict[str, float], ctx: LoadContext) -> tuple[float, float, str]:
    """(level on compute, level on memory, what it assumes)."""
    a_c, a_m, amb = state["compute_activity"], state["memory_activity"], state["ambient_c"]
    if action == "set_power_budget":
        u = level_meeting(twin, a_c, a_m, amb, power_w=float(params["power_budget_w"]))
        return u, u, "the governor holds the steady state under the budget"
    if action == "set_temperature_target":
        u = level_meeting(twin, a_c, a_m, amb, temp_c=float(params["temp_target_c"]))
        return u, u, "the governor holds the steady die reading under the target"
    if action == "set_governor_policy":
        if params["policy"] == "off" or (ctx.power_budget_w is None and
                                         ctx.temp_target_c is None):
            return 1.0, 1.0, "no objective shapes the load"
        u = level_meeting(twin, a_c, a_m, amb, ctx.power_budget_w, ctx.temp_target_c)
        return u, u, "the policy meets the objectives in force"
    if action == "cap_running_sequences":
        if not ctx.num_running:
            return 1.0, 1.0, "no sequences running: the cap does not bind"
        u = min(1.0, float(params["max_num_seqs"]) / ctx.num_running)
        return u, u, "the load scales with the sequences running"
    if action == "set_token_budget":
        if not ctx.max_num_batched_tokens:
            return 1.0, 1.0, "the token budget in force is unknown"
        u = min(1.0, float(params["max_num_batched_tokens"]) / ctx.max_num_batched_tokens)
        return u, 1.0, "compute scales with the token budget; memory traffic stays"
    return 1.0, 1.0, "this action does not change the load"


def _estimate(state: dict[str, float]) -> Estimate:
    nan = math.nan
    return Estimate(state["die_c"], state["hbm_c"], state["sink_c"], state["board_c"],
                    state["die_sensor_c"], state["hbm_sensor_c"], state["ambient_c"], 0.0, 0.0,
                    nan, nan)


def what_if(action: str, params: dict[str, Any], twin: TwinParams, state: dict[str, float],
            ctx: LoadContext, horizon_s: float = HORIZON_S) -> dict[str, Any]:
    """Both forecasts, one point a second, and their peaks and times to throttle."""
    start = state_from_estimate(twin, _estimate(state), state["sm_mhz"], state["power_w"],
                                state["power_instant_w"],
                                bool(int(state["throttle_reasons"]) & THROTTLE_SW_POWER_CAP))
    u_c, u_m, assumes = action_level(action, params, twin, state, ctx)
    a_c, a_m, amb = state["compute_activity"], state["memory_activity"], state["ambient_c"]
    without = forecast_constant(twin, start, horizon_s, a_c, a_m, amb, DT_S)
    with_ = forecast_constant(twin, start, horizon_s, a_c * u_c, a_m * u_m, amb, DT_S)
    every = max(1, round(1.0 / DT_S))

    def thin(x: np.ndarray) -> list[float]:
        return [round(float(v), 2) for v in x[every - 1::every]]

    def summary(fc) -> dict[str, Any]:
        return {"die_peak_c": round(float(np.max(fc.temp_c)), 2),
                "power_peak_w": round(float(np.max(fc.power_w)), 1),
                "time_to_throttle_s": fc.time_to_throttle_s,
                "time_to_power_cap_s": fc.time_to_power_cap_s}

    return {"horizon_s": horizon_s, "level_compute": u_c, "level_memory": u_m,
            "assumes": assumes, "t_s": thin(without.t_s),
            "without": {"die_c": thin(without.temp_c), "power_w": thin(without.power_w),
                        **summary(without)},
            "with": {"die_c": thin(with_.temp_c), "power_w": thin(with_.power_w),
                     **summary(with_)}}
