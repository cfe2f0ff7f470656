"""The GPU benchmark's power-budget setting, mirrored in the closed-loop simulator (CPU only).

`bench/governor_gpu.py` holds W1 (256 requests in flight, lengths uniform in [100, 1024])
under a 500 W budget on an H200 that draws ~643 W unconstrained. This replays that setting in
virtual time so a change of control law can be judged before a GPU run
(`ondo/control/sim/h200_mirror.py` says what is mirrored and how):

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

    PYTHONPATH=. python3 bench/governor_sim_h200.py            # ~10 s on one core

Prints a table and one JSON line ({"governor_sim_h200": {...}}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from ondo.control.sim.h200_mirror import MirrorSettings, run_mirror

    d = MirrorSettings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=d.trace)
    ap.add_argument("--fit-until-s", type=float, default=d.fit_until_s)
    ap.add_argument("--budget-w", type=float, default=d.budget_w)
    ap.add_argument("--seconds", type=float, default=d.seconds)
    ap.add_argument("--settle-s", type=float, default=d.settle_s)
    ap.add_argument("--plant-gain", type=float, default=d.plant_gain)
    ap.add_argument("--twin-gain", type=float, default=d.twin_gain)
    ap.add_argument("--limits-delay-s", type=float, default=d.limits_delay_s)
    ap.add_argument("--sample-delay-s", type=float, default=d.sample_delay_s)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--policy", nargs="+", default=["off", "reactive", "predictive"],
                    choices=("off", "reactive", "predictive"))
    args = ap.parse_args(argv)
    settings = MirrorSettings(**{f.name: getattr(args, f.name)
                                 for f in dataclasses.fields(MirrorSettings)})
    try:
        settings.check()
    except ValueError as e:
        ap.error(str(e))
    rows = {policy: run_mirror(settings, policy)[0] for policy in args.policy}
    cols = ("output_tokens_per_s", "over_budget_fraction", "mean_power_w", "p99_power_w",
            "decisions")
    print(" | ".join(("policy", *cols)))
    for policy, row in rows.items():
        print(" | ".join([policy, *(f"{row[c]:.4g}" for c in cols)]))
    print(json.dumps({"governor_sim_h200": {"settings": dataclasses.asdict(settings),
                                            "policies": rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
