"""`ondo twin fit` and `ondo twin predict` (`ondo twin adapt`: adapt_cli.py)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ondo.twin.traces import Trace


def register(subparsers) -> None:
    twin = subparsers.add_parser("twin", help="GPU digital twin: fit to NVML traces, predict")
    sub = twin.add_subparsers(dest="twin_command", metavar="SUBCOMMAND")

    fit = sub.add_parser("fit", help="identify twin parameters from NVML trace CSVs")
    fit.add_argument(
        "--trace", action="append", required=True, help="trace CSV; repeat for several"
    )
    fit.add_argument(
        "--until-s",
        type=float,
        action="append",
        help="use each trace only before this time, one per --trace in order (inf: all of it)",
    )
    fit.add_argument(
        "--facts",
        help="NVML facts JSON (thresholds, limits); default: facts next to the first trace",
    )
    fit.add_argument(
        "--engine-load",
        action="store_true",
        help="fit only the map from the engine's load descriptor to the plant's load, on "
        "serving traces (kind gpu/engine rows); every other constant comes from --base",
    )
    fit.add_argument(
        "--refit-thermal",
        action="store_true",
        help="with --engine-load: first refit the thermal constants (capacitances, "
        "resistances, sensor lags, HBM heat split, inlet) on the same traces and window, "
        "driven by their measured power, then fit the map; for a GPU other than the base's. "
        "--facts, if given, sets the thresholds and limits",
    )
    fit.add_argument(
        "--base", help="params JSON for --engine-load (default: the packaged H100 fit)"
    )
    fit.add_argument("-o", "--output", required=True, help="params JSON to write")
    fit.set_defaults(func=run_fit)

    pred = sub.add_parser("predict", help="forecast every row of a trace horizon-s ahead")
    pred.add_argument("--params", help="params JSON (default: the packaged H100 fit)")
    pred.add_argument("--trace", required=True)
    pred.add_argument("--horizon-s", type=float, default=10.0)
    pred.add_argument(
        "--score-from-s",
        type=float,
        help="also print the score (JSON) of the rows from this time on, e.g. after the fit's part",
    )
    pred.add_argument("-o", "--output", required=True)
    pred.set_defaults(func=run_predict)
    from ondo.twin.adapt_cli import register as register_adapt

    register_adapt(sub)
    twin.set_defaults(func=lambda args: (twin.print_help(), 2)[1])


def run_fit(args: argparse.Namespace) -> int:
    from ondo.twin.fit import fit_params
    from ondo.twin.traces import read_trace

    if args.refit_thermal and not args.engine_load:
        print("--refit-thermal goes with --engine-load (serving traces)", file=sys.stderr)
        return 2
    traces = [read_trace(p) for p in args.trace]
    for i, until in enumerate(args.until_s or []):
        if until is not None and np.isfinite(until):
            traces[i] = traces[i].window(-np.inf, until)
    if args.engine_load:
        return _fit_engine_load(args, traces)
    facts_path = (
        Path(args.facts) if args.facts else Path(args.trace[0]).with_name("h100_facts.json")
    )
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else None
    params, report = fit_params(traces, facts=facts)
    params.save(args.output)
    print("residuals after fit:")
    for line in report.lines():
        print("  " + line)
    print(f"wrote {args.output}")
    return 0


def _fit_engine_load(args: argparse.Namespace, traces: list[Trace]) -> int:
    from ondo.twin.engine_load import ENGINE_LOAD_NAMES, fit_engine_load, refit_thermal
    from ondo.twin.fit import SPLIT_NAMES, THERMAL_NAMES
    from ondo.twin.params import params_from

    base = params_from("--base", args.base)
    if args.refit_thermal:
        facts = json.loads(Path(args.facts).read_text()) if args.facts else None
        base, thermal_residuals = refit_thermal(base, traces, facts)
        print(
            "thermal refit: "
            + ", ".join(f"{n} {getattr(base, n):.4g}" for n in THERMAL_NAMES + SPLIT_NAMES)
            + f", ambient_c {base.ambient_c:.4g}"
        )
        for name, value in thermal_residuals.items():
            print(f"  {name:60s} {value:8.3f}")
    params, residuals = fit_engine_load(base, traces)
    params.save(args.output)
    print(
        "engine load map: " + ", ".join(f"{n} {getattr(params, n):.4g}" for n in ENGINE_LOAD_NAMES)
    )
    print("residuals after fit:")
    for name, value in residuals.items():
        print(f"  {name:60s} {value:8.3f}")
    print(f"wrote {args.output}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ondo.twin.params import params_from
    from ondo.twin.replay import replay, score
    from ondo.twin.traces import read_trace

    params = params_from("--params", args.params)
    trace = read_trace(args.trace)
    rep = replay(params, trace, args.horizon_s)
    with open(args.output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "t",
                "temp_c_pred",
                "mem_temp_c_pred",
                "power_w_pred",
                "sm_mhz_pred",
                "power_cap_pred",
                "thermal_slowdown_pred",
            ]
        )
        for row in zip(
            rep.t_s,
            rep.temp_c_pred,
            rep.mem_temp_c_pred,
            rep.power_w_pred,
            rep.sm_mhz_pred,
            rep.power_cap_pred,
            rep.thermal_slowdown_pred,
            strict=True,
        ):
            t, temp, mem, pw, f_mhz, cap, slow = row
            w.writerow(
                [
                    f"{t:.4f}",
                    f"{temp:.2f}",
                    f"{mem:.2f}",
                    f"{pw:.1f}",
                    f"{f_mhz:.0f}",
                    int(cap),
                    int(slow),
                ]
            )
    print(f"wrote {len(rep.t_s)} rows to {args.output}", file=sys.stderr)
    if args.score_from_s is not None:
        s = score(rep, trace, start_s=args.score_from_s)
        print(json.dumps({"horizon_s": args.horizon_s, "from_s": args.score_from_s, **asdict(s)}))
    return 0
