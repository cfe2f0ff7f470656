"""`ondo twin fit` and `ondo twin predict` (`ondo twin adapt`: adapt_cli.py)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ondo.bench.arg_types import writable_file
from ondo.cli_paths import refuse_overwriting_inputs
from ondo.twin.cli_checks import (
    check_horizon,
    check_horizon_within,
    check_score_from,
    check_score_window,
    read_trace_arg,
    refused,
    score_json,
)

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
    fit.add_argument(
        "-o", "--output", required=True, type=writable_file, help="params JSON to write"
    )
    fit.set_defaults(func=run_fit)

    pred = sub.add_parser("predict", help="forecast every row of a trace horizon-s ahead")
    pred.add_argument("--params", help="params JSON (default: the packaged H100 fit)")
    pred.add_argument("--trace", required=True)
    pred.add_argument("--horizon-s", type=float, default=10.0,
                      help="seconds ahead: above 0, at most the trace's length (default 10)")
    pred.add_argument(
        "--score-from-s",
        type=float,
        help="also print the score (JSON) of the rows from this time on, e.g. after the fit's part",
    )
    pred.add_argument("-o", "--output", required=True, type=writable_file)
    pred.set_defaults(func=run_predict)
    from ondo.twin.adapt_cli import register as register_adapt

    register_adapt(sub)
    twin.set_defaults(func=lambda args: (twin.print_help(), 2)[1])


def run_fit(args: argparse.Namespace) -> int:
    from ondo.twin.fit import fit_params

    try:
        traces, facts = _fit_inputs(args)
    except ValueError as e:
        return refused(e)
    if args.engine_load:
        return _fit_engine_load(args, traces, facts)
    params, report = fit_params(traces, facts=facts)
    try:
        params.save(args.output)
    except ValueError as e:
        return refused(unfit(args.output, e))
    print("residuals after fit:")
    for line in report.lines():
        print("  " + line)
    print(f"wrote {args.output}")
    return 0


def _fit_inputs(args: argparse.Namespace) -> tuple[list[Trace], dict | None]:
    """The traces (each cut at its --until-s) and facts to fit on; ValueError naming the
    flag where one is wrong. All is checked before the fit, which takes minutes: its result
    must not be lost to a flag, nor the fit made of something other than what was asked."""
    if args.refit_thermal and not args.engine_load:
        raise ValueError("--refit-thermal goes with --engine-load (serving traces)")
    if args.facts and args.engine_load and not args.refit_thermal:
        raise ValueError("--facts goes with the plant fit or --refit-thermal: the engine load "
                         "map alone keeps --base's thresholds and limits")
    if args.base and not args.engine_load:
        raise ValueError("--base goes with --engine-load: the plant fit starts from the "
                         "defaults")
    check_until_count(args.trace, args.until_s or [])
    facts_path, facts_flag = args.facts, "--facts"
    if facts_path is None and not args.engine_load:
        # Without --facts, the facts beside the first trace are used where there are some.
        default = Path(args.trace[0]).with_name("h100_facts.json")
        facts_path = str(default) if default.exists() else None
        facts_flag = "the facts beside the first --trace,"
    for trace in args.trace:
        refuse_overwriting_inputs("-o", args.output, {"--trace": trace})
    refuse_overwriting_inputs("-o", args.output, {facts_flag: facts_path, "--base": args.base})
    facts = read_facts(facts_path, facts_flag) if facts_path else None
    traces = [
        fit_window(read_trace_arg(path), path, until)
        for path, until in zip_longest(args.trace, args.until_s or [])
    ]
    return traces, facts


def unfit(output: str, e: ValueError) -> str:
    """Why a fit's result is not written: too few rows pin its constants (a window of
    seconds leaves the slow thermal nodes free to run off to infinity)."""
    return (f"-o {output} not written: {e}: the fit ran off, too few rows pin it; fit on "
            "more of the trace (a later --until-s, or another --trace)")


def check_until_count(traces: list[str], until_s: list[float]) -> None:
    if len(until_s) > len(traces):
        raise ValueError(
            f"{len(until_s)} --until-s for {len(traces)} --trace: give at most one per "
            "--trace, in the order of the traces"
        )


def fit_window(trace: Trace, path: str, until_s: float | None) -> Trace:
    """The part of `trace` before `until_s` (None or inf: all of it); ValueError where that
    leaves no row to fit on."""
    if until_s is None or until_s == np.inf:
        return trace
    if np.isnan(until_s):
        raise ValueError(f"--until-s nan for --trace {path}: give a time, or inf for all of it")
    window = trace.window(-np.inf, until_s)
    if len(window) == 0:
        raise ValueError(
            f"--until-s {until_s:g} leaves no row of --trace {path} to fit on (its first "
            f"row is at {float(trace.t_s[0]):g} s)"
        )
    return window


# The facts fit.apply_facts reads; a facts file holds at least one, each a number.
FACT_KEYS = (
    "thr_gpu_max",
    "thr_slowdown",
    "thr_mem_max",
    "enforced_limit_mw",
    "max_sm_clock",
    "max_mem_clock",
)


def read_facts(path: str, flag: str = "--facts") -> dict:
    """The NVML facts JSON at `path` (such as data/traces/h100_facts.json); ValueError
    "FLAG PATH: why" where it cannot be read or holds no facts."""
    try:
        facts = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: not a JSON file: {e}") from None
    if not isinstance(facts, dict) or not any(k in facts for k in FACT_KEYS):
        raise ValueError(
            f"{flag} {path}: not NVML facts (a JSON object with {', '.join(FACT_KEYS)})"
        )
    for key in FACT_KEYS:
        value = facts.get(key)
        if key in facts and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not np.isfinite(value)
        ):
            raise ValueError(f"{flag} {path}: {key} must be a number, got {json.dumps(value)}")
    return facts


def _fit_engine_load(args: argparse.Namespace, traces: list[Trace], facts: dict | None) -> int:
    from ondo.twin.engine_load import ENGINE_LOAD_NAMES, fit_engine_load, refit_thermal
    from ondo.twin.fit import SPLIT_NAMES, THERMAL_NAMES
    from ondo.twin.params import params_from

    base = params_from("--base", args.base)
    if args.refit_thermal:
        base, thermal_residuals = refit_thermal(base, traces, facts)
        print(
            "thermal refit: "
            + ", ".join(f"{n} {getattr(base, n):.4g}" for n in THERMAL_NAMES + SPLIT_NAMES)
            + f", ambient_c {base.ambient_c:.4g}"
        )
        for name, value in thermal_residuals.items():
            print(f"  {name:60s} {value:8.3f}")
    params, residuals = fit_engine_load(base, traces)
    try:
        params.save(args.output)
    except ValueError as e:
        return refused(unfit(args.output, e))
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

    try:
        check_horizon(args.horizon_s)
        check_score_from(args.score_from_s)
        refuse_overwriting_inputs("-o", args.output,
                                  {"--trace": args.trace, "--params": args.params})
        params = params_from("--params", args.params)
        trace = read_trace_arg(args.trace)
        check_horizon_within(args.horizon_s, trace.t_s, args.trace)
        check_score_window(args.score_from_s, trace.t_s, args.trace)
    except ValueError as e:
        return refused(e)
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
        print(score_json(args.horizon_s, args.score_from_s, asdict(s)))
    return 0
