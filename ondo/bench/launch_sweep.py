"""What the launch-configuration sweeps (`bench/prefill_tiles.py`, `bench/kv_write_bench.py`)
share: timing a call on the CPU, and the JSON they print and write."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch


def cpu_ms(fn: Callable[[], object]) -> float:
    """One call's wall time (Triton's interpreter: no device events to time it by)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def write_sweep(benchmark: str, cuda: bool, results: list[dict], out: str | None) -> None:
    """Print the fastest configuration per step shape as one JSON line; write every row to `out`."""
    print(json.dumps({"benchmark": benchmark, "best": {r["shape"]: r["best"] for r in results}}))
    if out:
        summary = {"benchmark": benchmark, "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "date": time.strftime("%Y-%m-%d"), "shapes": results}
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=1)
