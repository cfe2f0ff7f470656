"""What an applied action did: the seconds before it against the seconds after it.

Measured over the console's 1 s points (`series.py`): NVML's 1 s power (mean and largest),
the die sensor's largest reading, the share of seconds with an active throttle reason
(power cap, thermal or hardware slowdown; idle and clock settings do not count), output
tokens per second, mean TTFT and TPOT of the requests finished, the largest waiting queue.
The outcome names what the action was for:

| action | outcome |
| --- | --- |
| `set_power_budget` | `power under the budget` when the largest 1 s power after it is at or under the budget (+2 %), else `power over the budget` |
| `set_temperature_target` | `die under the target` / `die over the target` (largest reading) |
| `set_governor_policy` | `throttling stopped`, `throttling reduced`, `throttling went on`, `no throttling` |
| caps | `tpot lower` / `tpot not lower` (mean TPOT after against before), `no requests to compare` |

`no telemetry` where the window after the action holds no GPU sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ondo.console.series import ConsolePoint
from ondo.telemetry.schema import ThrottleReason

ACTIVE_THROTTLE = int(ThrottleReason.SW_POWER_CAP | ThrottleReason.HW_SLOWDOWN
                      | ThrottleReason.SW_THERMAL_SLOWDOWN | ThrottleReason.HW_THERMAL_SLOWDOWN
                      | ThrottleReason.HW_POWER_BRAKE_SLOWDOWN)
BUDGET_TOLERANCE = 0.02


def window_metrics(points: Sequence[ConsolePoint]) -> dict[str, Any]:
    gpu = [p for p in points if p.gpu_samples]
    powers = [p.power_w for p in gpu if p.power_w is not None]
    peaks = [p.power_max_w for p in gpu if p.power_max_w is not None]
    temps = [p.temp_max_c for p in gpu if p.temp_max_c is not None]
    throttled = [p for p in gpu if (p.throttle_reasons or 0) & ACTIVE_THROTTLE]
    ttft_n, tpot_n = sum(p.ttft_n for p in points), sum(p.tpot_n for p in points)

    def r(x: float | None, nd: int = 2) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "seconds": len(points), "gpu_seconds": len(gpu),
        "power_mean_w": r(sum(powers) / len(powers)) if powers else None,
        "power_max_w": r(max(peaks)) if peaks else None,
        "die_max_c": r(max(temps)) if temps else None,
        "throttle_fraction": r(len(throttled) / len(gpu), 3) if gpu else None,
        "tok_s": r(sum(p.output_tokens for p in points) / len(points)) if points else None,
        "ttft_mean_s": r(sum(p.ttft_sum_s for p in points) / ttft_n, 4) if ttft_n else None,
        "tpot_mean_s": r(sum(p.tpot_sum_s for p in points) / tpot_n, 5) if tpot_n else None,
        "requests": sum(p.requests for p in points),
        "waiting_max": max((p.num_waiting for p in points if p.num_waiting is not None),
                           default=None),
    }


def judge(action: str, params: dict[str, Any], before: dict[str, Any],
          after: dict[str, Any]) -> str:
    if not after["gpu_seconds"] and action in ("set_power_budget", "set_temperature_target",
                                               "set_governor_policy"):
        return "no telemetry"
    if action == "set_power_budget":
        budget = float(params["power_budget_w"])
        ok = after["power_max_w"] is not None and \
            after["power_max_w"] <= budget * (1 + BUDGET_TOLERANCE)
        return "power under the budget" if ok else "power over the budget"
    if action == "set_temperature_target":
        ok = after["die_max_c"] is not None and after["die_max_c"] <= float(params["temp_target_c"])
        return "die under the target" if ok else "die over the target"
    if action == "set_governor_policy":
        b, a = before["throttle_fraction"] or 0.0, after["throttle_fraction"] or 0.0
        if a == 0.0:
            return "throttling stopped" if b > 0 else "no throttling"
        return "throttling reduced" if a < b else "throttling went on"
    b_tpot, a_tpot = before["tpot_mean_s"], after["tpot_mean_s"]
    if b_tpot is None or a_tpot is None:
        return "no requests to compare"
    return "tpot lower" if a_tpot < b_tpot else "tpot not lower"


def measure_outcome(action: str, params: dict[str, Any], points: Sequence[ConsolePoint],
                    applied_t_wall_s: float, window_s: float) -> tuple[str, dict[str, Any]]:
    """(outcome, metrics): the `window_s` before the action against the seconds after it."""
    before = [p for p in points if applied_t_wall_s - window_s <= p.t_wall_s + 1
              <= applied_t_wall_s]
    after = [p for p in points if applied_t_wall_s < p.t_wall_s <= applied_t_wall_s + window_s]
    b, a = window_metrics(before), window_metrics(after)
    return judge(action, params, b, a), {"window_s": window_s, "before": b, "after": a}
