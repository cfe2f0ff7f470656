"""`ondo telemetry record` and `ondo telemetry export`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable

from ondo.cli_paths import refuse_overwriting_inputs
from ondo.telemetry.export import read_rows, write_csv, write_parquet
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.pipeline import open_gpu_source
from ondo.telemetry.replay import ReplaySource
from ondo.telemetry.schema import IDLE_LOAD, LoadDescriptor
from ondo.telemetry.store import TelemetryStore

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("telemetry", help="record and export GPU and engine telemetry")
    sub = p.add_subparsers(dest="telemetry_command", metavar="ACTION")

    rec = sub.add_parser("record", help="record a GPU source into a SQLite database")
    rec.add_argument("--source", choices=("nvml", "sim", "replay"), default="nvml",
                     help="nvml falls back to sim when NVML or a GPU is missing")
    rec.add_argument("--trace", help="CSV trace for --source replay")
    rec.add_argument("--hz", type=float, default=20.0, help="sampling rate, at most 100")
    rec.add_argument("--seconds", type=float, default=None,
                     help="how long to record (default 10; replay: the whole trace)")
    rec.add_argument("--speed", type=float, default=1.0,
                     help="replay speed factor; 0 or inf: as fast as possible")
    rec.add_argument("--sim-load", default="step",
                     help="simulated load: idle, step (10 s full compute / 10 s idle) or C,M")
    rec.add_argument("--raw-retention-s", type=float, default=600.0,
                     help="keep raw samples this long, then 1 s aggregates")
    rec.add_argument("--db", required=True, help="SQLite database file")
    rec.set_defaults(func=record)

    exp = sub.add_parser("export", help="export a telemetry database as CSV or Parquet")
    exp.add_argument("--db", required=True)
    exp.add_argument("--format", choices=("csv", "parquet"), default="csv")
    exp.add_argument("--table", choices=("raw", "1s"), default="raw",
                     help="raw samples and engine steps, or the 1 s aggregates")
    exp.add_argument("-o", "--output", required=True)
    exp.set_defaults(func=export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def sim_load_profile(spec: str) -> Callable[[], LoadDescriptor]:
    if spec == "idle":
        return lambda: IDLE_LOAD
    if spec == "step":
        t0 = time.monotonic()
        return lambda: LoadDescriptor(1.0, 0.3) if (time.monotonic() - t0) % 20 < 10 else IDLE_LOAD
    try:
        compute, memory = (float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--sim-load {spec!r}: expected idle, step or C,M (two numbers)") from None
    if not (0.0 <= compute <= 1.0 and 0.0 <= memory <= 1.0):  # nan fails both
        raise ValueError(f"--sim-load {spec!r}: C and M are utilizations, each in [0, 1]")
    load = LoadDescriptor(compute, memory)
    return lambda: load


def record(args: argparse.Namespace) -> int:
    # Every flag is checked before the database is created or touched.
    if args.seconds is not None and not args.seconds >= 0:
        raise ValueError(f"--seconds must be 0 or more (inf: until interrupted), got {args.seconds}")
    if not args.speed >= 0:
        raise ValueError(f"--speed must be 0 or more (0: as fast as possible), got {args.speed}")
    if not 0 < args.raw_retention_s < math.inf:
        raise ValueError(f"--raw-retention-s must be a number of seconds above 0, got "
                         f"{args.raw_retention_s}")
    hub = TelemetryHub()
    source = open_gpu_source(args.source, hub, args.hz, trace=args.trace, speed=args.speed,
                             load_fn=sim_load_profile(args.sim_load))
    assert source is not None  # the CLI always falls back to the simulated GPU
    store = TelemetryStore(args.db, raw_retention_s=args.raw_retention_s)
    store.attach(hub)
    log.info("recording %s source into %s", source.source_name, args.db)
    source.start()
    try:
        if isinstance(source, ReplaySource):
            source.join(None if args.seconds is None or args.seconds == math.inf else args.seconds)
        else:
            _sleep(10.0 if args.seconds is None else args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        source.stop()
        store.close()
    summary = {
        "source": source.source_name,
        "produced": source.produced,
        "stored": store.stored,
        "dropped": store.dropped,
        "db": str(args.db),
    }
    print(json.dumps(summary))
    return 0


def _sleep(seconds: float) -> None:
    """time.sleep for any span, inf included (until interrupted): one call overflows past
    about 292 years."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 3600.0))


def export(args: argparse.Namespace) -> int:
    refuse_overwriting_inputs("-o", args.output, {"--db": args.db})
    columns, rows = read_rows(args.db, args.table)
    try:
        if args.format == "parquet":
            write_parquet(columns, rows, args.output)
        else:
            write_csv(columns, rows, args.output)
    except RuntimeError as e:  # no pyarrow
        raise ValueError(str(e)) from e
    log.info("wrote %d rows to %s", len(rows), args.output)
    return 0


