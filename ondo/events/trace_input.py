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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ondo.telemetry.replay import TRACE_COLUMNS
from ondo.telemetry.schema import (
    ENGINE_COLUMNS,
    GPU_VALUE_COLUMNS,
    REFRESHED_COLUMNS,
    EngineSample,
    GpuSample,
)
from ondo.telemetry.trace_file import trace_lines
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


def _rows(path: Path) -> tuple[list[int], list[list[str]]]:
    """(line numbers, rows), the header first; blank lines left out."""
    lines: list[int] = []
    rows: list[list[str]] = []
    reader = csv.reader(trace_lines(path))
    for row in reader:
        if row:
            lines.append(reader.line_num)
            rows.append(row)
    return lines, rows


class _Columns:
    """Column-wise parsing (numpy does the numbers) that still names the line and column of
    the first value it cannot take."""

    def __init__(self, path: Path, header: list[str], lines: list[int],
                 rows: list[list[str]]) -> None:
        self.path, self.header = path, header
        self.index = {name: i for i, name in enumerate(header)}
        self.lines, self.rows = lines, rows

    def fail(self, line: int, message: str) -> TraceError:
        return TraceError(f"{self.path}: line {line}: {message}")

    def check_width(self) -> None:
        width = len(self.header)
        for line, row in zip(self.lines, self.rows):
            if len(row) != width:
                raise self.fail(line, f"{len(row)} fields where the header has {width} "
                                      "(a truncated or malformed line)")

    def group(self, which: list[int]) -> dict[str, tuple[str, ...]]:
        """The rows `which`, column by column (one transposition, done in C)."""
        cols = list(zip(*(self.rows[k] for k in which))) if which else []
        return {name: cols[i] for name, i in self.index.items()} if cols else {}

    def floats(self, name: str, which: list[int], group: dict[str, tuple[str, ...]],
               required: bool = False, whole: bool = False) -> list:
        """The column's values on rows `which` (`group`: those rows by column): floats, ints
        with `whole`, None where empty."""
        texts = group.get(name)
        if texts is None:
            return [None] * len(which)
        arr = np.array(texts)
        empty = arr == ""
        try:
            x = np.where(empty, "nan", arr).astype(float)
        except ValueError:
            for k, t in zip(which, texts):
                try:
                    float(t or "nan")
                except ValueError:
                    raise self.fail(self.lines[k], f"column {name!r}: {t!r} is not a number") \
                        from None
            raise
        bad = ~np.isfinite(x) & ~empty
        if required:
            bad |= empty
        if whole:
            bad |= np.isfinite(x) & (x != np.floor(x))
        if bad.any():
            k = which[int(np.flatnonzero(bad)[0])]
            text = self.rows[k][self.index[name]]
            what = "empty" if text == "" else (
                "not a whole number" if whole and np.isfinite(float(text)) else
                "not a finite number")
            raise self.fail(self.lines[k], f"column {name!r}: {text!r} is {what}")
        if not empty.any():
            return x.astype(np.int64).tolist() if whole else x.tolist()
        flags = empty.tolist()
        return [None if e else (int(v) if whole else v) for v, e in zip(x.tolist(), flags)]

    def check_time(self, t: list[float], which: list[int]) -> None:
        d = np.diff(np.asarray(t, dtype=float))
        back = np.flatnonzero(d < 0)
        if len(back):
            j = int(back[0]) + 1
            raise self.fail(self.lines[which[j]],
                            f"column 't': time goes backwards ({t[j]} after {t[j - 1]})")


def read_trace_records(path: str | Path, sm_max_mhz: float = 1980.0,
                       gpu_index: int = 0) -> TraceRecords:
    """All records of the trace at `path`, checked; TraceError (naming the line) otherwise.
    `sm_max_mhz`, `gpu_index`: for NVML traces, which do not record them."""
    path = Path(path)
    try:
        lines, rows = _rows(path)
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read it: {e}") from None
    except ValueError as e:  # damaged on the way (trace_lines names the file)
        raise TraceError(str(e)) from None
    except csv.Error as e:
        raise TraceError(f"{path}: malformed CSV: {e}") from None
    if not rows:
        raise TraceError(f"{path}: line 1: the file is empty (a CSV header is expected)")
    header = [h.strip() for h in rows[0]]
    c = _Columns(path, header, lines[1:], rows[1:])
    export = "kind" in header
    required = EXPORT_REQUIRED if export else NVML_REQUIRED
    missing = [name for name in required if name not in header]
    if missing:
        raise c.fail(1, f"not a trace this reader knows: the header lacks {missing}"
                        + ("" if export else " (an NVML trace) or 'kind' (an ondo telemetry "
                                             "export)"))
    if not c.rows:
        raise TraceError(f"{path}: no rows after the header")
    c.check_width()
    records, phase_load = _read_export(c) if export else _read_nvml(c, sm_max_mhz, gpu_index)
    gpu_rows = sum(isinstance(r, GpuSample) for r in records)
    return TraceRecords(str(path), "export" if export else "nvml", records, phase_load,
                        gpu_rows, len(records) - gpu_rows)


_FROZEN: dict[tuple[str, ...], frozenset[str]] = {}


def _names(text: str) -> frozenset[str]:
    key = tuple(x for x in text.split(",") if x) if text else ()
    names = _FROZEN.get(key)
    if names is None:
        names = _FROZEN[key] = frozenset(key)
    return names


def _read_nvml(c: _Columns, sm_max_mhz: float, gpu_index: int):
    which = list(range(len(c.rows)))
    group = c.group(which)
    t = c.floats("t", which, group, required=True)
    c.check_time(t, which)
    values: dict[str, list] = {}
    for name, (field, factor) in TRACE_COLUMNS.items():
        if name in c.index:
            col = c.floats(name, which, group)
            values[field] = [None if v is None else v * factor for v in col]
    values["throttle_reasons"] = c.floats("event_reasons", which, group, required=True,
                                          whole=True)
    if "sm_max_mhz" not in values:
        values["sm_max_mhz"] = [sm_max_mhz] * len(which)
    phase_load: dict[int, tuple[float, float]] = {}
    i_phase = c.index.get("phase")
    if i_phase is not None:
        loads: dict[str, tuple[float, float]] = {}
        for k, row in enumerate(c.rows):
            label = row[i_phase]
            if label not in loads:
                try:
                    loads[label] = load_from_phase(label)
                except ValueError as e:
                    raise c.fail(c.lines[k], f"column 'phase': {e}") from None
            phase_load[k] = loads[label]
    gaps = np.diff(np.asarray(t))
    period_s = float(np.sort(gaps)[len(gaps) // 2]) if len(gaps) else 0.0
    # A power or energy reading equal to the previous row's was not refreshed (NVML's own
    # update is ~100 ms): marked stale, as the NVML source marks it.
    stale_by_row: list[list[str]] = [[] for _ in which]
    for name in REFRESHED_COLUMNS:
        col = values.get(name)
        if col is None:
            continue
        for k in range(1, len(col)):
            if col[k] is not None and col[k] == col[k - 1]:
                stale_by_row[k].append(name)
    columns = [values.get(name, [None] * len(which)) for name in GPU_VALUE_COLUMNS]
    records: list[GpuSample | EngineSample] = [
        GpuSample(gpu_index, "replay", tk, tk, period_s, None, *vals,
                  _names(",".join(stale)), frozenset())
        for tk, stale, *vals in zip(t, stale_by_row, *columns)]
    return records, phase_load


def _read_export(c: _Columns):
    i_kind = c.index["kind"]
    gpu_rows, engine_rows = [], []
    for k, row in enumerate(c.rows):
        kind = row[i_kind]
        if kind == "gpu":
            gpu_rows.append(k)
        elif kind == "engine":
            engine_rows.append(k)
        else:
            raise c.fail(c.lines[k], f"column 'kind': {kind!r} is neither 'gpu' nor 'engine'")
    every = list(range(len(c.rows)))
    c.check_time(c.floats("t", every, {"t": tuple(r[c.index["t"]] for r in c.rows)},
                          required=True), every)
    records: list[tuple[int, GpuSample | EngineSample]] = []
    if gpu_rows:
        g = c.group(gpu_rows)
        mono = c.floats("t_monotonic_s", gpu_rows, g, required=True)
        wall = c.floats("t_wall_s", gpu_rows, g)
        period = c.floats("period_s", gpu_rows, g)
        latency = c.floats("read_latency_s", gpu_rows, g)
        index = c.floats("gpu_index", gpu_rows, g, whole=True)
        columns = [c.floats(name, gpu_rows, g, whole=name in _INT_GPU)
                   for name in GPU_VALUE_COLUMNS]
        empty = ("",) * len(gpu_rows)
        stale, failed = g.get("stale", empty), g.get("failed", empty)
        records += [
            (k, GpuSample(i or 0, "replay", m, m if w is None else w, p or 0.0, lat, *vals,
                          _names(st), _names(fa)))
            for k, i, m, w, p, lat, st, fa, *vals
            in zip(gpu_rows, index, mono, wall, period, latency, stale, failed, *columns)]
    if engine_rows:
        missing = [name for name in ENGINE_COLUMNS if name not in c.index]
        if missing:
            raise c.fail(c.lines[engine_rows[0]], f"an engine row, but the header lacks {missing}")
        e = c.group(engine_rows)
        columns = [c.floats(name, engine_rows, e, required=True, whole=name in _INT_ENGINE)
                   for name in ENGINE_COLUMNS]
        records += [(k, EngineSample(*vals)) for k, *vals in zip(engine_rows, *columns)]
    records.sort(key=lambda kr: kr[0])  # file order
    return [r for _, r in records], {}
