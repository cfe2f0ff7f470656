"""The GPU benchmark's power-budget setting, mirrored in the closed-loop simulator (CPU only).

`bench/governor_gpu.py` holds W1 (256 requests in flight, lengths uniform in [100, 1024])
under a 500 W budget on an H200 that draws ~643 W unconstrained. This replays that setting in
virtual time so that a change of control law is judged before a GPU run
(`ondo/control/sim/h200_mirror.py` says what is mirrored and why):

- the GPU: the twin fitted on the H200 serving trace, the H100-fitted step times scaled to
  the H200's pace (`--step-time-scale`) and its engine compute gain (`--plant-gain`) so that
  W1 runs at ~21,400 tokens/s and ~645 W unconstrained, as measured;
- what the governor knows: the same fit with `--twin-gain` (a model 25 % off in the busy
  power, which the predictive policy's online calibration has to absorb);
- a server's latencies: a decision reaches the engine `--limits-delay-s` later, a step's
  sample reaches the governor `--sample-delay-s` later;
- the server process starved of CPU: stalls every `--stall-every-s` on average (0: none),
  `--stall-min-s` to `--stall-max-s` long, step samples worked off at `--catch-up` of the
  stalled time, no request admitted meanwhile (`ondo/control/sim/stalls.py`);
- the load: a closed loop of `--concurrency` requests, each finished one replaced at once.

Scored from `--settle-s` on, at the telemetry rate (20 Hz), as the GPU benchmark scores:
the share of NVML 1 s average readings over the budget, output tokens/s, mean and p99 power,
decisions. `--seeds` runs each policy once per seed of the stalls; the table shows the mean
over seeds (the largest over-budget share beside it), the JSON line every run.

    PYTHONPATH=. python3 bench/governor_sim_h200.py                  # ~15 s on one core
    PYTHONPATH=. python3 bench/governor_sim_h200.py --seconds 90 --seeds 0 1 2

Prints a table and one JSON line ({"governor_sim_h200": {...}}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

POLICIES = ("off", "reactive", "predictive")
FIELDS = ("output_tokens_per_s", "over_budget_fraction", "mean_power_w", "p99_power_w",
          "decisions")


def main(argv: list[str] | None = None) -> int:
    from ondo.control.sim.h200_mirror import MirrorSettings, run_mirror

    d = MirrorSettings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=d.trace)
    ap.add_argument("--fit-until-s", type=float, default=d.fit_until_s)
    ap.add_argument("--budget-w", type=float, default=d.budget_w)
    ap.add_argument("--seconds", type=float, default=d.seconds)
    ap.add_argument("--settle-s", type=float, default=d.settle_s)
    ap.add_argument("--step-time-scale", type=float, default=d.step_time_scale)
    ap.add_argument("--plant-gain", type=float, default=d.plant_gain)
    ap.add_argument("--twin-gain", type=float, default=d.twin_gain)
    ap.add_argument("--limits-delay-s", type=float, default=d.limits_delay_s)
    ap.add_argument("--sample-delay-s", type=float, default=d.sample_delay_s)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--stall-every-s", type=float, default=d.stall_every_s,
                    help="mean interval between server-process stalls (0: none)")
    ap.add_argument("--stall-min-s", type=float, default=d.stall_min_s)
    ap.add_argument("--stall-max-s", type=float, default=d.stall_max_s)
    ap.add_argument("--catch-up", type=float, default=d.catch_up)
    ap.add_argument("--seeds", type=int, nargs="+", default=[d.seed])
    ap.add_argument("--policy", nargs="+", default=list(POLICIES), choices=POLICIES)
    args = ap.parse_args(argv)
    if args.stall_every_s is not None and args.stall_every_s == 0:
        args.stall_every_s = None
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MirrorSettings)
              if f.name != "seed"}
    runs: dict[str, list[dict]] = {p: [] for p in args.policy}
    for seed in args.seeds:
        settings = MirrorSettings(**values, seed=seed)
        try:
            settings.check()
        except ValueError as e:
            ap.error(str(e))
        for policy in args.policy:
            runs[policy].append({"seed": seed, **run_mirror(settings, policy)[0]})
    print(" | ".join(("policy", *FIELDS, "max over_budget_fraction")))
    for policy, rows in runs.items():
        mean = {c: sum(r[c] for r in rows) / len(rows) for c in FIELDS}
        worst = max(r["over_budget_fraction"] for r in rows)
        print(" | ".join([policy, *(f"{mean[c]:.4g}" for c in FIELDS), f"{worst:.4g}"]))
    print(json.dumps({"governor_sim_h200": {"settings": values, "seeds": args.seeds,
                                            "policies": runs}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
