"""A recorded trace as the records the detectors read, checked line by line.

Two formats (data/traces/README.md):
- NVML traces: one GPU reading per row (`t`, `phase`, `temp_c`, `power_mw`, `energy_mj`,
  `sm_mhz`, `event_reasons`, ...). `t` is the monotonic time and, there being no wall
  clock in the file, the wall time too; the sampling period is the median interval;
  power and energy readings equal to the previous row's are marked stale, as the NVML
  source marks them; the `phase` labels give the load (in the twin's units).
- ondo's telemetry export (`ondo telemetry export`): `kind` gpu / engine rows on one clock,
  with each sample's own monotonic and wall times, period, stale and failed fields.

The whole file is read and checked before anything is replayed: a malformed or truncated
file raises `TraceError` naming the line and the column, and nothing has been written.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ondo.telemetry.replay import TRACE_COLUMNS
from ondo.telemetry.schema import (
    ENGINE_COLUMNS,
    GPU_VALUE_COLUMNS,
    REFRESHED_COLUMNS,
    EngineSample,
    GpuSample,
)
from ondo.twin.traces import load_from_phase

NVML_REQUIRED = ("t", "temp_c", "sm_mhz", "event_reasons")
EXPORT_REQUIRED = ("t", "kind", "t_monotonic_s")
_INT_GPU = {"throttle_reasons", "mem_used_bytes"}
_INT_ENGINE = {c for c in ENGINE_COLUMNS
               if c.startswith("num_") or c in ("step_index", "batch_size")}


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file, line and column."""


@dataclass(frozen=True)
class TraceRecords:
    path: str
    format: str  # "nvml" or "export"
    records: list[GpuSample | EngineSample]  # in file order (time order)
    # NVML traces: the load each GPU row was running, (compute, memory) in the twin's units.
    phase_load: dict[int, tuple[float, float]]  # by index into `records`
    gpu_rows: int
    engine_rows: int


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            yield reader.line_num, row


class _Line:
    """Number parsing that names the line and column of what it cannot parse."""

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path, self.header = path, header
        self.line = 1

    def fail(self, message: str) -> TraceError:
        return TraceError(f"{self.path}: line {self.line}: {message}")

    def num(self, row: list[str], i: int) -> float:
        text = row[i]
        try:
            x = float(text)
        except ValueError:
            raise self.fail(f"column {self.header[i]!r}: {text!r} is not a number") from None
        if not math.isfinite(x):
            raise self.fail(f"column {self.header[i]!r}: {text!r} is not a finite number")
        return x

    def opt(self, row: list[str], i: int | None) -> float | None:
        return None if i is None or row[i] == "" else self.num(row, i)

    def int_(self, row: list[str], i: int) -> int:
        x = self.num(row, i)
        if x != int(x):
            raise self.fail(f"column {self.header[i]!r}: {row[i]!r} is not a whole number")
        return int(x)


def read_trace_records(path: str | Path, sm_max_mhz: float = 1980.0,
                       gpu_index: int = 0) -> TraceRecords:
    """All records of the trace at `path`, checked; TraceError (naming the line) otherwise.
    `sm_max_mhz`, `gpu_index`: for NVML traces, which do not record them."""
    path = Path(path)
    try:
        rows = _rows(path)
        first = next(rows, None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TraceError(f"{path}: cannot read it: {e}") from None
    if first is None or not first[1]:
        raise TraceError(f"{path}: line 1: the file is empty (a CSV header is expected)")
    header = [h.strip() for h in first[1]]
    p = _Line(path, header)
    try:
        if "kind" in header:
            missing = [c for c in EXPORT_REQUIRED if c not in header]
            if missing:
                raise p.fail(f"the header lacks {missing}")
            out = _read_export(p, rows)
        else:
            missing = [c for c in NVML_REQUIRED if c not in header]
            if missing:
                raise p.fail(f"not a trace this reader knows: the header lacks {missing} "
                             "(an NVML trace) or 'kind' (an ondo telemetry export)")
            out = _read_nvml(p, rows, sm_max_mhz, gpu_index)
    except csv.Error as e:
        raise p.fail(f"malformed CSV: {e}") from None
    except UnicodeDecodeError as e:
        raise p.fail(f"not text: {e}") from None
    records, phase_load = out
    gpu_rows = sum(isinstance(r, GpuSample) for r in records)
    if not records:
        raise TraceError(f"{path}: no rows after the header")
    return TraceRecords(str(path), "export" if "kind" in header else "nvml", records,
                        phase_load, gpu_rows, len(records) - gpu_rows)


def _check_width(p: _Line, row: list[str]) -> None:
    if len(row) != len(p.header):
        raise p.fail(f"{len(row)} fields where the header has {len(p.header)} "
                     "(a truncated or malformed line)")


def _check_time(p: _Line, t: float, last_t: float) -> None:
    if t < last_t:
        raise p.fail(f"column 't': time goes backwards ({t} after {last_t})")


def _read_nvml(p: _Line, rows, sm_max_mhz: float, gpu_index: int):
    h = {name: i for i, name in enumerate(p.header)}
    columns = [(h[name], field, factor) for name, (field, factor) in TRACE_COLUMNS.items()
               if name in h]
    i_t, i_reasons, i_phase = h["t"], h["event_reasons"], h.get("phase")
    parsed: list[tuple[float, dict, tuple[float, float] | None]] = []
    last_t = -math.inf
    for line, row in rows:
        p.line = line
        if not row:
            continue
        _check_width(p, row)
        t = p.num(row, i_t)
        _check_time(p, t, last_t)
        last_t = t
        values: dict = {field: p.num(row, i) * factor for i, field, factor in columns
                        if row[i] != ""}
        values["throttle_reasons"] = p.int_(row, i_reasons)
        values.setdefault("sm_max_mhz", sm_max_mhz)
        load = None
        if i_phase is not None:
            try:
                load = load_from_phase(row[i_phase])
            except ValueError as e:
                raise p.fail(f"column 'phase': {e}") from None
        parsed.append((t, values, load))
    times = [t for t, _, _ in parsed]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    period_s = gaps[len(gaps) // 2] if gaps else 0.0
    records: list[GpuSample | EngineSample] = []
    phase_load: dict[int, tuple[float, float]] = {}
    previous: dict | None = None
    for t, values, load in parsed:
        stale = frozenset(
            c for c in REFRESHED_COLUMNS
            if previous is not None and c in values and values[c] == previous.get(c))
        previous = values
        if load is not None:
            phase_load[len(records)] = load
        records.append(GpuSample(gpu_index, "replay", t, t, period_s, None, stale=stale,
                                 **values))
    return records, phase_load


def _names(text: str) -> frozenset[str]:
    return frozenset(x for x in text.split(",") if x) if text else frozenset()


def _read_export(p: _Line, rows):
    h = {name: i for i, name in enumerate(p.header)}
    i_t, i_kind, i_mono = h["t"], h["kind"], h["t_monotonic_s"]
    gpu_cols = [(h[c], c, c in _INT_GPU) for c in GPU_VALUE_COLUMNS if c in h]
    engine_missing = [c for c in ENGINE_COLUMNS if c not in h]
    engine_cols = [(h[c], c, c in _INT_ENGINE) for c in ENGINE_COLUMNS if c in h]
    i_gpu, i_wall, i_period = h.get("gpu_index"), h.get("t_wall_s"), h.get("period_s")
    i_lat, i_stale, i_failed = h.get("read_latency_s"), h.get("stale"), h.get("failed")
    records: list[GpuSample | EngineSample] = []
    last_t = -math.inf
    for line, row in rows:
        p.line = line
        if not row:
            continue
        _check_width(p, row)
        t = p.num(row, i_t)
        _check_time(p, t, last_t)
        last_t = t
        kind = row[i_kind]
        if kind == "gpu":
            values = {}
            for i, name, is_int in gpu_cols:
                if row[i] != "":
                    values[name] = p.int_(row, i) if is_int else p.num(row, i)
            mono = p.num(row, i_mono)
            records.append(GpuSample(
                gpu_index=p.int_(row, i_gpu) if i_gpu is not None and row[i_gpu] else 0,
                source="replay", t_monotonic_s=mono,
                t_wall_s=p.opt(row, i_wall) if i_wall is not None and row[i_wall] else mono,
                period_s=p.opt(row, i_period) or 0.0,
                read_latency_s=p.opt(row, i_lat),
                stale=_names(row[i_stale]) if i_stale is not None else frozenset(),
                failed=_names(row[i_failed]) if i_failed is not None else frozenset(),
                **values))
        elif kind == "engine":
            if engine_missing:
                raise p.fail(f"an engine row, but the header lacks {engine_missing}")
            fields = {}
            for i, name, is_int in engine_cols:
                if row[i] == "":
                    raise p.fail(f"column {name!r}: empty in an engine row")
                fields[name] = p.int_(row, i) if is_int else p.num(row, i)
            records.append(EngineSample(**fields))
        else:
            raise p.fail(f"column 'kind': {kind!r} is neither 'gpu' nor 'engine'")
    return records, {}
