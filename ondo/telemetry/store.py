"""The telemetry store: one WAL-mode SQLite file, written by one thread from a bounded queue.

`submit()` never blocks: when the writer falls behind (disk slow, file locked, disk full) the
queue keeps its newest `max_queue` samples and counts the ones it drops, so that at any time
after `close()`: stored + dropped == submitted. Drops are logged (at most every
`drop_log_every_s`) and exported as `ondo:telemetry_samples_dropped`; failing writes are
retried with a backoff that grows to `max_retry_backoff_s`, and `flush`/`close` do not
wait on a disk that takes nothing. Raw GPU samples older than `raw_retention_s`
are folded into 1 s aggregates (mean/min/max per column) in `gpu_samples_1s` and deleted.

Durability: every batch the writer takes (whatever arrived in the last 50 ms or so) is one
committed transaction in the write-ahead log, so a process killed outright (SIGKILL, out
of memory) loses only what was still queued, well under a second at any sampling rate,
and leaves a database that opens (SQLite replays the log); committed records of every
table are a prefix of what was submitted, in order.

GPU samples and engine steps have tables of their own here; other layers (the governor's
decisions, the event log) store their records in the same file and through the same
writer thread by passing a `RecordTable` for each record type (`tables=`). A table marked
`lossless` (the event log: a lost entry would break its hash chain) gets a lane of its own
that never drops: its records wait, in order, until they are written, and are written in
a transaction of their own, so that samples and records never hold each other back.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondo.telemetry.hub import DropOldestQueue, Subscription, TelemetryHub
from ondo.telemetry.schema import ENGINE_COLUMNS, GPU_VALUE_COLUMNS, EngineSample, GpuSample

log = logging.getLogger(__name__)

GPU_COLUMNS: tuple[str, ...] = (
    "gpu_index",
    "source",
    "t_monotonic_s",
    "t_wall_s",
    "period_s",
    "read_latency_s",
    *GPU_VALUE_COLUMNS,
    "stale",
    "failed",
)
# Columns folded into mean/min/max per second; throttle_reasons is folded by bitwise OR.
AGGREGATED_COLUMNS: tuple[str, ...] = tuple(
    c for c in ("read_latency_s", *GPU_VALUE_COLUMNS) if c != "throttle_reasons"
)
AGGREGATE_COLUMNS: tuple[str, ...] = (
    "gpu_index",
    "source",
    "t_s",
    "t_wall_s",
    "n",
    "throttle_reasons_any",
    *(f"{c}_{stat}" for c in AGGREGATED_COLUMNS for stat in ("mean", "min", "max")),
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS gpu_samples (
    {", ".join(GPU_COLUMNS)}
);
CREATE INDEX IF NOT EXISTS gpu_samples_t ON gpu_samples (t_monotonic_s);
CREATE TABLE IF NOT EXISTS engine_steps (
    {", ".join((*ENGINE_COLUMNS, "source"))}
);
CREATE INDEX IF NOT EXISTS engine_steps_t ON engine_steps (end_monotonic_s);
CREATE TABLE IF NOT EXISTS gpu_samples_1s (
    {", ".join(AGGREGATE_COLUMNS)}
);
CREATE INDEX IF NOT EXISTS gpu_samples_1s_t ON gpu_samples_1s (t_s);
"""


@dataclass(frozen=True)
class RecordTable:
    """How records of one Python type are stored: the table's DDL (CREATE ... IF NOT EXISTS,
    indexes too), its INSERT statement, and the function from a record to that row."""

    kind: type
    ddl: str
    insert_sql: str
    row: Callable[[Any], tuple[Any, ...]]
    # Never dropped: queued without bound until written (for rare records whose loss would
    # break something, such as a hash-chained log). A record the database rejects as
    # inconsistent (an integrity error) is logged and counted in `rejected`, not retried.
    lossless: bool = False


class _BitOr:
    def __init__(self) -> None:
        self.value: int | None = None

    def step(self, x: int | None) -> None:
        if x is not None:
            self.value = int(x) | (self.value or 0)

    def finalize(self) -> int | None:
        return self.value


def check_database(flag: str, path: str | Path) -> None:
    """ValueError "FLAG PATH: why" where `path` cannot be opened as a SQLite database (an
    absent file is created, as the store would): a command checks its database flag before
    its slow start rather than failing after it."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path}: a folder, not a database file")
    try:
        conn = sqlite3.connect(str(path), timeout=5.0)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise ValueError(f"{flag} {path}: {e}") from None


def connect(path: str | Path, timeout_s: float = 5.0) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=timeout_s, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.create_aggregate("bit_or", 1, _BitOr)  # type: ignore[arg-type]
    return conn


def _gpu_row(s: GpuSample) -> tuple[Any, ...]:
    return (
        s.gpu_index,
        s.source,
        s.t_monotonic_s,
        s.t_wall_s,
        s.period_s,
        s.read_latency_s,
        *(getattr(s, c) for c in GPU_VALUE_COLUMNS),
        ",".join(sorted(s.stale)),
        ",".join(sorted(s.failed)),
    )


def _engine_row(s: EngineSample) -> tuple[Any, ...]:
    return (*(getattr(s, c) for c in ENGINE_COLUMNS), s.source)


_INSERT_GPU = f"INSERT INTO gpu_samples VALUES ({', '.join('?' * len(GPU_COLUMNS))})"
_INSERT_ENGINE = f"INSERT INTO engine_steps VALUES ({', '.join('?' * (len(ENGINE_COLUMNS) + 1))})"
_BUCKET = "(CAST(t_monotonic_s AS INTEGER) - (t_monotonic_s < CAST(t_monotonic_s AS INTEGER)))"
_AGGREGATE = f"""
INSERT INTO gpu_samples_1s ({", ".join(AGGREGATE_COLUMNS)})
SELECT gpu_index, source, {_BUCKET} AS t_s, MIN(t_wall_s), COUNT(*), bit_or(throttle_reasons),
    {", ".join(f"AVG({c}), MIN({c}), MAX({c})" for c in AGGREGATED_COLUMNS)}
FROM gpu_samples WHERE t_monotonic_s < ?
GROUP BY gpu_index, source, t_s
"""


def compact(conn: sqlite3.Connection, before_s: int) -> int:
    """Fold raw GPU samples with t_monotonic_s < `before_s` (whole seconds) into 1 s aggregates
    and delete them; returns the number of raw rows folded."""
    with conn:
        conn.execute(_AGGREGATE, (before_s,))
        return conn.execute("DELETE FROM gpu_samples WHERE t_monotonic_s < ?", (before_s,)).rowcount


class TelemetryStore:
    """`submit()` samples (or `attach()` to a hub); `flush()` waits for the writer; `close()`."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_queue: int = 50_000,
        batch_size: int = 2_000,
        raw_retention_s: float | None = 600.0,
        busy_timeout_s: float = 0.1,
        retry_backoff_s: float = 0.05,
        max_retry_backoff_s: float = 1.0,
        drop_log_every_s: float = 10.0,
        tables: Sequence[RecordTable] = (),
    ) -> None:
        self.path = Path(path)
        self.tables = {t.kind: t for t in tables}
        self.raw_retention_s = raw_retention_s
        self.batch_size = batch_size
        self.retry_backoff_s = retry_backoff_s
        self._queue = DropOldestQueue(max_queue)
        self._lossless: deque[Any] = deque()  # records of lossless tables, in order
        self._lossless_lock = threading.Lock()
        self._lossless_added = 0
        self.stored = 0
        # Records let go: lossless ones the database refused (integrity errors), and records
        # of any table that cannot be made into a row (a defect upstream; never retried).
        self.rejected = 0
        self.write_errors = 0
        self._lost_on_close = 0
        self._latest_t = float("-inf")
        self._compacted_before = float("-inf")
        self._stop = threading.Event()
        self._sub: Subscription | None = None
        self.max_retry_backoff_s = max_retry_backoff_s
        self.drop_log_every_s = drop_log_every_s
        self._failures_in_a_row = 0
        self._logged_dropped = 0
        self._drop_logged_s = float("-inf")
        conn = connect(self.path, timeout_s=5.0)
        conn.executescript(_SCHEMA)
        for table in self.tables.values():
            conn.executescript(table.ddl)
        conn.close()
        self._conn = connect(self.path, timeout_s=busy_timeout_s)
        self._thread = threading.Thread(target=self._run, name="ondo-telemetry-store", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Samples lost: dropped from the full queue, rejected, or unwritable at close."""
        return self._queue.dropped + self._lost_on_close + self.rejected

    @property
    def submitted(self) -> int:
        return self._queue.added + self._lossless_added

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._lossless)

    def submit(self, sample: Any) -> None:
        """Queue a sample (or a record of a registered table) for writing; never blocks,
        never raises for a full queue. Records of lossless tables are never dropped."""
        table = self.tables.get(type(sample))
        if table is not None and table.lossless:
            with self._lossless_lock:
                self._lossless_added += 1
                self._lossless.append(sample)
            return
        self._queue.put(sample)

    def attach(self, hub: TelemetryHub) -> None:
        self._sub = hub.subscribe(self.submit, kinds=(GpuSample, EngineSample, *self.tables))

    @property
    def failing(self) -> bool:
        """The last write failed (disk full, file locked, I/O error)."""
        return self._failures_in_a_row > 0

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (True) or `timeout_s` passes;
        False at once while writes fail (nothing would come of waiting)."""
        deadline = time.monotonic() + timeout_s
        target = self.submitted
        while self.stored + self.dropped < target:
            if time.monotonic() > deadline or self.failing:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        if self._sub is not None:
            self._sub.close()
        self.flush(timeout_s)
        self._stop.set()
        self._thread.join(timeout_s)
        left = self._queue.drain()
        if left:
            self._lost_on_close += len(left)
            log.error("telemetry store closed with %d samples unwritten (counted as dropped)", len(left))
        if self._lossless and not self._thread.is_alive():
            self._write_lossless()  # a last try at what must not be lost
        if self._lossless:
            self._lost_on_close += len(self._lossless)
            log.error("telemetry store closed with %d records of lossless tables unwritten",
                      len(self._lossless))
        self._conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._log_drops()
            batch = self._queue.get_batch(self.batch_size, timeout=0.05)
            if self._lossless and not self._write_lossless():
                self._stop.wait(self.retry_backoff_s)
            if not batch:
                continue
            batch, rows = self._rows(batch)
            try:
                self._write(rows)
                self.stored += len(batch)
                if self._failures_in_a_row:
                    log.warning("telemetry store writes again after %d failures",
                                self._failures_in_a_row)
                self._failures_in_a_row = 0
            except Exception as e:  # locked, disk full, I/O error: keep what fits, retry
                self.write_errors += 1
                self._failures_in_a_row += 1
                self._queue.put_back(batch)
                if self._failures_in_a_row == 1 or self.write_errors % 100 == 0:
                    log.warning("telemetry store write failed (%s); %d queued, %d dropped so far",
                                e, len(self._queue), self.dropped)
                backoff_s = min(self.retry_backoff_s * 2 ** (self._failures_in_a_row - 1),
                                self.max_retry_backoff_s)
                self._stop.wait(backoff_s)
                continue
            self._maybe_compact()

    def _write_lossless(self) -> bool:
        """Write the lossless lane's records, in order, in one transaction; True when the lane
        is empty afterwards. On a transient error they stay queued (front, same order); records
        the database refuses as inconsistent, or that no row can be made of, are logged,
        counted and let go."""
        with self._lossless_lock:
            batch = list(self._lossless)
        pairs = [(record, self._row_or_reject(record)) for record in batch]
        if any(row is None for _, row in pairs):
            # Let go of the unwritable ones now, so that a retry does not count them again;
            # only this thread takes from the front, so the front is still `batch`.
            with self._lossless_lock:
                for _ in batch:
                    self._lossless.popleft()
                self._lossless.extendleft(reversed([r for r, row in pairs if row is not None]))
            pairs = [(r, row) for r, row in pairs if row is not None]
        rows: dict[type, list[tuple[Any, ...]]] = {}
        for record, row in pairs:
            rows.setdefault(type(record), []).append(row)
        try:
            with self._conn:
                for kind, table_rows in rows.items():
                    self._conn.executemany(self.tables[kind].insert_sql, table_rows)
            done = len(pairs)
            self.stored += done
        except sqlite3.IntegrityError:
            done = self._write_one_by_one(pairs)
        except Exception as e:  # locked, disk full, I/O error: they wait for the next try
            self._lossless_write_failed(e)
            return False
        with self._lossless_lock:
            for _ in range(done):
                self._lossless.popleft()
            return not self._lossless

    def _write_one_by_one(self, pairs: list[tuple[Any, tuple[Any, ...]]]) -> int:
        """After an integrity error: each record in a transaction of its own, so that only the
        ones the database refuses are let go (logged and counted). Returns how many records
        were dealt with (stored or refused) before a transient error, if any."""
        for i, (record, row) in enumerate(pairs):
            table = self.tables[type(record)]
            try:
                with self._conn:
                    self._conn.execute(table.insert_sql, row)
                self.stored += 1
            except sqlite3.IntegrityError as e:
                self.rejected += 1
                log.error("the database refused a record of a lossless table (%s): %s",
                          table.kind.__name__, e)
            except Exception as e:
                self._lossless_write_failed(e)
                return i
        return len(pairs)

    def _lossless_write_failed(self, e: Exception) -> None:
        self.write_errors += 1
        if self.write_errors == 1 or self.write_errors % 100 == 0:
            log.warning("telemetry store write of lossless records failed (%s); %d waiting",
                        e, len(self._lossless))

    def _row_or_reject(self, record: Any) -> tuple[Any, ...] | None:
        """The record's row; None, counted and logged, for one no row can be made of (a
        value the table cannot hold): retrying it would hold back every record behind it."""
        table = self.tables[type(record)]
        try:
            return table.row(record)
        except Exception as e:
            self.rejected += 1
            log.error("telemetry store let go of a %s it cannot write (%s: %s)",
                      table.kind.__name__, type(e).__name__, e)
            return None

    def _rows(self, batch: list[Any]) -> tuple[list[Any], dict[type, list[tuple[Any, ...]]]]:
        """The batch's rows by record type, and the records they were made of (the batch
        less those of registered tables that cannot be made into rows)."""
        kept: list[Any] = []
        rows: dict[type, list[tuple[Any, ...]]] = {}
        for record in batch:
            kind = type(record)
            if isinstance(record, GpuSample):
                kind, row = GpuSample, _gpu_row(record)
            elif isinstance(record, EngineSample):
                kind, row = EngineSample, _engine_row(record)
            elif kind in self.tables:
                row = self._row_or_reject(record)
                if row is None:
                    continue
            else:  # no table of its own: nothing to write (counted as done, as it was)
                kept.append(record)
                continue
            kept.append(record)
            rows.setdefault(kind, []).append(row)
        return kept, rows

    def _write(self, rows: dict[type, list[tuple[Any, ...]]]) -> None:
        with self._conn:
            for kind, kind_rows in rows.items():
                sql = (_INSERT_GPU if kind is GpuSample else _INSERT_ENGINE if kind is EngineSample
                       else self.tables[kind].insert_sql)
                self._conn.executemany(sql, kind_rows)
        gpu = rows.get(GpuSample)
        if gpu:
            self._latest_t = max(self._latest_t, max(r[2] for r in gpu))

    def _maybe_compact(self) -> None:
        if self.raw_retention_s is None or self._latest_t == float("-inf"):
            return  # nothing to fold: no GPU samples yet (engine steps are kept raw)
        before_s = int(self._latest_t - self.raw_retention_s)
        if before_s <= self._compacted_before:
            return
        try:
            n = compact(self._conn, before_s)
            self._compacted_before = before_s
            log.debug("folded %d raw samples before t=%d s into 1 s aggregates", n, before_s)
        except sqlite3.Error as e:
            log.warning("telemetry compaction deferred: %s", e)

    def _log_drops(self) -> None:
        """One line per `drop_log_every_s` while samples are being dropped."""
        dropped = self._queue.dropped
        now = time.monotonic()
        if dropped > self._logged_dropped and now - self._drop_logged_s >= self.drop_log_every_s:
            log.warning("telemetry store dropped %d samples (%d in all): it writes slower than "
                        "they come, or cannot write%s", dropped - self._logged_dropped, dropped,
                        " (writes failing)" if self.failing else "")
            self._logged_dropped, self._drop_logged_s = dropped, now
