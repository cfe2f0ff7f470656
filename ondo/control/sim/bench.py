"""`ondo bench governor --scenario NAME [--json]`: off, reactive and predictive in the
closed-loop simulator on the fitted H100 (`scenarios.py`).

Prints a table of each policy's figures (from WARMUP_S on), then the JSON object
{"scenario": ..., "policies": {"off": {...}, "reactive": {...}, "predictive": {...}}};
with --json only the object. A run of the full 180 s scenario takes about half a minute per
policy on one core."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ondo.control.flags import POLICIES

SCENARIO_NAMES = ("nominal", "hot-inlet", "degraded-cooling", "power-budget-450w")
# The longest simulated run: a day of traffic.
MAX_DURATION_S = 86_400.0


def format_table(report: dict) -> str:
    from ondo.control.sim.scenarios import SUMMARY_FIELDS

    cols = ("policy", *SUMMARY_FIELDS)
    lines = [f"scenario {report['scenario']}", " | ".join(cols)]
    for policy, row in report["policies"].items():
        cells = [policy]
        for k in SUMMARY_FIELDS:
            v = row[k]
            cells.append("nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from ondo.control.sim.scenarios import run_scenario, scenario

    try:
        sc = scenario(args.scenario)
    except ValueError as e:
        print(f"error: --scenario: {e}", file=sys.stderr)
        return 2
    if args.duration_s is not None:
        if not 20 < args.duration_s <= MAX_DURATION_S:
            print(f"error: --duration-s must be above 20 (the first 10 s are not scored) and "
                  f"at most {MAX_DURATION_S:g} (a simulated day), got {args.duration_s}",
                  file=sys.stderr)
            return 2
        sc = sc.shortened(args.duration_s)
    report, _ = run_scenario(sc, tuple(args.policy), seed=args.seed)
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_table(report))
    print(json.dumps(report))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("governor", help="the governor's policies in the closed-loop simulator")
    p.add_argument("--scenario", required=True, choices=SCENARIO_NAMES)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--duration-s", type=float, default=None,
                   help="shorten (or lengthen) the scenario (default 180 s)")
    p.add_argument("--seed", type=int, default=None, help="another arrival trace")
    p.add_argument("--policy", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.set_defaults(func=main)
