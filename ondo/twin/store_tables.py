"""The online twin's records in the telemetry database.

- `twin_params`: the adapted constants of each GPU (by NVML UUID), appended every
  PERSIST_PERIOD_S while they move and when the server stops; the latest row is where the
  next start on that GPU begins, and the rows together are its history, so drift over weeks
  (dust, a failing fan: a resistance walking up) can be read back (`constants_history`,
  `ondo twin history`).
- `twin_forecasts`: each published `TwinSnapshot`'s forecast: peaks, their bands, the time
  to a thermal slowdown and its probability.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ondo.telemetry.store import RecordTable
from ondo.twin.adapt_params import BOUNDS, N_THETA
from ondo.twin.live import TwinSnapshot
from ondo.twin.params import TwinParams

PERSIST_PERIOD_S = 300.0


@dataclass(frozen=True)
class AdaptedConstants:
    """The adapted constants of one GPU at one time."""

    gpu_uuid: str
    gpu_name: str
    gpu_index: int
    t_wall_s: float
    t_monotonic_s: float
    base: str  # the packaged (or given) params it started from
    units: str  # "engine" or "plant": the load the map takes
    theta: tuple[float, ...]  # adapt_params' vector (logs for R and C)
    theta_var: tuple[float, ...]
    inlet_c: float
    samples: int
    excited_s: float
    teachings: int
    rejected: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # the TwinParams they make, as in a params JSON

    def values(self) -> dict[str, float]:
        """Each constant in its own unit."""
        return {b.name: float(math.exp(v) if b.log else v) for b, v in zip(BOUNDS, self.theta)}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


TWIN_PARAMS_TABLE = RecordTable(
    kind=AdaptedConstants,
    ddl="""
CREATE TABLE IF NOT EXISTS twin_params (
    gpu_uuid TEXT, gpu_name TEXT, gpu_index INTEGER, t_wall_s REAL, t_monotonic_s REAL,
    base TEXT, units TEXT, theta TEXT, theta_var TEXT, inlet_c REAL, samples INTEGER,
    excited_s REAL, teachings INTEGER, rejected TEXT, params TEXT, constants TEXT
);
CREATE INDEX IF NOT EXISTS twin_params_gpu ON twin_params (gpu_uuid, t_wall_s);
""",
    insert_sql="INSERT INTO twin_params VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    row=lambda c: (c.gpu_uuid, c.gpu_name, c.gpu_index, c.t_wall_s, c.t_monotonic_s, c.base,
                   c.units, _json(list(c.theta)), _json(list(c.theta_var)), c.inlet_c,
                   c.samples, c.excited_s, c.teachings, _json(c.rejected), _json(c.params),
                   _json(c.values())),
)

TWIN_FORECAST_TABLE = RecordTable(
    kind=TwinSnapshot,
    ddl="""
CREATE TABLE IF NOT EXISTS twin_forecasts (
    gpu_index INTEGER, t_monotonic_s REAL, t_wall_s REAL, die_sensor_c REAL,
    hbm_sensor_c REAL, ambient_c REAL, forecast_horizon_s REAL, die_peak_c REAL,
    die_band_c REAL, hbm_peak_c REAL, hbm_band_c REAL, power_peak_w REAL,
    time_to_throttle_s REAL, throttle_probability REAL, adapted INTEGER
);
CREATE INDEX IF NOT EXISTS twin_forecasts_t ON twin_forecasts (t_monotonic_s);
""",
    insert_sql="INSERT INTO twin_forecasts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    row=lambda s: (s.gpu_index, s.t_monotonic_s, s.t_wall_s, s.die_sensor_c, s.hbm_sensor_c,
                   s.ambient_c, s.forecast_horizon_s, s.die_peak_c, s.die_band_c, s.hbm_peak_c,
                   s.hbm_band_c, s.power_peak_w, s.time_to_throttle_s,
                   s.throttle_probability, int(s.adapted)),
)

TWIN_TABLES = (TWIN_PARAMS_TABLE, TWIN_FORECAST_TABLE)


def params_record(params: TwinParams) -> dict:
    d = dataclasses.asdict(params)
    d.pop("notes", None)
    return d


def _rows(db_path: str | Path, gpu_uuid: str, latest_only: bool) -> list[sqlite3.Row]:
    if not Path(db_path).exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    try:
        sql = ("SELECT * FROM twin_params WHERE gpu_uuid = ? ORDER BY t_wall_s"
               + (" DESC LIMIT 1" if latest_only else ""))
        return list(conn.execute(sql, (gpu_uuid,)))
    except sqlite3.OperationalError:  # no such table: nothing saved yet
        return []
    finally:
        conn.close()


def _constants(row: sqlite3.Row) -> AdaptedConstants | None:
    theta, var = json.loads(row["theta"]), json.loads(row["theta_var"])
    if len(theta) != N_THETA or len(var) != N_THETA:
        return None  # saved by a twin with other constants: not reloadable
    return AdaptedConstants(
        row["gpu_uuid"], row["gpu_name"], row["gpu_index"], row["t_wall_s"],
        row["t_monotonic_s"], row["base"], row["units"], tuple(theta), tuple(var),
        row["inlet_c"], row["samples"], row["excited_s"], row["teachings"],
        json.loads(row["rejected"]), json.loads(row["params"]))


def latest_constants(db_path: str | Path, gpu_uuid: str) -> AdaptedConstants | None:
    """The constants last saved for the GPU with this UUID, None if none."""
    rows = _rows(db_path, gpu_uuid, latest_only=True)
    return _constants(rows[0]) if rows else None


def constants_history(db_path: str | Path, gpu_uuid: str) -> list[AdaptedConstants]:
    """Every saved row of the GPU, oldest first."""
    return [c for c in map(_constants, _rows(db_path, gpu_uuid, latest_only=False)) if c]


def drift(history: list[AdaptedConstants]) -> dict[str, float]:
    """Each constant's latest value over its first saved value (1.0: unchanged)."""
    if not history:
        return {}
    first, last = history[0].values(), history[-1].values()
    return {k: (last[k] / first[k] if first[k] else float(np.inf if last[k] else 1.0))
            for k in first}


def saved_gpu_uuids(db_path: str | Path) -> list[str]:
    """The GPUs with constants saved in the database, for reading them back: unlike
    `gpu_uuids`, a file that is no database raises (sqlite3.Error), and one without the
    twin's table gives none rather than hiding the difference."""
    conn = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'twin_params'")
        if table.fetchone() is None:
            return []
        return [r[0] for r in conn.execute("SELECT DISTINCT gpu_uuid FROM twin_params")]
    finally:
        conn.close()


def gpu_uuids(db_path: str | Path) -> list[str]:
    if not Path(db_path).exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
    try:
        return [r[0] for r in conn.execute("SELECT DISTINCT gpu_uuid FROM twin_params")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
