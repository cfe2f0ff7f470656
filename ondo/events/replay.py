"""`ondo events replay`: the detectors over a recorded trace, into a fresh database.

The trace is read and checked whole first (`trace_input.py`): a bad line is reported and no
file is created. Then the trace's samples and the events the detectors find go, in trace
order, through the telemetry store's writer thread into a new SQLite file (samples raw, no
folding into 1 s aggregates). The log is committed as it grows, so a replay killed midway
leaves a shorter log whose chain verifies. Everything that decides is deterministic (trace
order, trace times, the twin's forecasts rounded), so two replays of one trace give the same
log, byte for byte, on any machine: the same head hash.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondo.events.config import DetectorConfig
from ondo.events.detectors import DetectorSet, record_time
from ondo.events.log import EventLog
from ondo.events.replay_twin import replay_snapshots
from ondo.events.table import EVENTS_TABLE, read_head
from ondo.events.trace_input import TraceRecords, read_trace_records
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.telemetry.store import TelemetryStore
from ondo.twin.live import TwinSnapshot
from ondo.twin.params import TwinParams, h100_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySummary:
    trace: str
    db: str
    gpu_rows: int
    engine_rows: int
    twin_snapshots: int
    events: int
    head_hash: str
    by_kind: dict[str, int]
    elapsed_s: float


def twin_snapshots(params: TwinParams, trace: TraceRecords) -> list[TwinSnapshot]:
    """The twin's snapshots of every GPU of the trace, in time order."""
    steps = [r for r in trace.records if isinstance(r, EngineSample)]
    by_gpu: dict[int, list[int]] = {}
    for i, r in enumerate(trace.records):
        if isinstance(r, GpuSample):
            by_gpu.setdefault(r.gpu_index, []).append(i)
    snaps: list[TwinSnapshot] = []
    for gpu in sorted(by_gpu):
        idx = by_gpu[gpu]
        samples = [trace.records[i] for i in idx]
        phase = [trace.phase_load.get(i) for i in idx]
        snaps += replay_snapshots(params, samples, phase, steps)  # type: ignore[arg-type]
    snaps.sort(key=lambda s: (s.t_monotonic_s, s.gpu_index))
    return snaps


def merged(records: list[Any], snaps: list[TwinSnapshot]) -> Iterator[Any]:
    """Records in file order with the snapshots placed at their times (after the records of
    the same time)."""
    def keyed_records():
        for i, r in enumerate(records):
            yield (record_time(r)[0], 0, i, r)  # type: ignore[index]

    def keyed_snaps():
        for i, s in enumerate(snaps):
            yield (s.t_monotonic_s, 1, i, s)

    # Records are in time order (the reader checks it), snapshots too: a stable merge.
    for _, _, _, item in heapq.merge(keyed_records(), keyed_snaps(), key=lambda k: k[:3]):
        yield item


def replay_trace(trace_path: str | Path, db_path: str | Path, *,
                 config: DetectorConfig | None = None, params: TwinParams | None = None,
                 speed: float = math.inf, overwrite: bool = False) -> ReplaySummary:
    """Replay `trace_path` into a new database `db_path` (FileExistsError if it exists and
    `overwrite` is not set; TraceError for a bad trace, before anything is written)."""
    t_start = time.perf_counter()
    db = Path(db_path)
    if db.exists() and not overwrite:
        raise FileExistsError(f"{db} exists; replay writes a fresh database (--overwrite "
                              "replaces it)")
    if not db.parent.is_dir():
        raise FileNotFoundError(f"--db {db}: the folder {db.parent} does not exist")
    params = params or h100_params()
    with _collector_paused():  # the records are long-lived: no point walking them
        trace = read_trace_records(trace_path, sm_max_mhz=params.sm_max_mhz)
    return replay_records(trace, db, config=config, params=params, speed=speed,
                          overwrite=overwrite, t_start=t_start)


def replay_records(trace: TraceRecords, db_path: str | Path, *,
                   config: DetectorConfig | None = None, params: TwinParams | None = None,
                   speed: float = math.inf, overwrite: bool = False,
                   t_start: float | None = None) -> ReplaySummary:
    """Replay records already in memory (read from a trace, or made by a simulation; finished
    requests' `RequestSample`s may be among them, in time order) into a new database."""
    t_start = time.perf_counter() if t_start is None else t_start
    db = Path(db_path)
    params = params or h100_params()
    config = config or DetectorConfig.from_params(params)
    gc.freeze()  # the records are long-lived: none in walking them while the detectors run
    try:
        snaps = twin_snapshots(params, trace)
        if overwrite:
            _remove(db)
        log = _write_log(trace, snaps, db, config, speed)
    finally:
        gc.unfreeze()
    return ReplaySummary(trace.path, str(db), trace.gpu_rows, trace.engine_rows,
                         len(snaps), log.head.count, log.head.hash,
                         dict(sorted(log.counts.items())), time.perf_counter() - t_start)


def _write_log(trace: TraceRecords, snaps: list[TwinSnapshot], db: Path,
               config: DetectorConfig, speed: float) -> EventLog:
    """The trace's samples and the detectors' events into `db`; the log. On an exception the
    database is removed (a kill leaves what was committed, which verifies)."""
    # Every sample fits in the queue: a replay drops nothing.
    store = TelemetryStore(db, max_queue=len(trace.records) + 1, raw_retention_s=None,
                           tables=[EVENTS_TABLE])
    log = EventLog(sinks=[store.submit], recent=1)
    detectors = DetectorSet(config, twin_basis="replay twin")
    ok = False
    try:
        _run(trace, snaps, store, log, detectors, speed)
        ok = True
    finally:
        store.close(timeout_s=600.0)
        if not ok:
            _remove(db)
    if store.dropped:
        raise RuntimeError(f"the store lost {store.dropped} records while replaying into {db}")
    if read_head(db) != log.head:
        raise RuntimeError(f"{db}: the stored head {read_head(db)} is not the log's {log.head}")
    return log


def _run(trace: TraceRecords, snaps: list[TwinSnapshot], store: TelemetryStore,
         events: EventLog, detectors: DetectorSet, speed: float) -> None:
    paced = math.isfinite(speed) and speed > 0
    wall0 = time.monotonic()
    t0: float | None = None
    for item in merged(trace.records, snaps):
        if not isinstance(item, TwinSnapshot):
            store.submit(item)
        if paced:
            t = record_time(item)[0]  # type: ignore[index]
            t0 = t if t0 is None else t0
            # In slices: one sleep overflows past about 292 years (a speed of 1e-200).
            while (delay := wall0 + (t - t0) / speed - time.monotonic()) > 0:
                time.sleep(min(delay, 3600.0))
        for draft in detectors.feed(item):
            events.append(draft)


@contextlib.contextmanager
def _collector_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _remove(db: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(db) + suffix)
        if p.exists():
            p.unlink()

