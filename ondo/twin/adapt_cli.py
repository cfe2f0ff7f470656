"""`ondo twin adapt`: a recorded trace through the online twin, forecasts and constants out."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from ondo.bench.arg_types import writable_file
from ondo.cli_paths import refuse_overwriting_inputs
from ondo.twin.cli_checks import (
    check_horizon,
    check_horizon_within,
    check_score_from,
    check_score_window,
    refused,
    score_json,
)

if TYPE_CHECKING:
    from ondo.events.trace_input import TraceRecords
    from ondo.twin.params import TwinParams

PRED_COLUMNS = ("t", "temp_c_pred", "mem_temp_c_pred", "power_w_pred", "sm_mhz_pred",
                "power_cap_pred", "thermal_slowdown_pred")
BAND_COLUMNS = ("temp_c_lo", "temp_c_hi", "mem_temp_c_lo", "mem_temp_c_hi",
                "throttle_probability")


def register(sub) -> None:
    adapt = sub.add_parser(
        "adapt", help="replay a trace through the online twin: it adapts its constants as it "
        "goes; write each row's forecast made horizon-s earlier, with its band")
    adapt.add_argument("--trace", required=True,
                       help="trace CSV: an NVML trace or a serving trace (kind gpu/engine rows)")
    adapt.add_argument("--params", help="params JSON to start from (default: the packaged "
                       "H100 fit)")
    adapt.add_argument("--horizon-s", type=float, default=10.0,
                       help="seconds ahead: above 0, at most the trace's length (default 10)")
    adapt.add_argument("-o", "--output", required=True, type=writable_file,
                       help="PRED.csv: the columns of `ondo twin predict`, then the band")
    adapt.add_argument("--trajectory", type=writable_file,
                       help="CSV of the adapted constants over time")
    adapt.add_argument("--score-from-s", type=float,
                       help="also print the score (JSON) of the rows from this time on")
    adapt.set_defaults(func=run_adapt)

    hist = sub.add_parser(
        "history", help="the adapted constants saved per GPU in a telemetry database, over "
        "time, and how far each has moved from its first saved value")
    hist.add_argument("--db", required=True, help="telemetry database (--telemetry-db)")
    hist.add_argument("--gpu", help="NVML UUID (default: every GPU in the database)")
    hist.set_defaults(func=run_history)


def run_adapt(args: argparse.Namespace) -> int:
    from ondo.twin.adapt_replay import forecast_rows, run_trace, score

    try:
        params, records = _adapt_inputs(args)
    except ValueError as e:
        return refused(e)
    try:
        run = run_trace(records, params)
    except ValueError as e:  # no GPU row it could start from
        return refused(f"--trace: {e}")
    fc = forecast_rows(run, args.horizon_s)
    write_predictions(args.output, run, fc)
    print(f"wrote {len(fc.t_s)} rows to {args.output}", file=sys.stderr)
    if args.trajectory:
        write_trajectory(args.trajectory, run)
        print(f"wrote the constants over time to {args.trajectory}", file=sys.stderr)
    twin = run.twin
    print(json.dumps({"rejected": twin.rejected(), "resyncs": twin.resyncs,
                      "samples": twin.samples, "teachings": twin.teacher.teachings}),
          file=sys.stderr)
    if args.score_from_s is not None:
        s = score(run, fc, args.score_from_s)
        if s.rows == 0:  # every row after the first lacked the readings the twin takes
            return refused(f"--score-from-s {args.score_from_s:g}: no row of --trace "
                           f"{args.trace} the twin took to score")
        print(score_json(args.horizon_s, args.score_from_s, asdict(s)))
    return 0


def _adapt_inputs(args: argparse.Namespace) -> tuple[TwinParams, TraceRecords]:
    """The params and trace records to run, the flags checked against them; ValueError
    naming the flag where one is wrong, before anything is run or written."""
    from ondo.events.trace_input import read_trace_records
    from ondo.telemetry.schema import GpuSample
    from ondo.twin.params import params_from

    check_horizon(args.horizon_s)
    check_score_from(args.score_from_s)
    inputs = {"--trace": args.trace, "--params": args.params}
    refuse_overwriting_inputs("-o", args.output, inputs)
    if args.trajectory:
        refuse_overwriting_inputs("--trajectory", args.trajectory,
                                  {**inputs, "-o": args.output})
    params = params_from("--params", args.params)
    try:
        records = read_trace_records(args.trace)
    except ValueError as e:  # TraceError: "PATH: line N: why"
        raise ValueError(f"--trace: {e}") from None
    # Trace time, as --score-from-s reads it: seconds after the first GPU row.
    t_s = np.array([r.t_monotonic_s for r in records.records if isinstance(r, GpuSample)])
    if len(t_s):  # else run_trace says there is no GPU row
        check_horizon_within(args.horizon_s, t_s, args.trace)
        # The first row is forecast from itself, so is never scored.
        check_score_window(args.score_from_s, t_s[1:] - t_s[0], args.trace)
    return params, records


def write_predictions(path: str, run, fc) -> None:
    t = fc.t_s - run.t0_s
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PRED_COLUMNS + BAND_COLUMNS)
        for i in range(len(t)):
            d, h = fc.temp_c_pred[i], fc.mem_temp_c_pred[i]
            db, hb = fc.temp_c_band[i], fc.mem_temp_c_band[i]
            w.writerow([f"{t[i]:.4f}", f"{d:.2f}", f"{h:.2f}", f"{fc.power_w_pred[i]:.1f}",
                        f"{fc.sm_mhz_pred[i]:.0f}", int(fc.power_cap_pred[i]),
                        int(fc.thermal_slowdown_pred[i]), f"{d - db:.2f}", f"{d + db:.2f}",
                        f"{h - hb:.2f}", f"{h + hb:.2f}", f"{fc.throttle_probability[i]:.4f}"])


def trajectory_rows(run) -> tuple[list[str], list[list[str]]]:
    """The adapted constants after each row, in their own units, with standard deviations
    (for those the twin holds as logs: the value times the log's standard deviation)."""
    from ondo.twin.adapt_params import BOUNDS
    from ondo.twin.state_filter import I_INLET, N_X

    header = ["t", "excited", "inlet_c"] + [b.name for b in BOUNDS] + [
        f"{b.name}_std" for b in BOUNDS]
    theta = run.z[:, N_X:]
    var = run.theta_var
    rows = []
    for i in range(len(run.t_s)):
        values, stds = [], []
        for j, b in enumerate(BOUNDS):
            v = float(np.exp(theta[i, j]) if b.log else theta[i, j])
            sd = float(np.sqrt(max(var[i, j], 0.0)))
            values.append(f"{v:.6g}")
            stds.append(f"{v * sd if b.log else sd:.4g}")
        rows.append([f"{run.t_s[i] - run.t0_s:.4f}", str(int(run.excited[i])),
                     f"{run.z[i, I_INLET]:.3f}"] + values + stds)
    return header, rows


def write_trajectory(path: str, run) -> None:
    header, rows = trajectory_rows(run)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


HISTORY_SHOWN = ("die_sink_c_per_w", "board_amb_c_per_w", "board_c_j_per_c", "idle_power_w",
                 "compute_w", "memory_w")


def run_history(args: argparse.Namespace) -> int:
    import time

    from ondo.twin.store_tables import constants_history, drift

    try:
        uuids = _history_gpus(args.db, args.gpu)
    except ValueError as e:
        return refused(e)
    out = {}
    for uuid in uuids:
        rows = constants_history(args.db, uuid)
        if not rows:
            print(f"{uuid}: none of its saved constants are this twin's (saved by another "
                  "version)", file=sys.stderr)
            continue
        print(f"{uuid} ({rows[-1].gpu_name}), {len(rows)} saved, from {rows[0].base}")
        print("  " + f"{'saved at':19} {'inlet_c':>8} " + " ".join(f"{n:>18}"
                                                                   for n in HISTORY_SHOWN))
        for r in rows:
            v = r.values()
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.t_wall_s))
            print(f"  {when:19} {r.inlet_c:8.2f} " + " ".join(f"{v[n]:18.5g}"
                                                              for n in HISTORY_SHOWN))
        ratios = drift(rows)
        print("  latest / first: " + ", ".join(f"{n} {ratios[n]:.3f}" for n in HISTORY_SHOWN))
        out[uuid] = {"saved": len(rows), "latest": rows[-1].values(), "drift": ratios}
    if not out:
        return refused(f"--db {args.db}: no constants this version of the twin can read")
    print(json.dumps(out))
    return 0


def _history_gpus(db: str, gpu: str | None) -> list[str]:
    """The GPUs to show: `gpu`, or every one with constants saved in `db`. A database with
    none is refused (exit 2) as much as a file that is none: either way there is no history
    to show, and an empty answer would read as a GPU that never drifted. sqlite3.Error
    where the file is not a database."""
    import os

    from ondo.twin.store_tables import saved_gpu_uuids

    if os.path.isdir(db):
        raise ValueError(f"--db {db}: is a folder, not a database")
    if not os.path.exists(db):
        raise ValueError(f"--db {db}: no such database")
    saved = saved_gpu_uuids(db)
    if not saved:
        raise ValueError(f"--db {db}: no twin constants saved in it (`ondo serve "
                         "--telemetry-db FILE` saves them there as its live twin adapts)")
    if gpu is not None and gpu not in saved:
        raise ValueError(f"--gpu {gpu}: no constants saved for it in --db {db} (saved: "
                         f"{', '.join(saved)})")
    return [gpu] if gpu is not None else saved
