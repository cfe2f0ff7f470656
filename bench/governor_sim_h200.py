"""The GPU benchmark's power-budget setting, mirrored in the closed-loop simulator (CPU only).

`bench/governor_gpu.py` holds W1 (256 requests in flight, lengths uniform in [100, 1024])
under a 500 W budget on an H200 that draws ~643 W unconstrained. This replays that setting in
virtual time so a change of control law can be judged before a GPU run:

- the GPU: the twin fitted on the H200 serving trace (as `--fit-twin-on` fits it), its engine
  compute gain scaled by `--plant-gain` (0.6: W1 at full load then draws ~643 W, p99 ~660 W,
  as measured; the step-time model is the H100's, whose steps load the plant harder);
- what the governor knows: the same fit scaled by `--twin-gain` (0.75: a model 25 % off in
  the busy power, which the predictive policy's online calibration has to absorb);
- a server's latencies: a decision reaches the engine `--limits-delay-s` later, a step's
  sample reaches the governor `--sample-delay-s` later;
- the load: a closed loop of `--concurrency` requests, each finished one replaced at once.

Scored from `--settle-s` on, at the telemetry rate (20 Hz), as the GPU benchmark scores:
the share of NVML 1 s average readings over the budget, output tokens/s, mean and p99 power,
decisions.

    PYTHONPATH=. python3 bench/governor_sim_h200.py            # ~1 min on one core

Prints a table and one JSON line ({"governor_sim_h200": {...}}).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv")
    ap.add_argument("--fit-until-s", type=float, default=60.0)
    ap.add_argument("--budget-w", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--plant-gain", type=float, default=0.6)
    ap.add_argument("--twin-gain", type=float, default=0.75)
    ap.add_argument("--limits-delay-s", type=float, default=0.1)
    ap.add_argument("--sample-delay-s", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--policy", nargs="+", default=["off", "reactive", "predictive"],
                    choices=("off", "reactive", "predictive"))
    args = ap.parse_args(argv)
    if not args.seconds > args.settle_s:
        ap.error("--seconds must be larger than --settle-s")
    if min(args.plant_gain, args.twin_gain) <= 0:
        ap.error("--plant-gain and --twin-gain must be > 0")

    import numpy as np

    from ondo.control.objectives import GpuFacts, resolve_objectives
    from ondo.control.sim.arrivals import BurstyArrivals
    from ondo.control.sim.calibration import h100_step_time
    from ondo.control.sim.scenarios import qwen3_06b_cost_shape
    from ondo.control.sim.simulator import ClosedLoopSimulator, SimConfig
    from ondo.twin.engine_load import fit_engine_load, refit_thermal
    from ondo.twin.params import h100_params
    from ondo.twin.plant import Load
    from ondo.twin.traces import read_trace

    trace = read_trace(args.trace).window(float("-inf"), args.fit_until_s)
    fitted, _ = refit_thermal(h100_params(), [trace])
    fitted, _ = fit_engine_load(fitted, [trace])
    gain = fitted.engine_compute_gain
    plant = fitted.replace(engine_compute_gain=gain * args.plant_gain)
    twin = fitted.replace(engine_compute_gain=gain * args.twin_gain)
    objectives = resolve_objectives(GpuFacts.from_params(twin), power_budget_w=args.budget_w)
    # W1's lengths; the arrival times are not used in a closed loop.
    requests = BurstyArrivals(1.0, 1.0, 1.0, 1.0, seed=0).trace(4000.0)
    rows = {}
    for policy in args.policy:
        config = SimConfig(qwen3_06b_cost_shape(), h100_step_time(), plant, twin_params=twin,
                           initial_load=Load(0.5, 0.6), limits_delay_s=args.limits_delay_s,
                           engine_sample_delay_s=args.sample_delay_s)
        sim = ClosedLoopSimulator(config, requests, policy, objectives,
                                  concurrency=args.concurrency)
        t0 = time.monotonic()
        result = sim.run(args.seconds)
        s = result.series
        keep = s["t_s"] >= args.settle_s
        power = s["power_w"][keep]
        tokens = s["output_tokens"][keep]
        rows[policy] = {
            "output_tokens_per_s": float(tokens[-1] - tokens[0]) / (args.seconds - args.settle_s),
            "over_budget_fraction": float(np.mean(power > args.budget_w)),
            "mean_power_w": float(power.mean()),
            "p99_power_w": float(np.percentile(power, 99)),
            "decisions": sum(d.t_monotonic_s >= args.settle_s for d in result.decisions),
            "cpu_s": time.monotonic() - t0,
        }
    cols = ("output_tokens_per_s", "over_budget_fraction", "mean_power_w", "p99_power_w",
            "decisions")
    print(" | ".join(("policy", *cols)))
    for policy, row in rows.items():
        print(" | ".join([policy, *(f"{row[c]:.4g}" for c in cols)]))
    settings = {k: v for k, v in vars(args).items() if k != "policy"}
    print(json.dumps({"governor_sim_h200": {"settings": settings, "policies": rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
