"""NVML trace files (data/traces/*.csv) as arrays, and the load each row was running."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ondo.telemetry.trace_file import trace_lines


@dataclass(frozen=True)
class Trace:
    name: str
    t_s: np.ndarray
    phase: list[str]
    temp_c: np.ndarray
    mem_temp_c: np.ndarray
    power_w: np.ndarray  # NVML's ~1 s average
    power_fast_w: np.ndarray  # instantaneous channel, else energy-counter differences
    energy_j: np.ndarray
    sm_mhz: np.ndarray
    throttle_reasons: np.ndarray
    compute_activity: np.ndarray  # as labelled by the host (not delayed)
    memory_activity: np.ndarray
    # "plant": 1.0 = a full matmul / device copy (the phase labels); "engine": ondo's load
    # descriptor, achieved rate over spec peak, mapped by ondo.twin.engine_load.
    load_units: Literal["plant", "engine"] = "plant"

    def __len__(self) -> int:
        return len(self.t_s)

    def window(self, start_s: float, stop_s: float) -> Trace:
        keep = (self.t_s >= start_s) & (self.t_s < stop_s)
        idx = np.flatnonzero(keep)
        return Trace(
            name=f"{self.name}[{start_s:g}:{stop_s:g}]",
            phase=[self.phase[i] for i in idx],
            load_units=self.load_units,
            **{k: getattr(self, k)[idx] for k in _ARRAYS},
        )

    def load_at(self, t_s, delay_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Load the GPU runs at times t_s: the host label delay_s earlier (zero-order hold)."""
        i = np.searchsorted(self.t_s, np.asarray(t_s) - delay_s, side="right") - 1
        i = np.clip(i, 0, len(self.t_s) - 1)
        return self.compute_activity[i], self.memory_activity[i]


_ARRAYS = (
    "t_s",
    "temp_c",
    "mem_temp_c",
    "power_w",
    "power_fast_w",
    "energy_j",
    "sm_mhz",
    "throttle_reasons",
    "compute_activity",
    "memory_activity",
)


def load_from_phase(phase: str) -> tuple[float, float]:
    """(compute_activity, memory_activity) for a phase label of the shared traces."""
    if phase.startswith("idle"):
        return 0.0, 0.0
    if phase in ("load", "mm"):
        return 1.0, 0.0
    if phase == "copy":
        return 0.0, 1.0
    if phase.startswith("mm@"):
        return float(phase[3:]), 0.0
    raise ValueError(f"unknown phase label {phase!r}")


def _energy_power_w(t_s: np.ndarray, energy_j: np.ndarray) -> np.ndarray:
    """Mean power over each energy-counter refresh interval, held until the next refresh."""
    change = np.flatnonzero(np.diff(energy_j) != 0) + 1
    out = np.full(len(t_s), np.nan)
    for a, b in zip(change[:-1], change[1:], strict=False):
        out[a:b] = (energy_j[b] - energy_j[a]) / max(t_s[b] - t_s[a], 1e-3)
    good = np.flatnonzero(~np.isnan(out))
    if len(good) == 0:
        return np.zeros(len(t_s))
    return np.interp(np.arange(len(t_s)), good, out[good])


def engine_load_at(
    t_s: np.ndarray, start_s: np.ndarray, end_s: np.ndarray, load: np.ndarray
) -> np.ndarray:
    """Load of the engine step in progress at each t_s (steps sorted, not overlapping).

    Between steps the one that ended last still counts while the gap is shorter than its own
    duration; beyond that, or before the first step, the GPU is idle (zero)."""
    i = np.searchsorted(start_s, t_s, side="right") - 1
    ok = i >= 0
    j = np.clip(i, 0, len(start_s) - 1)
    ok &= t_s < end_s[j] + (end_s[j] - start_s[j])
    return np.where(ok, load[j], 0.0)


def _number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def read_trace(path: str | Path) -> Trace:
    """A trace CSV in either format: the NVML traces (one row per reading, `phase` labels or
    activity columns, mW/mJ), or ondo's telemetry (`kind` gpu/engine rows on one clock, W/J)."""
    reader = csv.DictReader(trace_lines(path))
    rows = list(reader)
    header = reader.fieldnames
    # Worded as `ondo twin adapt` (ondo.events.trace_input) words it of the same file.
    if not header:
        raise ValueError(f"{path}: line 1: the file is empty (a CSV header is expected)")
    if "t" not in header:
        what = "a serving trace (kind gpu/engine rows)" if "kind" in header else "an NVML trace"
        raise ValueError(
            f"{path}: no column 't', which {what} needs: not a trace this reader knows"
        )
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    serving = "kind" in rows[0]
    engine = [r for r in rows if r["kind"] == "engine"] if serving else []
    if serving:
        rows = [r for r in rows if r["kind"] == "gpu"]
        if not rows:  # the twin starts from a GPU reading
            raise ValueError(f"{path}: no GPU rows (kind gpu) in this serving trace")

    def col(name: str, scale: float = 1.0, of: list[dict[str, str]] = rows) -> np.ndarray:
        try:
            return np.array([float(r[name]) * scale for r in of])
        except KeyError:
            kind = "a serving trace (kind gpu/engine rows)" if serving else "an NVML trace"
            raise ValueError(f"{path}: no column {name!r}, which {kind} needs") from None
        except (TypeError, ValueError):
            bad = next(r.get(name) for r in of if not _number(r.get(name)))
            raise ValueError(f"{path}: column {name!r}: {bad!r} is not a number") from None

    t_s = col("t")
    energy_j = col("energy_j") if serving else col("energy_mj", 1e-3)
    phase = [r.get("phase", "") for r in rows]
    if serving:
        # Engine step times are on the monotonic clock; `t` is that clock shifted.
        shift = col("t", of=engine) - col("t_monotonic_s", of=engine)
        start = col("start_monotonic_s", of=engine) + shift
        end = col("end_monotonic_s", of=engine) + shift
        a_c = engine_load_at(t_s, start, end, col("compute_activity", of=engine))
        a_m = engine_load_at(t_s, start, end, col("memory_activity", of=engine))
    elif "compute_activity" in rows[0]:
        a_c, a_m = col("compute_activity"), col("memory_activity")
    else:
        try:
            loads = np.array([load_from_phase(p) for p in phase])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        a_c, a_m = loads[:, 0], loads[:, 1]
    if serving:
        power_fast_w = col("power_instant_w")
    elif "power_instant_mw" in rows[0]:
        power_fast_w = col("power_instant_mw", 1e-3)
    else:
        power_fast_w = _energy_power_w(t_s, energy_j)
    return Trace(
        name=Path(path).name,
        t_s=t_s,
        phase=phase,
        temp_c=col("temp_c"),
        mem_temp_c=col("mem_temp_c"),
        power_w=col("power_w") if serving else col("power_mw", 1e-3),
        power_fast_w=power_fast_w,
        energy_j=energy_j,
        sm_mhz=col("sm_mhz"),
        throttle_reasons=col("throttle_reasons" if serving else "event_reasons").astype(int),
        compute_activity=a_c,
        memory_activity=a_m,
        load_units="engine" if serving else "plant",
    )
