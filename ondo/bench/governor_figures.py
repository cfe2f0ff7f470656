"""The governor GPU benchmark's figures, from what one run recorded (pure: no I/O).

- `summarize`: one setting's window: output tokens/s, the share of NVML 1 s average
  readings over the budget, mean and p99 power, GPU joules per output token, and how late
  the telemetry was: the poller's lateness against its schedule (`poll_lags`) and the age
  of the newest GPU reading and engine step at each of the governor's ticks;
- `overhead_estimate`: the governor's cost from ABBA rounds (off, predictive, predictive,
  off), each round's estimate drift-free to first order, with the standard error over
  rounds and the spread between a round's two off runs (the run-to-run noise);
- `series_rows`: a run's time series for `--series-out`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_POLL_LAG_S = 1.0  # the poller skips its schedule ahead past this (telemetry/polling.py)


@dataclass(frozen=True)
class GpuPoint:
    """One GPU reading as the benchmark keeps it."""

    t_s: float  # read time, monotonic
    power_w: float | None  # NVML's 1 s average
    energy_j: float | None
    power_instant_w: float | None
    read_latency_s: float | None


@dataclass(frozen=True)
class TickAges:
    """How old the governor's newest inputs were at one tick."""

    t_s: float
    gpu_sample_age_s: float | None
    engine_sample_age_s: float | None


def poll_lags(times_s: Sequence[float], period_s: float,
              max_lag_s: float = MAX_POLL_LAG_S) -> list[float]:
    """How late each reading was against the poller's deadline schedule, from the read
    times alone: read k is due a period after read k-1 was, so its lateness is
    L_k = max(0, L_{k-1} + (t_k - t_{k-1}) - period) (Lindley's recursion); past
    `max_lag_s` the poller skips whole periods, which the recursion follows."""
    lags: list[float] = []
    carry = 0.0
    for k, t in enumerate(times_s):
        lag = 0.0 if k == 0 else max(0.0, carry + (t - times_s[k - 1]) - period_s)
        lags.append(lag)
        carry = lag if lag <= max_lag_s else lag - math.floor(lag / period_s) * period_s
    return lags


def _pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank), nan for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100.0 * (len(s) - 1) + 0.5))]


def summarize(setting: dict[str, Any], start_s: float, end_s: float, tokens: int,
              gpu: Sequence[GpuPoint], ticks: Sequence[TickAges], budget_w: float,
              poll_period_s: float) -> dict[str, Any]:
    """One setting's figures over [start_s, end_s] (`tokens`: output tokens in it)."""
    inside = [g for g in gpu if start_s <= g.t_s <= end_s]
    powers = [g.power_w for g in inside if g.power_w is not None]
    energy = [(g.t_s, g.energy_j) for g in inside if g.energy_j is not None]
    span = end_s - start_s
    joules = energy[-1][1] - energy[0][1] if len(energy) > 1 else float("nan")
    covered = energy[-1][0] - energy[0][0] if len(energy) > 1 else float("nan")
    joules_run = joules * span / covered if covered and covered > 0 else float("nan")
    lags = poll_lags([g.t_s for g in inside], poll_period_s)
    ticks_in = [a for a in ticks if start_s <= a.t_s <= end_s]
    gpu_ages = [a.gpu_sample_age_s for a in ticks_in if a.gpu_sample_age_s is not None]
    engine_ages = [a.engine_sample_age_s for a in ticks_in if a.engine_sample_age_s is not None]
    return {
        **setting,
        "seconds": round(span, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / span if span > 0 else float("nan"),
        "over_budget_fraction": (sum(p > budget_w for p in powers) / len(powers)
                                 if powers else float("nan")),
        "mean_power_w": sum(powers) / len(powers) if powers else float("nan"),
        "p99_power_w": _pct(powers, 99),
        "joules_per_output_token": joules_run / tokens if tokens else float("nan"),
        "output_tokens_per_joule": tokens / joules_run if joules_run and joules_run > 0
        else float("nan"),
        "gpu_samples": len(inside),
        "expected_gpu_samples": int(span / poll_period_s),
        "poll_lag_p99_s": _pct(lags, 99),
        "poll_lag_max_s": max(lags, default=float("nan")),
        "sample_age_p99_s": _pct(gpu_ages, 99),
        "sample_age_max_s": max(gpu_ages, default=float("nan")),
        "engine_age_p99_s": _pct(engine_ages, 99),
        "ticks": len(ticks_in),
    }


def overhead_estimate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The governor's cost from ABBA rounds (each run with its "round" and "policy"):
    per round 1 - (P1 + P2) / (O1 + O2), which a drift linear over the round cancels;
    their mean, its standard error over rounds (nan with one), and the mean relative gap
    between a round's two off runs (what the same setting differs by from run to run,
    drift included: the scale on which the cost is read)."""
    by_round: dict[Any, list[dict[str, Any]]] = {}
    for r in runs:
        by_round.setdefault(r.get("round"), []).append(r)
    per_round, off_gaps = [], []
    for rows in by_round.values():
        off = [r["output_tokens_per_s"] for r in rows if r["policy"] == "off"]
        on = [r["output_tokens_per_s"] for r in rows if r["policy"] == "predictive"]
        if not off or not on:
            continue
        per_round.append(1.0 - (sum(on) / len(on)) / (sum(off) / len(off)))
        if len(off) == 2:
            off_gaps.append(abs(off[0] - off[1]) / (0.5 * (off[0] + off[1])))
    k = len(per_round)
    return {
        "overhead_fraction": statistics.fmean(per_round) if k else float("nan"),
        "overhead_se": statistics.stdev(per_round) / math.sqrt(k) if k > 1 else float("nan"),
        "overhead_by_round": per_round,
        "off_to_off_fraction": statistics.fmean(off_gaps) if off_gaps else float("nan"),
        "rounds": k,
    }


def compact(limits: dict | None) -> dict | None:
    """The limits that bind (not None, a duty cycle under 1)."""
    if limits is None:
        return None
    return {k: v for k, v in limits.items()
            if v is not None and not (k == "duty_cycle" and v >= 1.0)}


def series_rows(setting: dict[str, Any], gpu: Sequence[GpuPoint],
                limits: Sequence[tuple[float, dict]], decisions: Sequence[Any],
                start_s: float, end_s: float, poll_period_s: float) -> list[dict[str, Any]]:
    """One run's time series: each GPU reading (NVML's 1 s average and fast power, how
    late the poller read it, how long the read took, the limits in force) and each
    decision (reason, limits, forecast, and the age of the inputs it was made on)."""
    rows: list[dict[str, Any]] = []
    applied = [(t, lim) for t, lim in limits if t <= end_s]
    inside = [g for g in gpu if start_s <= g.t_s <= end_s]
    lags = poll_lags([g.t_s for g in inside], poll_period_s)
    k, current = 0, None
    for g, lag in zip(inside, lags):
        while k < len(applied) and applied[k][0] <= g.t_s:
            current = applied[k][1]
            k += 1
        rows.append({"group": setting["group"], "policy": setting["policy"],
                     "t_s": round(g.t_s - start_s, 3), "power_w": g.power_w,
                     "power_instant_w": g.power_instant_w, "poll_lag_s": round(lag, 4),
                     "read_latency_s": g.read_latency_s, "limits": compact(current)})
    for d in decisions:
        if start_s <= d.t_monotonic_s <= end_s:
            rows.append({"group": setting["group"], "policy": setting["policy"],
                         "t_s": round(d.t_monotonic_s - start_s, 3), "decision": d.reason,
                         "limits": compact(d.limits), "forecast": d.forecast,
                         "gpu_sample_age_s": d.inputs.get("gpu_sample_age_s"),
                         "engine_sample_age_s": d.inputs.get("engine_sample_age_s"),
                         "power_w": d.inputs.get("power_w")})
    return sorted(rows, key=lambda r: r["t_s"])
