"""CPU time of one governor tick, as the governor's thread in `ondo serve` spends it: the
inputs gathered from the trackers (`InputTracker.inputs`) and the policy's decision
(`Governor.tick`), timed in thread CPU time on the H200 mirror's closed loop
(`ondo/control/sim/h200_mirror.py`: W1, 256 requests in flight) for three settings:

- `free`: predictive with nothing binding (no budget, the default temperature targets);
- `budget`: predictive holding the 500 W budget (the planning runs);
- `reactive`: the baseline holding the same budget.

    PYTHONPATH=. python3 bench/governor_tick_cost.py [--seconds 30]

Prints a table (per tick: mean, median, p99 in µs; the share of one core: CPU time over the
scored span, at whatever rate the policy ticks) and one JSON line
({"governor_tick_cost": {...}}).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SETTINGS = (("free", "predictive", None), ("budget", "predictive", 500.0),
            ("reactive", "reactive", 500.0))


def timed(costs: list[float], fn):
    def wrapper(*args, **kwargs):
        t = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            costs.append((time.thread_time_ns() - t) * 1e-9)
    return wrapper


def timed_tick(costs: list[tuple[float, float]], fn):
    """`Governor.tick(inputs)`, its CPU time with the virtual time it ticked at."""
    def wrapper(inputs):
        t = time.thread_time_ns()
        try:
            return fn(inputs)
        finally:
            costs.append((inputs.t_monotonic_s, (time.thread_time_ns() - t) * 1e-9))
    return wrapper


def measure(policy: str, budget_w: float | None, seconds: float) -> dict[str, float]:
    import numpy as np

    from ondo.control.sim.h200_mirror import MirrorSettings, mirror_simulator, score

    settings = MirrorSettings(budget_w=budget_w, seconds=seconds)
    sim = mirror_simulator(settings, policy)
    ticks: list[tuple[float, float]] = []
    gathers: list[float] = []
    sim.governor.tick = timed_tick(ticks, sim.governor.tick)  # type: ignore[method-assign]
    sim.inputs.inputs = timed(gathers, sim.inputs.inputs)  # type: ignore[method-assign]
    result = sim.run(seconds)
    keep = np.array([t >= settings.settle_s for t, _ in ticks])  # after the start-up
    tick_s = np.array([c for _, c in ticks])[keep]
    total = tick_s + np.array(gathers)[keep]
    return {
        "ticks": int(len(total)),
        "tick_mean_us": float(tick_s.mean() * 1e6),
        "inputs_mean_us": float(np.array(gathers)[keep].mean() * 1e6),
        "mean_us": float(total.mean() * 1e6),
        "median_us": float(np.median(total) * 1e6),
        "p99_us": float(np.percentile(total, 99) * 1e6),
        "core_pct": float(total.sum() / (seconds - settings.settle_s) * 100),
        "decisions": score(settings, result)["decisions"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="virtual seconds per setting")
    args = ap.parse_args(argv)
    if args.seconds <= 10.0:
        ap.error("--seconds must be > 10 (the first 5 s are the policy's start-up)")
    rows = {name: measure(policy, budget, args.seconds) for name, policy, budget in SETTINGS}
    cols = ("ticks", "tick_mean_us", "inputs_mean_us", "mean_us", "median_us", "p99_us",
            "core_pct", "decisions")
    print(" | ".join(("setting", *cols)))
    for name, row in rows.items():
        print(" | ".join([name, *(f"{row[c]:.4g}" for c in cols)]))
    print(json.dumps({"governor_tick_cost": {"seconds": args.seconds, "settings": rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
