"""How fast can ondo's NVML source poll, and what does each read cost?

For each rate (default 20 and 100 Hz) runs the real NvmlSource for N seconds on every GPU and
reports the achieved sample rate per GPU, read latency percentiles, failed reads and the share
of samples whose power / energy NVML had not refreshed. Prints a table and one JSON line.
Without NVML or a GPU it says so and exits 0.

    python3 bench/telemetry_overhead.py --seconds 10 --hz 20 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.nvml_source import NvmlSource, NvmlUnavailable, open_nvml
from ondo.telemetry.schema import GpuSample


def measure(hz: float, seconds: float) -> list[dict]:
    hub = TelemetryHub()
    sub = hub.subscribe(maxsize=1_000_000, kinds=(GpuSample,))
    source = NvmlSource(hub, hz=hz)
    source.start()
    time.sleep(seconds)
    source.stop()
    samples: list[GpuSample] = sub.queue.drain()
    rows = []
    for dev in source.devices:
        mine = [s for s in samples if s.gpu_index == dev.index]
        t = np.array([s.t_monotonic_s for s in mine])
        lat_ms = np.array([s.read_latency_s for s in mine]) * 1e3
        span_s = t[-1] - t[0] if len(t) > 1 else float("nan")
        rows.append({
            "hz_requested": hz,
            "gpu": dev.index,
            "samples": len(mine),
            "hz_achieved": (len(mine) - 1) / span_s if len(mine) > 1 else 0.0,
            "read_ms_p50": float(np.percentile(lat_ms, 50)) if len(mine) else None,
            "read_ms_p99": float(np.percentile(lat_ms, 99)) if len(mine) else None,
            "read_ms_max": float(lat_ms.max()) if len(mine) else None,
            "failed_fields": sum(len(s.failed) for s in mine),
            "stale_power_pct": 100.0 * np.mean(["power_w" in s.stale for s in mine]),
            "stale_energy_pct": 100.0 * np.mean(["energy_j" in s.stale for s in mine]),
            "unsupported": sorted(dev.unsupported),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hz", type=float, nargs="+", default=[20.0, 100.0])
    args = parser.parse_args(argv)
    try:
        open_nvml()
    except NvmlUnavailable as e:
        print(f"NVML is unavailable ({e}); nothing to measure on this machine.")
        print(json.dumps({"bench": "telemetry_overhead", "nvml": False, "reason": str(e)}))
        return 0
    rows = [r for hz in args.hz for r in measure(hz, args.seconds)]
    cols = ["hz_requested", "gpu", "samples", "hz_achieved", "read_ms_p50", "read_ms_p99",
            "read_ms_max", "failed_fields", "stale_power_pct", "stale_energy_pct"]
    print(" ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>16.3f}" if isinstance(r[c], float) else f"{r[c]!s:>16}" for c in cols))
    print(json.dumps({"bench": "telemetry_overhead", "nvml": True, "seconds": args.seconds,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
