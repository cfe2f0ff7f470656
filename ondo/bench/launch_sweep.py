"""What the launch-configuration sweeps (`bench/prefill_tiles.py`, `bench/kv_write_bench.py`)
share: checking and timing one configuration, picking the fastest, and the JSON they print
and write."""

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


def time_config(row: dict, run: Callable[[], object], check: Callable[[], dict], cuda: bool) -> float | None:
    """`check()` (it runs the configuration once and returns what it computed against the
    reference, as fields of `row`), then the time of `run` in ms: Triton's `do_bench` on a
    GPU, one call's wall time elsewhere. A configuration that fails is a finding: its error
    goes into `row` and the result is None."""
    try:
        fields = check()
        if cuda:
            import triton.testing

            ms = float(triton.testing.do_bench(run))
        else:
            ms = cpu_ms(run)
    except Exception as e:  # noqa: BLE001 — a configuration the GPU cannot run is a finding
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        return None
    row.update(fields)
    return ms


def fastest(rows: list[dict], key: str) -> tuple[dict, dict | None]:
    """(the fastest timed row by `key`, the default configuration's row if it was timed)."""
    timed = [r for r in rows if key in r]
    return min(timed, key=lambda r: r[key]), next((r for r in timed if r["default"]), None)


def write_sweep(benchmark: str, cuda: bool, results: list[dict], out: str | None) -> None:
    """Print the fastest configuration per step shape as one JSON line; write every row to `out`."""
    print(json.dumps({"benchmark": benchmark, "best": {r["shape"]: r["best"] for r in results}}))
    if out:
        summary = {"benchmark": benchmark, "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "date": time.strftime("%Y-%m-%d"), "shapes": results}
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=1)
