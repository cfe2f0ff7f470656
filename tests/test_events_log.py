"""The event log: canonical bytes, the hash chain, the append-only table in the telemetry
file, `ondo events verify` on tampered logs, the store's lane that never drops, and the
live detectors on a hub. Real SQLite files throughout."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import ondo.cli
from ondo.events.canonical import GENESIS_HASH, canonical_json, chain_hash
from ondo.events.live import LiveEvents
from ondo.events.log import EventLog
from ondo.events.schema import (
    Event,
    EventDraft,
    EventKind,
    SchemaError,
    schema_table_markdown,
)
from ondo.events.table import EVENTS_TABLE, read_head
from ondo.events.verify import verify
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.schema import GpuSample
from ondo.telemetry.store import TelemetryStore

DOCS = Path(__file__).resolve().parent.parent / "docs" / "events.md"


def gap(i: int, t: float = 10.0) -> EventDraft:
    return EventDraft(EventKind.TELEMETRY_GAP, t + i, 1.8e9 + i, {"stage": "samples", "gpu": 0},
                      {"stage": "samples", "dropped": i, "gap_s": 0.25 * i, "gpu": 0})


def gpu(t: float, bits: int = 0, power_w: float = 300.0) -> GpuSample:
    return GpuSample(0, "sim", t, 1.8e9 + t, 0.05, 0.001, temp_c=50.0, mem_temp_c=55.0,
                     power_w=power_w, sm_mhz=1980.0, sm_max_mhz=1980.0, throttle_reasons=bits)


def write_log(db: Path, n: int) -> EventLog:
    store = TelemetryStore(db, tables=[EVENTS_TABLE])
    log = EventLog(sinks=[store.submit], head=read_head(db))
    for i in range(n):
        log.append(gap(i + 1))
    store.close()
    assert store.dropped == 0
    return log


def run_cli(*argv: str) -> int:
    return ondo.cli.main(list(argv))


def test_canonical_json_sorts_keys_and_writes_floats_with_six_decimals() -> None:
    value = {"b": 1, "a": [1.5, -0.0, np.float32(0.25), np.int64(7), True, None, "é"],
             "c": {"z": 1e-9, "y": -1e-9, "x": 2.0000004}}
    assert canonical_json(value) == ('{"a":[1.500000,0.000000,0.250000,7,true,null,"\\u00e9"],'
                                     '"b":1,"c":{"x":2.000000,"y":0.000000,"z":0.000000}}')
    with pytest.raises(ValueError, match="finite"):
        canonical_json({"x": float("nan")})
    with pytest.raises(TypeError, match="object"):
        canonical_json({"x": object()})


def test_entries_chain_from_the_fixed_genesis_and_their_bytes_are_fixed() -> None:
    log = EventLog()
    first = log.append(gap(1))
    second = log.append(gap(2))
    assert GENESIS_HASH == hashlib.sha256(b"ondo event log genesis v1").hexdigest()
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert second.prev_hash == first.hash == chain_hash(GENESIS_HASH, first.body)
    assert first.body == (
        '{"evidence":[],"kind":"telemetry_gap","payload":{"dropped":1,"gap_s":0.250000,"gpu":0,'
        '"stage":"samples"},"schema_version":1,"seq":1,"severity":"warning","subject":{"gpu":0,'
        '"stage":"samples"},"t_monotonic_s":11.000000,"t_wall_s":1800000001.000000}')
    # The bytes are the contract: this digest is what any machine must compute.
    assert first.hash == hashlib.sha256(f"{GENESIS_HASH}\n{first.body}".encode()).hexdigest()
    assert log.head.count == 2 and log.head.hash == second.hash


@pytest.mark.parametrize("payload, message", [
    ({"stage": "samples"}, "'dropped' is missing"),
    ({"stage": "samples", "dropped": 1, "color": "red"}, "unknown payload field 'color'"),
    ({"stage": "samples", "dropped": "1"}, "'dropped' must be int"),
    ({"stage": "samples", "dropped": 1, "gap_s": float("inf")}, "finite"),
])
def test_a_draft_that_does_not_match_its_kind_is_refused_and_nothing_is_appended(
        payload, message) -> None:
    log = EventLog()
    log.append(gap(1))
    with pytest.raises((SchemaError, ValueError), match=message):
        log.append(EventDraft(EventKind.TELEMETRY_GAP, 1.0, 1.0, {"stage": "samples"}, payload))
    assert log.head.count == 1
    with pytest.raises(SchemaError, match="subject needs 'gpu'"):
        log.append(EventDraft(EventKind.THROTTLE_STARTED, 1.0, 1.0, {"reason": "x"}, {}))


def test_closing_event_names_the_event_that_opened_its_episode() -> None:
    log = EventLog()
    log.append(gap(1))
    opened = log.append(EventDraft(EventKind.KV_CACHE_PRESSURE, 2.0, 2.0, {"engine": 0},
                                   {"kv_blocks_used": 96, "kv_blocks_total": 100, "usage": 0.96,
                                    "threshold": 0.95, "since_s": 1.0}, opens="kv"))
    closed = log.append(EventDraft(EventKind.CONDITION_CLEARED, 9.0, 9.0, {"engine": 0},
                                   {"kind": "kv_cache_pressure", "started_s": 1.0,
                                    "ended_s": 8.0, "duration_s": 7.0, "summary": {}},
                                   closes="kv"))
    assert closed.payload["onset_seq"] == opened.seq == 2
    assert closed.evidence[0] == "event:2"


def test_stored_log_verifies_and_the_table_refuses_update_delete_and_forged_inserts(
        tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    log = write_log(db, 5)
    assert verify(db).ok and verify(db).entries == 5
    assert read_head(db) == log.head
    conn = sqlite3.connect(db)
    for sql in ("UPDATE events SET kind = 'x' WHERE seq = 2", "DELETE FROM events WHERE seq = 5",
                "UPDATE event_log_head SET count = 4", "DELETE FROM event_log_head"):
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(sql)
    forged = EventLog(head=read_head(db)).append(gap(9))
    stale = EventLog().append(gap(9))  # a second writer that starts from the genesis
    conn.execute(EVENTS_TABLE.insert_sql, EVENTS_TABLE.row(forged))  # extends the head: fine
    with pytest.raises(sqlite3.IntegrityError, match="does not extend"):
        conn.execute(EVENTS_TABLE.insert_sql, EVENTS_TABLE.row(stale))
    conn.commit()
    conn.close()
    assert verify(db).ok and verify(db).entries == 6


def _drop_triggers(conn: sqlite3.Connection) -> None:
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")


def test_verify_names_the_entry_edited_through_raw_sql(tmp_path: Path, capsys) -> None:
    db = tmp_path / "t.db"
    write_log(db, 8)
    conn = sqlite3.connect(db)
    _drop_triggers(conn)
    body = conn.execute("SELECT body FROM events WHERE seq = 5").fetchone()[0]
    conn.execute("UPDATE events SET body = ? WHERE seq = 5",
                 (body.replace('"dropped":5', '"dropped":0'),))
    conn.commit()
    conn.close()
    result = verify(db)
    assert (result.ok, result.bad_seq, result.entries) == (False, 5, 4)
    assert "hash does not match" in result.reason
    assert run_cli("events", "verify", "--db", str(db)) == 1
    assert "entry 5:" in capsys.readouterr().err


def test_verify_catches_a_column_edited_beside_its_body_and_a_rehashed_entry(
        tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    write_log(db, 6)
    conn = sqlite3.connect(db)
    _drop_triggers(conn)
    conn.execute("UPDATE events SET severity = 'info' WHERE seq = 3")
    conn.commit()
    assert verify(db).bad_seq == 3
    conn.execute("UPDATE events SET severity = 'warning' WHERE seq = 3")
    # Rewrite entry 4 with a recomputed hash: entry 5 no longer chains onto it.
    prev = conn.execute("SELECT hash FROM events WHERE seq = 3").fetchone()[0]
    body = conn.execute("SELECT body FROM events WHERE seq = 4").fetchone()[0]
    body = body.replace('"dropped":4', '"dropped":40')
    conn.execute("UPDATE events SET body = ?, hash = ? WHERE seq = 4", (body, chain_hash(prev, body)))
    conn.commit()
    conn.close()
    result = verify(db)
    assert (result.bad_seq, result.reason) == (5, "its prev_hash is not the previous entry's hash")


def test_verify_catches_the_last_entry_deleted(tmp_path: Path, capsys) -> None:
    db = tmp_path / "t.db"
    write_log(db, 7)
    conn = sqlite3.connect(db)
    _drop_triggers(conn)
    conn.execute("DELETE FROM events WHERE seq = 7")
    conn.commit()
    conn.close()
    result = verify(db)
    assert (result.ok, result.bad_seq, result.entries) == (False, 7, 6)
    assert "the head records 7 entries" in result.reason
    assert run_cli("events", "verify", "--db", str(db)) == 1
    assert "entry 7:" in capsys.readouterr().err


def test_verify_without_a_log_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert run_cli("events", "verify", "--db", str(tmp_path / "missing.db")) == 2
    TelemetryStore(tmp_path / "plain.db").close()
    assert run_cli("events", "verify", "--db", str(tmp_path / "plain.db")) == 2
    assert "no event log" in capsys.readouterr().err


def test_a_log_reopened_continues_its_chain(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    write_log(db, 3)
    log = write_log(db, 4)  # a second process: starts from the stored head
    assert log.head.count == 7
    assert verify(db).ok and verify(db).entries == 7


def test_events_are_never_dropped_while_samples_are_when_the_database_is_locked(
        tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(db, max_queue=10, busy_timeout_s=0.01, retry_backoff_s=0.01,
                           tables=[EVENTS_TABLE])
    log = EventLog(sinks=[store.submit])
    time.sleep(0.1)
    locker = sqlite3.connect(db, timeout=5.0)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    for i in range(200):
        store.submit(gpu(i * 0.01))
        if i % 10 == 0:
            log.append(gap(i // 10 + 1))
    time.sleep(0.5)
    locker.rollback()
    locker.close()
    store.close()
    conn = sqlite3.connect(db)
    stored_samples = conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0]
    conn.close()
    assert stored_samples < 200 and store.dropped == 200 - stored_samples
    assert store.write_errors > 0
    result = verify(db)
    assert result.ok and result.entries == 20


def test_an_entry_the_database_refuses_is_counted_and_the_rest_are_stored(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    write_log(db, 2)
    store = TelemetryStore(db, tables=[EVENTS_TABLE])
    good = EventLog(sinks=[store.submit], head=read_head(db))
    stale = EventLog(sinks=[store.submit])  # a writer that did not read the head
    good.append(gap(3))
    stale.append(gap(1))
    good.append(gap(4))
    store.close()
    assert store.rejected == 1 and store.stored == 2
    assert verify(db).ok and verify(db).entries == 4


def test_live_detectors_log_a_throttle_from_the_hub_into_the_database(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    hub = TelemetryHub()
    store = TelemetryStore(db, tables=[EVENTS_TABLE])
    store.attach(hub)
    registry = CollectorRegistry()
    live = LiveEvents(hub, store=store, registry=registry)
    seen: list[Event] = []
    hub.subscribe(seen.append, kinds=(Event,))
    for i in range(150):  # 3 s at 50 Hz: power cap for 0.5 s from 0.8 s
        hub.publish(gpu(100.0 + i * 0.02, 0x4 if 40 <= i < 65 else 0))
    deadline = time.monotonic() + 10
    while live.log.head.count < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    live.close()
    store.close()
    kinds = [e.kind.value for e in live.log.recent()]
    assert kinds == ["throttle_started", "throttle_ended"]
    assert [e.kind.value for e in seen] == kinds  # the hub carried them to other subscribers
    ended = live.log.recent()[1]
    assert ended.payload["started_s"] == pytest.approx(100.8)
    assert ended.payload["duration_s"] == pytest.approx(0.5)
    assert registry.get_sample_value("ondo:events_total", {"kind": "throttle_started"}) == 1
    assert registry.get_sample_value("ondo:event_log_entries") == 2
    assert verify(db).entries == 2


def test_live_detectors_without_a_database_keep_the_log_in_memory() -> None:
    hub = TelemetryHub()
    live = LiveEvents(hub, recent=3)
    for i in range(50):  # five one-sample throttles, 2 s apart, sampled at 5 Hz
        hub.publish(gpu(50.0 + i * 0.2, 0x40 if i % 10 == 0 else 0))
    deadline = time.monotonic() + 10
    while live.log.head.count < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    live.close()
    assert live.log.counts == {"throttle_started": 5, "throttle_ended": 5}
    assert [e.seq for e in live.log.recent()] == [8, 9, 10]
    assert live.log.recent()[1].severity.value == "critical"  # hw thermal slowdown


def test_appends_from_many_threads_keep_one_gapless_chain(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(db, tables=[EVENTS_TABLE])
    log = EventLog(sinks=[store.submit])

    def writer(k: int) -> None:
        for i in range(50):
            log.append(gap(k * 100 + i))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()
    assert verify(db).ok and verify(db).entries == 200


def test_docs_hold_the_schema_table_and_every_detector_default() -> None:
    import dataclasses

    from ondo.events.config import DetectorConfig

    text = DOCS.read_text()
    assert schema_table_markdown() in text
    config = DetectorConfig.from_params()
    for f in dataclasses.fields(config):
        assert f"| `{f.name}` | {getattr(config, f.name)} |" in text, f.name


def test_export_and_tail_filter_and_format(tmp_path: Path, capsys) -> None:
    db = tmp_path / "t.db"
    write_log(db, 5)
    assert run_cli("events", "export", "--db", str(db), "--since", "13") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [3, 4, 5]  # entry k at t = 10 + k s
    out = tmp_path / "e.csv"
    assert run_cli("events", "export", "--db", str(db), "--format", "csv", "-o", str(out)) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("seq,t_monotonic_s") and len(rows) == 6
    assert run_cli("events", "tail", "--db", str(db), "-n", "2") == 0
    tail = capsys.readouterr().out.splitlines()
    assert len(tail) == 2 and tail[-1].split()[0] == "5"
    assert run_cli("events", "tail", "--db", str(db), "--kind", "throttle_started") == 0
    assert capsys.readouterr().out == ""
    assert run_cli("events", "tail", "--db", str(db), "--kind", "bogus") == 2
    assert "--kind 'bogus'" in capsys.readouterr().err
    assert run_cli("events", "tail", "--db", str(db), "--since", "yesterday") == 2
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_records_the_detectors_could_not_keep_up_with_become_a_telemetry_gap() -> None:
    hub = TelemetryHub()
    live = LiveEvents(hub, queue_size=4)
    hub.publish(gpu(10.0))  # seen before the flood, so the drops leave a hole after it
    deadline = time.monotonic() + 10
    while len(live._sub.queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, 2000):  # far faster than the detectors' thread takes them
        hub.publish(gpu(10.0 + i * 0.01))
    assert live.dropped > 0
    def reported():
        return [e for e in live.log.recent()
                if e.kind is EventKind.TELEMETRY_GAP and e.subject == {"stage": "event detectors"}]

    deadline = time.monotonic() + 10
    while not reported() and time.monotonic() < deadline:
        time.sleep(0.05)
    live.close()
    (event,) = reported()
    assert event.payload["dropped"] == live.dropped
    # The holes the drops left in the GPU's series are reported as gaps too.
    assert any(e.subject == {"stage": "samples", "gpu": 0} for e in live.log.recent())
