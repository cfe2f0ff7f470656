"""`ondo twin adapt`: a recorded trace through the online twin, forecasts and constants out."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict

import numpy as np

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
    adapt.add_argument("--horizon-s", type=float, default=10.0)
    adapt.add_argument("-o", "--output", required=True,
                       help="PRED.csv: the columns of `ondo twin predict`, then the band")
    adapt.add_argument("--trajectory", help="CSV of the adapted constants over time")
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
    from ondo.events.trace_input import TraceError, read_trace_records
    from ondo.twin.adapt_replay import forecast_rows, run_trace, score
    from ondo.twin.params import params_from

    if not (math.isfinite(args.horizon_s) and args.horizon_s > 0):
        print(f"--horizon-s must be a positive number of seconds, got {args.horizon_s}",
              file=sys.stderr)
        return 2
    try:
        params = params_from("--params", args.params)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        records = read_trace_records(args.trace)
        run = run_trace(records, params)
    except (TraceError, ValueError) as e:
        print(f"--trace: {e}", file=sys.stderr)
        return 2
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
        print(json.dumps({"horizon_s": args.horizon_s, "from_s": args.score_from_s, **asdict(s)}))
    return 0


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
    import os
    import time

    from ondo.twin.store_tables import constants_history, drift, gpu_uuids

    if not os.path.exists(args.db):
        print(f"--db {args.db}: no such file", file=sys.stderr)
        return 2
    uuids = [args.gpu] if args.gpu else gpu_uuids(args.db)
    out = {}
    for uuid in uuids:
        rows = constants_history(args.db, uuid)
        if not rows:
            print(f"{uuid}: nothing saved", file=sys.stderr)
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
    print(json.dumps(out))
    return 0 if out else 1
