"""How long does `ondo events replay` take on an hour of telemetry?

Synthesises a trace in ondo's export format (`kind` gpu / engine rows on one clock): one GPU
polled at 20 Hz for an hour (72,000 rows) and the engine's steps while it serves (25 Hz in
the load phases), in 60 s cycles of 20 s idle and 40 s load with a prefill burst every 10 s
that pushes the GPU onto its power cap for 0.6 s, a KV cache that fills towards the end of
each load phase, a waiting queue at its start and a preemption. Then runs
`python3 -m ondo events replay` on it in fresh processes (twice: the head hashes must match)
and prints a table and one JSON line. Target: under 10 s on a 2-core CPU.

    python3 bench/events_replay.py [--seconds 3600] [--hz 20] [--runs 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ondo.telemetry.export import ENGINE_EXPORT_COLUMNS, GPU_EXPORT_COLUMNS, LEAD_COLUMNS, write_csv

T0_S = 1000.0
WALL0_S = 1.8e9
CYCLE_S, IDLE_S, BURST_EVERY_S, BURST_S, CAP_AFTER_S = 60.0, 20.0, 10.0, 0.6, 0.4
STEP_EVERY_S, STEP_S = 0.04, 0.035
KV_TOTAL = 20_000


def _phase(t: float) -> tuple[bool, float]:
    """(serving?, seconds since the last burst began) at trace time t."""
    c = t % CYCLE_S
    if c < IDLE_S:
        return False, math.inf
    return True, (c - IDLE_S) % BURST_EVERY_S


def gpu_rows(seconds: float, hz: float) -> list[dict]:
    rows, power_avg, temp, energy = [], 120.0, 35.0, 50_000.0
    dt = 1.0 / hz
    for i in range(int(seconds * hz)):
        t = i * dt
        load, since_burst = _phase(t)
        capped = load and CAP_AFTER_S <= since_burst < BURST_S + CAP_AFTER_S
        power = (700.0 if since_burst < BURST_S + CAP_AFTER_S else 560.0) if load else 120.0
        power += 4.0 * math.sin(7.0 * t)
        power_avg += (power - power_avg) * dt / 1.0
        temp += (35.0 + 0.05 * power - temp) * dt / 20.0
        energy += power * dt
        rows.append({
            "kind": "gpu", "t_monotonic_s": T0_S + t, "t_wall_s": WALL0_S + t, "gpu_index": 0,
            "source": "sim", "period_s": dt, "read_latency_s": 0.004,
            "temp_c": float(round(temp)), "mem_temp_c": float(round(temp + 3.0)),
            "power_w": round(power_avg, 3), "power_instant_w": round(power, 3),
            "energy_j": round(energy, 3), "sm_mhz": 1500.0 if capped else 1980.0,
            "sm_max_mhz": 1980.0, "mem_mhz": 2619.0,
            "throttle_reasons": (0x4 if capped else 0) | (0 if load else 0x1),
            "util_pct": 100.0 if load else 0.0, "stale": "", "failed": ""})
    return rows


def engine_rows(seconds: float) -> list[dict]:
    rows, i, swapped = [], 0, 0
    for k in range(int(seconds / STEP_EVERY_S)):
        end = k * STEP_EVERY_S + STEP_S
        load, since_burst = _phase(end)
        if not load:
            continue
        c = end % CYCLE_S - IDLE_S
        prefill = 8192 if since_burst < BURST_S else (512 if k % 10 == 0 else 0)
        decode = 256
        used = int(KV_TOTAL * min(0.5 + c / 38.0, 0.99))
        preempt = 1 if 38.0 <= c < 38.0 + STEP_EVERY_S else 0
        swapped += 64 * preempt
        if c < STEP_EVERY_S:
            swapped = 0
        flops = 2 * 0.6e9 * (prefill + decode)
        moved = 1.2e9 + 4e5 * used
        rows.append({
            "kind": "engine", "t_monotonic_s": T0_S + end, "step_index": i,
            "start_monotonic_s": T0_S + end - STEP_S, "end_monotonic_s": T0_S + end,
            "t_wall_s": WALL0_S + end, "num_prefill_tokens": prefill, "num_decode_tokens": decode,
            "num_output_tokens": decode, "batch_size": decode + (prefill > 0),
            "num_kv_blocks_used": used, "num_kv_blocks_total": KV_TOTAL,
            "num_swapped_blocks": swapped, "num_preemptions": preempt,
            "num_waiting": 40 if c < 3.0 else 0, "num_running": decode, "num_swapped": 0,
            "flops": flops, "bytes_moved": moved,
            "compute_activity": min(flops / STEP_S / 989e12, 1.0),
            "memory_activity": min(moved / STEP_S / 3.35e12, 1.0), "source": "engine"})
        i += 1
    return rows


def write_synthetic_trace(path: str | Path, seconds: float = 3600.0, hz: float = 20.0) -> dict:
    rows = gpu_rows(seconds, hz) + engine_rows(seconds)
    rows.sort(key=lambda r: (r["t_monotonic_s"], r["kind"] == "engine"))
    for r in rows:
        r["t"] = r["t_monotonic_s"] - T0_S
    columns = list(LEAD_COLUMNS) + list(GPU_EXPORT_COLUMNS) + list(ENGINE_EXPORT_COLUMNS)
    write_csv(columns, rows, path)
    gpu = sum(r["kind"] == "gpu" for r in rows)
    return {"gpu_rows": gpu, "engine_rows": len(rows) - gpu}


def replay_once(trace: Path, db: Path) -> tuple[float, float, dict]:
    """(wall s, CPU s of the process: user + system, all threads, summary) of one replay."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ondo", "--log-level", "WARNING", "events",
                          "replay", "--trace", str(trace), "--db", str(db), "--overwrite"],
                         capture_output=True, text=True, env=env, check=True)
    wall_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall_s, cpu_s, json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep", default=None, help="keep the trace and databases here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / "synthetic_trace.csv"
        t0 = time.perf_counter()
        counts = write_synthetic_trace(trace, args.seconds, args.hz)
        synth_s = time.perf_counter() - t0
        runs = []
        for k in range(args.runs):
            load = os.getloadavg()[0]
            wall_s, cpu_s, summary = replay_once(trace, folder / f"replay{k}.db")
            runs.append({"run": k, "wall_s": wall_s, "cpu_s": cpu_s,
                         "in_process_s": summary["elapsed_s"], "load_avg_1min": load,
                         "events": summary["events"], "head_hash": summary["head_hash"],
                         "by_kind": summary["by_kind"]})
    same = len({r["head_hash"] for r in runs}) == 1
    print(f"trace: {args.seconds:.0f} s at {args.hz:g} Hz: {counts['gpu_rows']} GPU rows, "
          f"{counts['engine_rows']} engine rows ({synth_s:.1f} s to write); cores: {os.cpu_count()}")
    print(f"{'run':>4} {'wall s':>8} {'CPU s':>7} {'in-process s':>13} {'load':>5} "
          f"{'events':>7}  head hash")
    for r in runs:
        print(f"{r['run']:>4} {r['wall_s']:>8.2f} {r['cpu_s']:>7.2f} {r['in_process_s']:>13.2f} "
              f"{r['load_avg_1min']:>5.1f} {r['events']:>7}  {r['head_hash'][:16]}")
    print("(wall: the whole command, interpreter start and imports included; CPU: the process's "
          "user + system time, all threads; load: the machine's 1 min load average before it)")
    print(f"same head hash on every run: {same}")
    print(json.dumps({"bench": "events_replay", "seconds": args.seconds, "hz": args.hz,
                      "cpu_count": os.cpu_count(), **counts, "runs": runs,
                      "same_head_hash": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
