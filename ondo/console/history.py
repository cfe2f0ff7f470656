"""Chart series over a time range, at most `max_points` per series: from the live points in
memory (the last hour) or from the database (any range, offline too).

Both give the same columns (`CHART_COLUMNS`), one row per bucket of `bucket_s` seconds,
`bucket_s` = ceil(range / max_points): so a day is ~1,200 buckets of 72 s and never 1.7
million samples. In the database the GPU's columns come from the store's 1 s aggregates
(`gpu_samples_1s`) and its raw samples (the last ten minutes, which the store keeps raw),
the rest from the console's own 1 s points (`console_points_1s`); SQLite groups them.

Per bucket: temperatures, power and clock are means of the per-second means (the maxima of
the maxima, the minimum of the clock); throttle reasons are ORed; tokens per second are the
bucket's tokens over its seconds; TTFT and TPOT are means over the requests finished in it;
KV use and queues are the bucket's largest.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ondo.console.series import ConsolePoint, twin_state_from_row
from ondo.telemetry.store import connect

CHART_COLUMNS: tuple[str, ...] = (
    "t", "temp_c", "temp_max_c", "twin_die_c", "twin_peak_c", "mem_temp_c", "power_w",
    "power_max_w", "power_budget_w", "sm_mhz", "sm_min_mhz", "throttle_reasons", "tok_s",
    "kv_pct", "num_waiting", "num_running", "ttft_ms", "tpot_ms", "duty_cycle")
GPU_COLUMNS = ("temp_c", "temp_max_c", "mem_temp_c", "power_w", "power_max_w", "sm_mhz",
               "sm_min_mhz", "throttle_reasons")
DEFAULT_MAX_POINTS = 1200


def bucket_for(range_s: float, max_points: int = DEFAULT_MAX_POINTS) -> int:
    return max(1, math.ceil(range_s / max(1, max_points)))


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _max(xs: Sequence[Any]) -> Any:
    v = [x for x in xs if x is not None]
    return max(v) if v else None


def _min(xs: Sequence[Any]) -> Any:
    v = [x for x in xs if x is not None]
    return min(v) if v else None


def _ratio_ms(total_s: float, n: int) -> float | None:
    return total_s / n * 1e3 if n else None


def chart_row(t: int, pts: Sequence[ConsolePoint]) -> dict[str, Any]:
    bits = [p.throttle_reasons for p in pts if p.throttle_reasons is not None]
    orred = None
    for b in bits:
        orred = (orred or 0) | b
    kv = _max([p.kv_usage for p in pts])
    return {
        "t": t, "temp_c": _mean([p.temp_c for p in pts]),
        "temp_max_c": _max([p.temp_max_c for p in pts]),
        "twin_die_c": _mean([p.twin_die_c for p in pts]),
        "twin_peak_c": _max([p.twin_peak_c for p in pts]),
        "mem_temp_c": _max([p.mem_temp_c for p in pts]),
        "power_w": _mean([p.power_w for p in pts]),
        "power_max_w": _max([p.power_max_w for p in pts]),
        "power_budget_w": _max([p.power_budget_w for p in pts]),
        "sm_mhz": _mean([p.sm_mhz for p in pts]), "sm_min_mhz": _min([p.sm_min_mhz for p in pts]),
        "throttle_reasons": orred,
        "tok_s": sum(p.output_tokens for p in pts) / len(pts),
        "kv_pct": None if kv is None else kv * 100.0,
        "num_waiting": _max([p.num_waiting for p in pts]),
        "num_running": _max([p.num_running for p in pts]),
        "ttft_ms": _ratio_ms(sum(p.ttft_sum_s for p in pts), sum(p.ttft_n for p in pts)),
        "tpot_ms": _ratio_ms(sum(p.tpot_sum_s for p in pts), sum(p.tpot_n for p in pts)),
        "duty_cycle": _min([p.duty_cycle for p in pts]),
    }


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {c: [r.get(c) for r in rows] for c in CHART_COLUMNS}


def chart_from_points(points: Sequence[ConsolePoint], t0: float, t1: float,
                      max_points: int = DEFAULT_MAX_POINTS) -> tuple[int, dict[str, list[Any]]]:
    """(bucket_s, columns) of the points in [t0, t1]."""
    b = bucket_for(t1 - t0, max_points)
    groups: dict[int, list[ConsolePoint]] = {}
    for p in points:
        if t0 <= p.t_wall_s <= t1:
            groups.setdefault(p.t_wall_s // b * b, []).append(p)
    return b, columns([chart_row(t, groups[t]) for t in sorted(groups)])


def open_db(path: str | Path) -> sqlite3.Connection:
    """A connection for reading (with the store's `bit_or` aggregate)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--db {path}: no such database")
    return connect(path)


def tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


_GPU_1S = """SELECT CAST(t_wall_s / :b AS INTEGER) * :b AS t, COUNT(*),
 AVG(temp_c_mean), MAX(temp_c_max), MAX(mem_temp_c_max), AVG(power_w_mean), MAX(power_w_max),
 AVG(sm_mhz_mean), MIN(sm_mhz_min), bit_or(throttle_reasons_any)
 FROM gpu_samples_1s WHERE t_wall_s >= :t0 AND t_wall_s < :t1 AND gpu_index = :g GROUP BY t"""
_GPU_RAW = """SELECT CAST(t_wall_s / :b AS INTEGER) * :b AS t, COUNT(*),
 AVG(temp_c), MAX(temp_c), MAX(mem_temp_c), AVG(power_w), MAX(power_w),
 AVG(sm_mhz), MIN(sm_mhz), bit_or(throttle_reasons)
 FROM gpu_samples WHERE t_wall_s >= :t0 AND t_wall_s < :t1 AND gpu_index = :g GROUP BY t"""
_POINTS = """SELECT CAST(t_wall_s / :b AS INTEGER) * :b AS t,
 AVG(twin_die_c), MAX(twin_peak_c), MAX(power_budget_w),
 SUM(output_tokens) * 1.0 / COUNT(*), MAX(kv_usage) * 100.0, MAX(num_waiting), MAX(num_running),
 SUM(ttft_sum_s) * 1000.0 / NULLIF(SUM(ttft_n), 0), SUM(tpot_sum_s) * 1000.0 / NULLIF(SUM(tpot_n), 0),
 MIN(duty_cycle)
 FROM console_points_1s WHERE t_wall_s >= :t0 AND t_wall_s < :t1 GROUP BY t"""
_POINT_COLS = ("twin_die_c", "twin_peak_c", "power_budget_w", "tok_s", "kv_pct",
               "num_waiting", "num_running", "ttft_ms", "tpot_ms", "duty_cycle")


def chart_from_db(conn: sqlite3.Connection, t0: float, t1: float,
                  max_points: int = DEFAULT_MAX_POINTS, gpu_index: int = 0,
                  ) -> tuple[int, dict[str, list[Any]]]:
    """(bucket_s, columns) for wall times in [t0, t1] from a telemetry database."""
    b = bucket_for(t1 - t0, max_points)
    args = {"b": b, "t0": t0, "t1": t1 + 1, "g": gpu_index}
    names = tables(conn)
    rows: dict[int, dict[str, Any]] = {}
    weights: dict[int, int] = {}
    for table, sql in (("gpu_samples_1s", _GPU_1S), ("gpu_samples", _GPU_RAW)):
        if table not in names:
            continue
        for t, n, *vals in conn.execute(sql, args):
            new = dict(zip(GPU_COLUMNS, vals))
            old = rows.get(t)
            if old is None:
                rows[t], weights[t] = new, n
                continue
            rows[t] = _merge_gpu(old, weights[t], new, n)  # a bucket the compaction split
            weights[t] += n
    if "console_points_1s" in names:
        for t, *vals in conn.execute(_POINTS, args):
            rows.setdefault(t, {}).update(zip(_POINT_COLS, vals))
    out = []
    for t in sorted(rows):
        r = rows[t]
        r["t"] = t
        out.append(r)
    return b, columns(out)


def _merge_gpu(a: dict[str, Any], na: int, b: dict[str, Any], nb: int) -> dict[str, Any]:
    def wmean(x, y):
        if x is None or y is None:
            return y if x is None else x
        return (x * na + y * nb) / (na + nb)

    bits = None
    for v in (a["throttle_reasons"], b["throttle_reasons"]):
        if v is not None:
            bits = (bits or 0) | int(v)
    return {"temp_c": wmean(a["temp_c"], b["temp_c"]),
            "temp_max_c": _max([a["temp_max_c"], b["temp_max_c"]]),
            "mem_temp_c": _max([a["mem_temp_c"], b["mem_temp_c"]]),
            "power_w": wmean(a["power_w"], b["power_w"]),
            "power_max_w": _max([a["power_max_w"], b["power_max_w"]]),
            "sm_mhz": wmean(a["sm_mhz"], b["sm_mhz"]),
            "sm_min_mhz": _min([a["sm_min_mhz"], b["sm_min_mhz"]]), "throttle_reasons": bits}


def data_span(conn: sqlite3.Connection) -> tuple[float, float] | None:
    """(first, last) wall time of any telemetry or entry in the database."""
    names = tables(conn)
    spans = []
    for table in ("gpu_samples_1s", "gpu_samples", "console_points_1s", "engine_steps",
                  "events"):
        if table in names:
            lo, hi = conn.execute(f"SELECT MIN(t_wall_s), MAX(t_wall_s) FROM {table}").fetchone()
            if lo is not None:
                spans.append((float(lo), float(hi)))
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def twin_state_at(conn: sqlite3.Connection, t_wall_s: float) -> dict[str, float] | None:
    """The twin's state in the stored point at or just before `t_wall_s` (within a minute)."""
    if "console_points_1s" not in tables(conn):
        return None
    cur = conn.execute("SELECT * FROM console_points_1s WHERE t_wall_s <= ? AND t_wall_s > ? "
                       "AND twin_die_c IS NOT NULL ORDER BY t_wall_s DESC LIMIT 1",
                       (t_wall_s, t_wall_s - 60))
    row = cur.fetchone()
    if row is None:
        return None
    return twin_state_from_row(dict(zip([d[0] for d in cur.description], row)))


def latest_governor(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The last stored governor decision (policy, reason, limits, objectives)."""
    if "governor_decisions" not in tables(conn):
        return None
    row = conn.execute("SELECT t_wall_s, policy, reason, limits, objectives FROM "
                       "governor_decisions ORDER BY t_wall_s DESC LIMIT 1").fetchone()
    if row is None:
        return None
    return {"t_wall_s": row[0], "policy": row[1], "reason": row[2],
            "limits": json.loads(row[3]), "objectives": json.loads(row[4])}
