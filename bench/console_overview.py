"""How fast the console's overview loads over a day of telemetry.

Builds a database as `ondo serve --telemetry-db` leaves it after `--hours` of `--hz` GPU
sampling: raw GPU samples folded into 1 s aggregates by the store's own `compact` (the last
ten minutes kept raw), an engine step every 1/hz s kept raw (the store never folds them), the
console's 1 s points, and an event log with recommendations and decisions. Then serves it
with `ondo console --db` on loopback and times, over `--repeat` loads each, the overview
page (HTML) and its JSON for the whole range, and the events and audit pages.

    python3 bench/console_overview.py                 # 24 h at 20 Hz (builds ~1.7 M samples)
    python3 bench/console_overview.py --smoke         # 0.1 h, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ondo.console.app import build_offline_app  # noqa: E402
from ondo.console.series import POINTS_TABLE, ConsolePoint  # noqa: E402
from ondo.console.service import ConsoleService  # noqa: E402
from ondo.control.decision import DECISION_TABLE  # noqa: E402
from ondo.events.log import EventLog  # noqa: E402
from ondo.events.schema import EventDraft, EventKind  # noqa: E402
from ondo.events.table import DDL as EVENTS_DDL  # noqa: E402
from ondo.events.table import INSERT as EVENTS_INSERT  # noqa: E402
from ondo.events.table import event_row  # noqa: E402
from ondo.telemetry.schema import ENGINE_COLUMNS  # noqa: E402
from ondo.telemetry.store import _SCHEMA, GPU_COLUMNS, compact, connect  # noqa: E402
from tests.server_harness import ServerThread  # noqa: E402

RAW_KEEP_S = 600
CHUNK_S = 3600


def build(db: Path, hours: float, hz: float, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    conn = connect(db)
    conn.executescript(_SCHEMA)
    for ddl in (POINTS_TABLE.ddl, DECISION_TABLE.ddl, EVENTS_DDL):
        conn.executescript(ddl)
    span_s = hours * 3600.0
    t_end_wall = time.time()
    t_end_mono = 100_000.0
    counts = {"gpu_samples": 0, "engine_steps": 0, "points": 0, "events": 0}
    dt = 1.0 / hz
    start = 0.0
    while start < span_s:  # an hour at a time, folded as the store folds
        stop = min(span_s, start + CHUNK_S)
        t = np.arange(start, stop, dt)
        mono = t_end_mono - span_s + t
        wall = t_end_wall - span_s + t
        load = 0.5 + 0.4 * np.sin(2 * math.pi * t / 86400.0) + 0.1 * rng.standard_normal(len(t))
        load = np.clip(load, 0.0, 1.0)
        power = 120 + 520 * load
        temp = np.round(35 + 40 * load)
        rows = []
        for i in range(len(t)):
            bits = 4 if power[i] > 620 else 0
            rows.append((0, "sim", mono[i], wall[i], dt, 1e-4, temp[i], temp[i] + 4, power[i],
                         power[i], 0.0, 1980 - 300 * (bits > 0), 1980, 2619, bits,
                         100 * load[i], 50 * load[i], 10**10, "", ""))
        conn.executemany(f"INSERT INTO gpu_samples ({', '.join(GPU_COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(GPU_COLUMNS))})", rows)
        steps = [(int(start * hz) + i, mono[i] - dt, mono[i], wall[i], 0, int(64 * load[i]),
                  int(64 * load[i]), 64, int(900 * load[i]), 1000, 0, 0, int(8 * load[i]),
                  int(64 * load[i]), 0, 1e12, 1e9, 0.3 * load[i], 0.6 * load[i], "engine")
                 for i in range(len(t))]
        conn.executemany(f"INSERT INTO engine_steps VALUES ({', '.join('?' * (len(ENGINE_COLUMNS) + 1))})",
                         steps)
        conn.commit()
        counts["gpu_samples"] += len(t)
        counts["engine_steps"] += len(t)
        compact(conn, int(t_end_mono - RAW_KEEP_S))
        start = stop
    pts = []
    for s in range(int(span_s)):
        w = int(t_end_wall - span_s + s)
        load = 0.5 + 0.4 * math.sin(2 * math.pi * s / 86400.0)
        state = {"die_c": 36 + 40 * load, "hbm_c": 40 + 30 * load, "sink_c": 30 + 20 * load,
                 "board_c": 28 + 10 * load, "die_sensor_c": 35 + 40 * load,
                 "hbm_sensor_c": 39 + 30 * load, "ambient_c": 25.0, "power_w": 120 + 520 * load,
                 "power_instant_w": 120 + 520 * load, "sm_mhz": 1980.0,
                 "compute_activity": 0.3 * load, "memory_activity": 0.6 * load,
                 "throttle_reasons": 0.0}
        pts.append(POINTS_TABLE.row(ConsolePoint(
            w, twin_die_c=35 + 40 * load, twin_peak_c=36 + 40 * load, twin_horizon_s=10.0,
            twin_state=state, output_tokens=int(1200 * load), steps=int(hz),
            kv_usage=0.9 * load, num_waiting=int(8 * load), num_running=int(64 * load),
            requests=int(20 * load), ttft_n=int(20 * load), ttft_sum_s=0.2 * int(20 * load),
            tpot_n=int(20 * load), tpot_sum_s=0.02 * int(20 * load), policy="predictive",
            duty_cycle=1.0, power_budget_w=600.0, temp_target_c=82.0)))
    conn.executemany(POINTS_TABLE.insert_sql, pts)
    counts["points"] = len(pts)
    written: list = []
    log = EventLog(sinks=[written.append])
    every = max(1.0, span_s / 2000)
    for k in range(int(span_s / every)):
        w = t_end_wall - span_s + k * every
        m = t_end_mono - span_s + k * every
        if k % 10 == 5:
            log.append(EventDraft(EventKind.RECOMMENDATION_ISSUED, m, w, {
                "recommendation_id": f"rec-{k}"}, {"recommendation_id": f"rec-{k}",
                "action": "set_governor_policy", "parameters": {"policy": "predictive"},
                "rationale": "power over the budget", "source": "rules"},
                (f"event:{k}",)))
        elif k % 10 == 6:
            log.append(EventDraft(EventKind.OPERATOR_DECISION, m, w, {
                "recommendation_id": f"rec-{k - 1}"}, {"recommendation_id": f"rec-{k - 1}",
                "decision": "reject", "operator": "alice", "comment": "benchmark"}))
        else:
            log.append(EventDraft(EventKind.POWER_BUDGET_EXCEEDED, m, w, {"gpu": 0},
                                  {"power_w": 640.0, "budget_w": 600.0, "since_s": m}))
    conn.executemany(EVENTS_INSERT, [event_row(e) for e in written])
    conn.commit()
    counts["events"] = len(written)
    conn.close()
    return counts


def timed(client: httpx.Client, url: str, repeat: int) -> tuple[list[float], int]:
    out, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(url)
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
        size = len(r.content)
    return out, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--db", default=None, help="keep the built database here (reused if present)")
    ap.add_argument("--smoke", action="store_true", help="0.1 h, 2 loads each")
    args = ap.parse_args()
    if args.smoke:
        args.hours, args.repeat = 0.1, 2
    tmp = tempfile.TemporaryDirectory()
    db = Path(args.db) if args.db else Path(tmp.name) / "day.db"
    t0 = time.perf_counter()
    counts = build(db, args.hours, args.hz) if not db.exists() else {}
    build_s = time.perf_counter() - t0
    with sqlite3.connect(db) as conn:
        rows = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("gpu_samples", "gpu_samples_1s", "engine_steps", "console_points_1s",
                          "events")}
    range_s = int(args.hours * 3600)
    service = ConsoleService(db=db)
    results = {}
    with ServerThread(build_offline_app(service)) as server, httpx.Client(
            base_url=server.base_url, timeout=60) as client:
        for name, url in (("overview page", f"/console/?range_s={range_s}"),
                          ("overview JSON", f"/console/api/overview?range_s={range_s}"),
                          ("events page", "/console/events"),
                          ("audit page", "/console/audit")):
            times, size = timed(client, url, args.repeat)
            results[name] = {"first_s": times[0], "median_s": statistics.median(times),
                             "max_s": max(times), "bytes": size}
        points = len(client.get(f"/console/api/overview?range_s={range_s}").json()
                     ["series"]["t"])
    print(f"database: {args.hours:g} h at {args.hz:g} Hz, {db.stat().st_size / 2**20:.0f} MiB, "
          f"built in {build_s:.1f} s; rows {rows}")
    print(f"{'what':<16} {'first s':>8} {'median s':>9} {'max s':>7} {'KiB':>7}")
    for name, r in results.items():
        print(f"{name:<16} {r['first_s']:8.3f} {r['median_s']:9.3f} {r['max_s']:7.3f} "
              f"{r['bytes'] / 1024:7.0f}")
    print(json.dumps({"bench": "console_overview", "hours": args.hours, "hz": args.hz,
                      "rows": rows, "points_per_series": points, "built": counts,
                      "results": results,
                      "overview_under_1s": results["overview page"]["max_s"] < 1.0
                      and results["overview JSON"]["max_s"] < 1.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
