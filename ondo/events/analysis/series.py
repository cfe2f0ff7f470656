"""A telemetry database's GPU and engine records, as samples and as series on one grid.

GPU readings come from the raw table and, for stretches already folded into 1 s aggregates,
from the aggregates (their means, at the middle of their second; a second counts as under a
throttle reason if any sample in it was). On the grid, a bin's GPU value is the mean of the
readings in it, and a bin without a reading holds the last one (a reading holds until the
next, as NVML's do). An engine step's tokens, FLOPs and bytes fall in the bin of its middle.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ondo.telemetry.schema import EngineSample, GpuSample

GPU_FIELDS = ("t_monotonic_s", "t_wall_s", "period_s", "temp_c", "mem_temp_c", "power_w",
              "power_instant_w", "energy_j", "sm_mhz", "sm_max_mhz", "throttle_reasons",
              "stale", "failed")
LOAD_SERIES = ("prefill_tokens", "decode_tokens", "flops", "bytes")
RESPONSE_SERIES = ("power_w", "temp_c", "sm_mhz")


@dataclass(frozen=True)
class Recording:
    gpu_index: int | None
    gpus: list[GpuSample]  # one GPU, time order
    steps: list[EngineSample]  # time order
    aggregated_until_s: float | None  # readings before this are 1 s aggregates


@dataclass(frozen=True)
class Grid:
    t_s: np.ndarray  # bin starts
    bin_s: float
    series: dict[str, np.ndarray]  # per bin: loads as per-second rates, responses as levels
    power_channel: str  # "power_instant_w" (fast) or "power_w" (NVML's ~1 s average)


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def read_recording(db: str | Path, gpu_index: int | None = None) -> Recording:
    if not Path(db).exists():
        raise FileNotFoundError(f"{db}: no such database")
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True, timeout=5.0)
    try:
        tables = _tables(conn)
        if "gpu_samples" not in tables and "engine_steps" not in tables:
            raise ValueError(f"{db}: not a telemetry database (no gpu_samples or engine_steps)")
        gpus: list[GpuSample] = []
        agg_until = None
        if "gpu_samples" in tables:
            indexes = [r[0] for r in conn.execute(
                "SELECT DISTINCT gpu_index FROM gpu_samples ORDER BY gpu_index")]
            if "gpu_samples_1s" in tables:
                indexes = sorted(set(indexes) | {r[0] for r in conn.execute(
                    "SELECT DISTINCT gpu_index FROM gpu_samples_1s")})
            if gpu_index is None and indexes:
                gpu_index = indexes[0]
            elif gpu_index is not None and gpu_index not in indexes:
                raise ValueError(f"--gpu {gpu_index}: the database has GPUs {indexes}")
            raw = conn.execute(f"SELECT {', '.join(GPU_FIELDS)} FROM gpu_samples "
                               "WHERE gpu_index = ? ORDER BY t_monotonic_s", (gpu_index,)).fetchall()
            first_raw = raw[0][0] if raw else float("inf")
            if "gpu_samples_1s" in tables:
                gpus += _aggregates(conn, gpu_index, first_raw)
                if gpus:
                    agg_until = min(first_raw, gpus[-1].t_monotonic_s + 0.5)
            gpus += [_gpu(gpu_index, r) for r in raw]
        steps: list[EngineSample] = []
        if "engine_steps" in tables:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(engine_steps)")]
            for r in conn.execute("SELECT * FROM engine_steps ORDER BY end_monotonic_s"):
                steps.append(EngineSample(**dict(zip(cols, r))))
    finally:
        conn.close()
    return Recording(gpu_index, gpus, steps, agg_until)


def _names(text: str | None) -> frozenset[str]:
    return frozenset(x for x in (text or "").split(",") if x)


def _gpu(index: int, r: tuple) -> GpuSample:
    v = dict(zip(GPU_FIELDS, r))
    return GpuSample(index, "db", v["t_monotonic_s"], v["t_wall_s"], v["period_s"] or 0.0, None,
                     temp_c=v["temp_c"], mem_temp_c=v["mem_temp_c"], power_w=v["power_w"],
                     power_instant_w=v["power_instant_w"], energy_j=v["energy_j"],
                     sm_mhz=v["sm_mhz"], sm_max_mhz=v["sm_max_mhz"],
                     throttle_reasons=v["throttle_reasons"], stale=_names(v["stale"]),
                     failed=_names(v["failed"]))


def _aggregates(conn: sqlite3.Connection, index: int, before_s: float) -> list[GpuSample]:
    cols = ("temp_c", "mem_temp_c", "power_w", "power_instant_w", "energy_j", "sm_mhz",
            "sm_max_mhz")
    rows = conn.execute(
        f"SELECT t_s, t_wall_s, throttle_reasons_any, {', '.join(c + '_mean' for c in cols)} "
        "FROM gpu_samples_1s WHERE gpu_index = ? AND t_s + 1 <= ? ORDER BY t_s",
        (index, before_s)).fetchall()
    return [GpuSample(index, "db-1s", t_s + 0.5, wall, 1.0, None, throttle_reasons=reasons,
                      **dict(zip(cols, means)))
            for t_s, wall, reasons, *means in rows]


def _held_means(t: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per bin the mean of the readings in it; empty bins hold the previous bin's value."""
    ok = np.isfinite(values)
    t, values = t[ok], values[ok]
    n = len(edges) - 1
    if not len(t):
        return np.full(n, np.nan)
    b = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n - 1)
    sums = np.bincount(b, weights=values, minlength=n)
    counts = np.bincount(b, minlength=n)
    out = np.full(n, np.nan)
    has = counts > 0
    out[has] = sums[has] / counts[has]
    last = np.maximum.accumulate(np.where(has, np.arange(n), -1))
    held = np.where(last >= 0, out[np.maximum(last, 0)], np.nan)
    first = np.flatnonzero(has)[0]
    held[:first] = out[first]  # before the first reading: the first reading
    return held


# The most bins a series may have (each is a few floats per series).
MAX_BINS = 10_000_000


def on_grid(rec: Recording, bin_s: float) -> Grid:
    """Load and response series of `rec` on bins of `bin_s` seconds over the whole record."""
    times = [s.t_monotonic_s for s in rec.gpus[:1] + rec.gpus[-1:]]
    times += [x for s in rec.steps[:1] + rec.steps[-1:] for x in (s.start_monotonic_s,
                                                                 s.end_monotonic_s)]
    if not times:
        raise ValueError("the database holds no GPU sample and no engine step")
    t0, t1 = min(times), max(times)
    n = max(int(np.ceil((t1 - t0) / bin_s)), 1)
    if n > MAX_BINS:  # a bin far finer than the samples: memory, not insight
        raise ValueError(f"--bin-s {bin_s:g} makes {n:,} bins over the record's {t1 - t0:.1f} s; "
                         f"at most {MAX_BINS:,}: give a larger --bin-s")
    edges = t0 + bin_s * np.arange(n + 1)
    series: dict[str, np.ndarray] = {}
    mid = np.array([(s.start_monotonic_s + s.end_monotonic_s) / 2 for s in rec.steps])
    b = np.clip(np.searchsorted(edges, mid, side="right") - 1, 0, n - 1) if len(mid) else mid
    for name, attr in (("prefill_tokens", "num_prefill_tokens"),
                       ("decode_tokens", "num_decode_tokens"), ("flops", "flops"),
                       ("bytes", "bytes_moved")):
        w = np.array([getattr(s, attr) for s in rec.steps], dtype=float)
        series[name] = (np.bincount(b.astype(int), weights=w, minlength=n) / bin_s
                        if len(w) else np.zeros(n))
    t = np.array([s.t_monotonic_s for s in rec.gpus], dtype=float)

    def column(attr: str) -> np.ndarray:
        return np.array([np.nan if (v := getattr(s, attr)) is None else v for s in rec.gpus],
                        dtype=float)

    fast = column("power_instant_w")
    channel = "power_instant_w" if len(fast) and np.isfinite(fast).mean() > 0.5 else "power_w"
    for name, attr in (("power_w", channel), ("temp_c", "temp_c"),
                       ("mem_temp_c", "mem_temp_c"), ("sm_mhz", "sm_mhz")):
        series[name] = _held_means(t, column(attr), edges) if len(t) else np.full(n, np.nan)
    return Grid(edges[:-1], bin_s, series, channel)
