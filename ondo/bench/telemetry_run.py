"""The throughput benchmark with ondo's telemetry on: NVML sample rate and read latency,
the engine's slowdown, energy per output token, and a recorded trace of GPU and engine
columns on one clock."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import numpy as np

from ondo.bench.workloads import Workload


def run_with_telemetry(llm, workload: Workload, limits, hz: float, out_dir: str,
                       baseline_tps: float, run_ondo) -> dict[str, Any]:
    from ondo.telemetry.export import read_rows, write_csv
    from ondo.telemetry.pipeline import Telemetry

    db = os.path.join(out_dir, f"telemetry-{workload.name}-{int(hz)}hz.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    tel = Telemetry.start(db, source="nvml", hz=hz)
    try:
        row = run_ondo(llm, workload, limits, extra_listeners=[tel.engine.on_step])
    finally:
        tel.close()
    conn = sqlite3.connect(db)
    gpu = conn.execute(
        "SELECT t_monotonic_s, read_latency_s, energy_j, stale FROM gpu_samples ORDER BY t_monotonic_s"
    ).fetchall()
    steps = conn.execute("SELECT start_monotonic_s, end_monotonic_s FROM engine_steps "
                         "ORDER BY end_monotonic_s").fetchall()
    conn.close()
    t = np.array([g[0] for g in gpu])
    lat = np.array([g[1] for g in gpu if g[1] is not None])
    run_start, run_end = steps[0][0], steps[-1][1]
    inside = [(ti, e) for ti, _, e, _ in gpu if run_start <= ti <= run_end and e is not None]
    energy_j = inside[-1][1] - inside[0][1] if len(inside) > 1 else float("nan")
    covered_s = inside[-1][0] - inside[0][0] if len(inside) > 1 else float("nan")
    result = {
        "telemetry_hz": hz,
        "samples": len(gpu),
        "achieved_hz": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0,
        "read_latency_ms_p50": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
        "read_latency_ms_p99": float(np.percentile(lat, 99) * 1e3) if lat.size else None,
        "output_tokens_per_s": row["output_tokens_per_s"],
        "overhead_fraction": 1.0 - row["output_tokens_per_s"] / baseline_tps,
        # Energy over the part of the run the counter covers, scaled to the whole run.
        "energy_j": energy_j * (run_end - run_start) / covered_s if covered_s else float("nan"),
        "engine_steps": len(steps),
    }
    result["energy_per_output_token_j"] = result["energy_j"] / row["output_tokens"]
    columns, rows = read_rows(db)
    write_csv(columns, rows, os.path.join(out_dir, f"trace-{workload.name}-{int(hz)}hz.csv"))
    for suffix in ("", "-wal", "-shm"):  # the CSV holds it all; keep $OUT small
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    return result
