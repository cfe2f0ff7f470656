"""Export a telemetry database as one table: GPU samples and engine steps on one clock.

Each row is either a GPU sample (`kind` "gpu", at its poll time) or an engine step (`kind`
"engine", at its end time); `t` is seconds since the first row. Columns of the other kind are
empty: nothing is filled in between readings.
"""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Any

from ondo.telemetry.schema import ENGINE_COLUMNS
from ondo.telemetry.store import AGGREGATE_COLUMNS, GPU_COLUMNS

LEAD_COLUMNS = ("t", "kind", "t_monotonic_s")
GPU_EXPORT_COLUMNS = (
    "temp_c", "mem_temp_c", "power_w", "energy_j", "sm_mhz", "mem_mhz", "throttle_reasons",
    "util_pct",
    *(c for c in GPU_COLUMNS if c not in ("temp_c", "mem_temp_c", "power_w", "energy_j", "sm_mhz",
                                          "mem_mhz", "throttle_reasons", "util_pct", "t_monotonic_s")),
    "sm_clock_ratio",
)
ENGINE_EXPORT_COLUMNS = tuple(c for c in ENGINE_COLUMNS if c != "t_wall_s")


def read_rows(db: str | Path, table: str = "raw") -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the export, sorted by time. `table` "raw" or "1s" (aggregates only).
    A missing file raises FileNotFoundError, a database without telemetry ValueError, each
    naming it."""
    if not Path(db).is_file():
        raise FileNotFoundError(f"{db}: no such database")
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        wanted = {"gpu_samples_1s"} if table == "1s" else {"gpu_samples", "engine_steps"}
        if not wanted <= tables:
            raise ValueError(f"{db}: not a telemetry database (no {' or '.join(sorted(wanted - tables))} table)")
        if table == "1s":
            rows = [dict(r) for r in conn.execute("SELECT * FROM gpu_samples_1s ORDER BY t_s")]
            return ["t", *AGGREGATE_COLUMNS], [{"t": r["t_s"], **r} for r in rows]
        gpu = [dict(r) for r in conn.execute("SELECT * FROM gpu_samples")]
        engine = [dict(r) for r in conn.execute("SELECT * FROM engine_steps")]
    finally:
        conn.close()
    rows = []
    for r in gpu:
        ratio = r["sm_mhz"] / r["sm_max_mhz"] if r["sm_mhz"] is not None and r["sm_max_mhz"] else None
        rows.append({"kind": "gpu", **r, "sm_clock_ratio": ratio})
    for r in engine:
        rows.append({"kind": "engine", "t_monotonic_s": r["end_monotonic_s"], **r})
    rows.sort(key=lambda r: r["t_monotonic_s"])
    t0 = rows[0]["t_monotonic_s"] if rows else 0.0
    for r in rows:
        r["t"] = r["t_monotonic_s"] - t0
    columns = list(LEAD_COLUMNS) + list(GPU_EXPORT_COLUMNS)
    if engine:
        columns += list(ENGINE_EXPORT_COLUMNS)
    return columns, rows


def write_csv(columns: list[str], rows: list[dict[str, Any]], out: str | Path) -> None:
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_parquet(columns: list[str], rows: list[dict[str, Any]], out: str | Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError("parquet export needs the 'pyarrow' package (pip install pyarrow)") from e
    table = pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, str(out))
