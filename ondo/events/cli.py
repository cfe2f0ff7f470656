"""`ondo events verify|tail|export|replay`, `ondo analyze`, and the event flags of `ondo serve`."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import logging
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from ondo.cli_errors import describe_user_error
from ondo.cli_paths import refuse_overwriting_inputs
from ondo.events.config import DetectorConfig

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def add_detector_args(p: argparse.ArgumentParser, power_budget: bool = True) -> None:
    """Detector settings shared by `ondo serve` and `ondo events replay`. `ondo serve` has
    one --power-budget-w, the governor's objective, which the detectors also report against."""
    if power_budget:
        p.add_argument("--power-budget-w", type=float, default=None,
                       help="report power above this budget (W; default: none, the GPU's own "
                            "limit is watched through its power cap)")
    p.add_argument("--slo-ttft-s", type=float, default=None,
                   help=f"time-to-first-token objective (default {DetectorConfig.slo_ttft_s} s)")
    p.add_argument("--slo-tpot-s", type=float, default=None,
                   help=f"time-per-output-token objective (default {DetectorConfig.slo_tpot_s} s)")
    p.add_argument("--detector", action="append", default=[], metavar="NAME=VALUE",
                   help="set any detector threshold or dwell time (docs/events.md), repeatable")


def add_event_args(p: argparse.ArgumentParser) -> None:
    """The flags `ondo serve` takes for the event log."""
    p.add_argument("--events", choices=("on", "off"), default="on",
                   help="deterministic event detectors and the hash-chained event log (in "
                        "--telemetry-db where given); with --telemetry off they run on "
                        "engine-only telemetry")
    add_detector_args(p, power_budget=False)


def detector_config(args: argparse.Namespace, params=None) -> DetectorConfig:
    """The detector settings the flags ask for; ValueError naming the bad flag."""
    fields = {f.name: f for f in dataclasses.fields(DetectorConfig)}
    changes: dict[str, Any] = {}
    for item in getattr(args, "detector", None) or []:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"--detector {item!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(sorted(fields))}")
        whole = isinstance(fields[name].default, int)
        try:
            value: Any = None if text.lower() == "none" else (int(text) if whole else float(text))
        except ValueError:
            raise ValueError(f"--detector {item!r}: {text!r} is not "
                             f"{'a whole number' if whole else 'a number'}") from None
        changes[name] = value
    for flag, name in (("power_budget_w", "power_budget_w"), ("slo_ttft_s", "slo_ttft_s"),
                       ("slo_tpot_s", "slo_tpot_s")):
        value = getattr(args, flag, None)
        if value is not None:
            if not value > 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
            changes[name] = value
    tpot_slo_ms = getattr(args, "tpot_slo_ms", None)  # the governor's latency objective
    if getattr(args, "slo_tpot_s", None) is None and tpot_slo_ms:
        changes["slo_tpot_s"] = tpot_slo_ms / 1000.0
    try:
        return DetectorConfig.from_params(params, **changes)
    except ValueError as e:
        raise ValueError(f"--detector: {e}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("events", help="the event log: verify, tail, export, replay")
    sub = p.add_subparsers(dest="events_command", metavar="ACTION")

    v = sub.add_parser("verify", help="walk the hash chain; name the first bad entry (exit 1)")
    v.add_argument("--db", required=True)
    v.set_defaults(func=verify_cmd)

    for name, helptext in (("tail", "the latest entries"), ("export", "entries as JSON or CSV")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--db", required=True)
        q.add_argument("--kind", action="append", default=[],
                       help="only this kind (repeatable)")
        q.add_argument("--since", default=None,
                       help="monotonic seconds (123.4), a span back from now (90s, 5m, 2h, "
                            "1d) or an ISO time (2026-12-01T10:00:00)")
        q.add_argument("--gpu", type=int, default=None, help="only events about this GPU")
        if name == "tail":
            q.add_argument("-n", "--lines", type=int, default=20)
            q.add_argument("--format", choices=("text", "json", "csv"), default="text")
            q.add_argument("-f", "--follow", action="store_true",
                           help="keep printing new entries as they are appended")
            q.set_defaults(func=tail_cmd)
        else:
            q.add_argument("--format", choices=("json", "csv"), default="json",
                           help="json: one entry per line")
            q.add_argument("-o", "--output", default="-", help="file (default: stdout)")
            q.set_defaults(func=export_cmd)

    r = sub.add_parser("replay", help="run the detectors over a recorded trace into a new db")
    r.add_argument("--trace", required=True, help="CSV trace (data/traces formats)")
    r.add_argument("--db", required=True, help="the SQLite file to create")
    r.add_argument("--overwrite", action="store_true", help="replace --db if it exists")
    r.add_argument("--speed", type=float, default=0.0,
                   help="pace the replay at this multiple of real time (0: as fast as possible)")
    r.add_argument("--params", default=None,
                   help="twin parameters JSON (default: the packaged H100's)")
    add_detector_args(r)
    r.set_defaults(func=replay_cmd)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    a = subparsers.add_parser("analyze", help="which load preceded which throttle; correlations")
    a.add_argument("--db", required=True, help="a telemetry database (ondo serve, record, "
                                               "events replay)")
    a.add_argument("--json", action="store_true", help="one JSON object instead of text")
    a.add_argument("--gpu", type=int, default=None, help="the GPU to analyse (default: first)")
    a.add_argument("--bin-s", type=float, default=0.1, help="resampling interval of the series")
    a.add_argument("--max-lag-s", type=float, default=10.0, help="largest lag searched")
    a.add_argument("--lookback-s", type=float, default=2.0,
                   help="how far before an episode its load is looked for")
    a.set_defaults(func=analyze_cmd)


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def verify_cmd(args: argparse.Namespace) -> int:
    from ondo.events.verify import verify

    try:
        result = verify(args.db)
    except (FileNotFoundError, ValueError, sqlite3.Error) as e:
        return _error(describe_user_error(e, args))
    print(result.describe(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def parse_since(text: str | None, now_wall_s: float | None = None):
    """An EventQuery's time bound from --since; ValueError naming the flag."""
    from ondo.events.table import EventQuery

    if text is None:
        return EventQuery()
    text = text.strip()
    try:
        return EventQuery(since_monotonic_s=float(text))
    except ValueError:
        pass
    m = _DURATION.match(text)
    if m:
        now = time.time() if now_wall_s is None else now_wall_s
        return EventQuery(since_wall_s=now - float(m.group(1)) * _UNITS_S[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected monotonic seconds (123.4), a span "
                         "(90s, 5m, 2h, 1d) or an ISO time (2026-12-01T10:00:00)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return EventQuery(since_wall_s=when.timestamp())


def _query(args: argparse.Namespace):
    from ondo.events.schema import EventKind

    known = {k.value for k in EventKind}
    for k in args.kind:
        if k not in known:
            raise ValueError(f"--kind {k!r}: not an event kind; kinds: {', '.join(sorted(known))}")
    q = parse_since(args.since)
    return dataclasses.replace(q, kinds=tuple(args.kind), gpu_index=args.gpu)


def _open_log(db: str) -> sqlite3.Connection:
    from ondo.events.table import has_event_log

    if not Path(db).exists():
        raise FileNotFoundError(f"{db}: no such database")
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True, timeout=5.0)
    if not has_event_log(conn):
        conn.close()
        raise ValueError(f"{db}: holds no event log")
    return conn


CSV_COLUMNS = ("seq", "t_monotonic_s", "t_wall_s", "kind", "severity", "subject", "payload",
               "evidence", "schema_version", "prev_hash", "hash")


def _csv_row(entry: dict) -> dict:
    row = dict(entry)
    for k in ("subject", "payload", "evidence"):
        row[k] = json.dumps(entry[k], sort_keys=True, separators=(",", ":"))
    return row


def _text_line(e: dict) -> str:
    when = dt.datetime.fromtimestamp(e["t_wall_s"]).isoformat(timespec="milliseconds") \
        if e["t_wall_s"] > 1e8 else f"t+{e['t_wall_s']:.3f}s"
    subject = ",".join(f"{k}={v}" for k, v in sorted(e["subject"].items()))
    payload = " ".join(f"{k}={_short(v)}" for k, v in sorted(e["payload"].items()))
    return (f"{e['seq']:>6} {when} {e['t_monotonic_s']:>12.3f} {e['severity']:<8} "
            f"{e['kind']:<22} {subject:<28} {payload}")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def _write(entries, fmt: str, out, header: bool = True) -> None:
    if fmt == "csv":
        w = csv.DictWriter(out, CSV_COLUMNS)
        if header:
            w.writeheader()
        for e in entries:
            w.writerow(_csv_row(e))
        return
    for e in entries:
        print(_text_line(e) if fmt == "text" else json.dumps(e, sort_keys=True), file=out)


def tail_cmd(args: argparse.Namespace) -> int:
    from ondo.events.table import read_events

    try:
        q = _query(args)
        conn = _open_log(args.db)
    except (FileNotFoundError, ValueError, sqlite3.Error) as e:
        return _error(describe_user_error(e, args))
    try:
        entries = list(read_events(conn, q, last=max(args.lines, 0)))
        _write(entries, args.format, sys.stdout)
        sys.stdout.flush()
        last_seq = entries[-1]["seq"] if entries else (q.since_seq or 0)
        if not args.follow:
            return 0
        if not entries:
            last_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        while True:
            time.sleep(0.5)
            new = list(read_events(conn, dataclasses.replace(q, since_seq=last_seq)))
            if new:
                _write(new, args.format, sys.stdout, header=False)
                sys.stdout.flush()
                last_seq = new[-1]["seq"]
    except KeyboardInterrupt:
        return 0
    finally:
        conn.close()


def export_cmd(args: argparse.Namespace) -> int:
    from ondo.events.table import read_events

    try:
        q = _query(args)
        refuse_overwriting_inputs("-o", args.output, {"--db": args.db})
        conn = _open_log(args.db)
    except (FileNotFoundError, ValueError, sqlite3.Error) as e:
        return _error(describe_user_error(e, args))
    try:
        if args.output == "-":
            _write(read_events(conn, q), args.format, sys.stdout)
        else:
            with open(args.output, "w", newline="") as f:
                _write(read_events(conn, q), args.format, f)
    finally:
        conn.close()
    return 0


def replay_cmd(args: argparse.Namespace) -> int:
    from ondo.events.replay import replay_trace
    from ondo.events.trace_input import TraceError
    from ondo.twin.params import params_from

    try:
        params = params_from("--params", args.params)
    except ValueError as e:
        return _error(str(e))
    if not args.speed >= 0:  # nan too
        return _error(f"--speed must be >= 0 (0: as fast as possible), got {args.speed}")
    try:
        refuse_overwriting_inputs("--db", args.db, {"--trace": args.trace, "--params": args.params})
        config = detector_config(args, params)
        summary = replay_trace(args.trace, args.db, config=config, params=params,
                               speed=args.speed or float("inf"), overwrite=args.overwrite)
    except (TraceError, FileExistsError, FileNotFoundError, ValueError) as e:
        return _error(str(e))
    except sqlite3.Error as e:
        return _error(f"--db {args.db}: {e}")
    print(json.dumps(dataclasses.asdict(summary)))
    return 0


def analyze_cmd(args: argparse.Namespace) -> int:
    from ondo.events.analysis.report import analyze, format_text

    for flag in ("bin_s", "max_lag_s", "lookback_s"):
        if not 0 < getattr(args, flag) < float("inf"):
            return _error(f"--{flag.replace('_', '-')} must be a number of seconds above 0, "
                          f"got {getattr(args, flag)}")
    try:
        report = analyze(args.db, gpu_index=args.gpu, bin_s=args.bin_s,
                         max_lag_s=args.max_lag_s, lookback_s=args.lookback_s)
    except (FileNotFoundError, ValueError, sqlite3.Error) as e:
        return _error(describe_user_error(e, args))
    print(json.dumps(report, sort_keys=True) if args.json else format_text(report))
    return 0
