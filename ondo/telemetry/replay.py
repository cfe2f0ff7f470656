"""Replay a recorded CSV trace (data/traces columns, or `ondo telemetry export` columns) as
`GpuSample(source="replay")`, at real speed, accelerated, or as fast as possible.

Sample timestamps are the trace's own times offset to the replay's start, at any speed, so
energies, rates and time fractions are the trace's; only the pacing changes with `speed`.
"""

from __future__ import annotations

import csv
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import GpuSample, stale_columns
from ondo.telemetry.trace_file import trace_lines

# column in the trace -> (column in GpuSample, factor to its unit)
TRACE_COLUMNS: dict[str, tuple[str, float]] = {
    "temp_c": ("temp_c", 1.0),
    "mem_temp_c": ("mem_temp_c", 1.0),
    "power_mw": ("power_w", 1e-3),
    "power_w": ("power_w", 1.0),
    "power_instant_mw": ("power_instant_w", 1e-3),
    "power_instant_w": ("power_instant_w", 1.0),
    "energy_mj": ("energy_j", 1e-3),
    "energy_j": ("energy_j", 1.0),
    "sm_mhz": ("sm_mhz", 1.0),
    "sm_max_mhz": ("sm_max_mhz", 1.0),
    "mem_mhz": ("mem_mhz", 1.0),
    "util": ("util_pct", 1.0),
    "util_pct": ("util_pct", 1.0),
    "mem_util_pct": ("mem_util_pct", 1.0),
}
_INT_COLUMNS = {"event_reasons": "throttle_reasons", "throttle_reasons": "throttle_reasons"}


def normalize_trace_row(row: dict[str, str]) -> tuple[float, dict[str, float | int]]:
    """(t_s, GpuSample values in W, °C, MHz, J) of one CSV row; empty cells are left out."""
    values: dict[str, float | int] = {}
    for name, text in row.items():
        if text is None or text == "":
            continue
        try:
            if name in TRACE_COLUMNS:
                column, factor = TRACE_COLUMNS[name]
                values[column] = float(text) * factor
            elif name in _INT_COLUMNS:
                values[_INT_COLUMNS[name]] = int(float(text))
        except (ValueError, OverflowError):
            raise ValueError(f"column {name!r}: {text!r} is not a number") from None
    t = row.get("t")
    try:
        return float(t), values  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"column 't': {t!r} is not a time in seconds") from None


def read_trace(path: str | Path) -> list[tuple[float, dict[str, float | int]]]:
    """Every row of the trace at `path`; ValueError naming the file (and the line) where its
    header has no time column `t` or a cell is not a number."""
    reader = csv.DictReader(trace_lines(path))
    header = reader.fieldnames or []
    if "t" not in header:
        raise ValueError(f"{path}: not a trace: its header has no time column 't' "
                         f"(columns: {', '.join(header) or 'none'})")
    rows = []
    for row in reader:
        try:
            rows.append(normalize_trace_row(row))
        except (TypeError, ValueError) as e:  # a missing or non-numeric cell
            raise ValueError(f"{path}: line {reader.line_num}: {e}") from None
    return rows


class ReplaySource:
    """Plays `path` into the hub; `speed` 1 is real time, 10 ten times faster, 0 or inf as fast
    as possible."""

    source_name = "replay"

    def __init__(
        self,
        hub: TelemetryHub,
        path: str | Path,
        speed: float = 1.0,
        gpu_index: int = 0,
        sm_max_mhz: float | None = None,
    ) -> None:
        if speed < 0 or math.isnan(speed):
            raise ValueError(f"speed must be >= 0 (0 or inf: as fast as possible), got {speed}")
        self.hub = hub
        self.rows = read_trace(path)
        self.speed = math.inf if speed == 0 else speed
        self.gpu_index = gpu_index
        self.sm_max_mhz = sm_max_mhz
        times = [t for t, _ in self.rows]
        gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
        self.period_s = gaps[len(gaps) // 2] if gaps else 0.0  # median poll interval
        self.produced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="ondo-telemetry-replay", daemon=True)

    def samples(self, start_monotonic_s: float, start_wall_s: float) -> Iterator[GpuSample]:
        previous: GpuSample | None = None
        t_first = self.rows[0][0] if self.rows else 0.0
        for t_s, values in self.rows:
            if self.sm_max_mhz is not None:
                values = {"sm_max_mhz": self.sm_max_mhz, **values}
            sample = GpuSample(
                gpu_index=self.gpu_index,
                source=self.source_name,
                t_monotonic_s=start_monotonic_s + (t_s - t_first),
                t_wall_s=start_wall_s + (t_s - t_first),
                period_s=self.period_s,
                read_latency_s=None,
                **values,  # type: ignore[arg-type]
            )
            sample = replace(sample, stale=stale_columns(previous, sample))
            previous = sample
            yield sample

    def run(self) -> int:
        """Play the whole trace (or until `stop()`) in this thread; returns samples published."""
        start_mono = time.monotonic()
        for sample in self.samples(start_mono, time.time()):
            if self._stop.is_set():
                break
            if math.isfinite(self.speed):
                due = start_mono + (sample.t_monotonic_s - start_mono) / self.speed
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
            self.produced += 1
            self.hub.publish(sample)
        return self.produced

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
