"""The telemetry store survives what a production server meets: SIGKILL of the process in
the middle of its writes loses at most the last second and leaves a database that opens,
with every table's records a gap-free prefix (a hash chain over a registered record
table verifies, as the event log's will); a full disk (a file size limit) drops samples
with a counter and a log line and never stalls the callers, nor `ondo serve`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

import ondo
from tests.server_process import free_port, wait_healthy

# The writer process: samples at about 1 kHz, a hash-chained record beside each, and the
# wall time of the last one submitted in a small shared file (read after the kill).
WRITER = textwrap.dedent('''
    import hashlib, mmap, os, struct, sys, time
    from dataclasses import dataclass
    from ondo.telemetry.schema import GpuSample
    from ondo.telemetry.store import RecordTable, TelemetryStore

    @dataclass
    class Link:
        seq: int
        prev: str
        digest: str
        t_wall_s: float

    chain = RecordTable(Link, "CREATE TABLE IF NOT EXISTS chain (seq, prev, digest, t_wall_s);",
                        "INSERT INTO chain VALUES (?, ?, ?, ?)",
                        lambda r: (r.seq, r.prev, r.digest, r.t_wall_s))
    db, progress = sys.argv[1], sys.argv[2]
    store = TelemetryStore(db, tables=[chain])
    with open(progress, "wb") as f:
        f.write(b"\\0" * 8)
    fd = os.open(progress, os.O_RDWR)
    last = mmap.mmap(fd, 8)
    print("ready", flush=True)
    prev, seq = "genesis", 0
    while True:
        now = time.time()
        store.submit(GpuSample(0, "sim", time.monotonic(), now, 0.001, 0.0, temp_c=float(seq)))
        digest = hashlib.sha256(f"{prev}|{seq}".encode()).hexdigest()
        store.submit(Link(seq, prev, digest, now))
        last[:8] = struct.pack("d", now)
        prev, seq = digest, seq + 1
        time.sleep(0.001)
''')


def verify_chain(rows: list[tuple[int, str, str, float]]) -> None:
    prev = "genesis"
    for expected_seq, (seq, link_prev, digest, _) in enumerate(rows):
        assert seq == expected_seq, f"a hole before record {seq}"
        assert link_prev == prev and digest == hashlib_sha256(f"{prev}|{seq}"), f"record {seq}"
        prev = digest


def hashlib_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _kill_mid_write(script: str, db, progress, kill_after_s: float) -> float:
    """Run a writer `script` on `db`, SIGKILL it after `kill_after_s`; the time of the last
    record it had submitted (from its progress file)."""
    child = subprocess.Popen([sys.executable, "-c", script, str(db), str(progress)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(kill_after_s)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    return struct.unpack("d", progress.read_bytes()[:8])[0]


@pytest.mark.parametrize("kill_after_s", [0.7, 1.3, 2.1])
def test_sigkill_mid_write_loses_at_most_the_last_second(tmp_path, kill_after_s):
    db, progress = tmp_path / "t.db", tmp_path / "progress"
    last_submitted = _kill_mid_write(WRITER, db, progress, kill_after_s)
    assert os.path.exists(str(db) + "-wal")  # killed with its log not checkpointed
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        samples = conn.execute("SELECT temp_c, t_wall_s FROM gpu_samples ORDER BY temp_c").fetchall()
        links = conn.execute("SELECT * FROM chain ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert len(samples) > 100 and len(links) > 100
    assert [int(s[0]) for s in samples] == list(range(len(samples)))  # a prefix, no holes
    verify_chain(links)
    lost_s = last_submitted - max(samples[-1][1], links[-1][3])
    assert 0 <= lost_s <= 1.0, f"{lost_s:.3f} s of samples lost"


# The same with the event log: entries appended through `EventLog` into the store's event
# table, beside samples; after the kill, `ondo events verify` must find the chain whole.
EVENT_WRITER = textwrap.dedent('''
    import mmap, os, struct, sys, time
    from ondo.events.log import EventLog
    from ondo.events.schema import EventDraft, EventKind
    from ondo.events.table import EVENTS_TABLE
    from ondo.telemetry.schema import GpuSample
    from ondo.telemetry.store import TelemetryStore

    db, progress = sys.argv[1], sys.argv[2]
    store = TelemetryStore(db, tables=[EVENTS_TABLE])
    events = EventLog(sinks=[store.submit])
    with open(progress, "wb") as f:
        f.write(b"\\0" * 8)
    last = mmap.mmap(os.open(progress, os.O_RDWR), 8)
    print("ready", flush=True)
    seq = 0
    while True:
        now = time.time()
        store.submit(GpuSample(0, "sim", time.monotonic(), now, 0.001, 0.0, temp_c=float(seq)))
        events.append(EventDraft(EventKind.TELEMETRY_GAP, time.monotonic(), now, {"stage": "test"},
                                 {"stage": "test", "dropped": seq}))
        last[:8] = struct.pack("d", now)
        seq += 1
        time.sleep(0.002)
''')


@pytest.mark.parametrize("kill_after_s", [0.9, 1.7])
def test_sigkill_mid_write_leaves_an_event_log_whose_chain_verifies(tmp_path, kill_after_s):
    if not (Path(ondo.__file__).parent / "events" / "log.py").exists():
        pytest.skip("the event log is not part of this build")
    from ondo.events.verify import verify

    db, progress = tmp_path / "e.db", tmp_path / "progress"
    last_submitted = _kill_mid_write(EVENT_WRITER, db, progress, kill_after_s)
    result = verify(db)
    assert result.ok, result.describe()
    assert result.entries > 50
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        last_event_s = conn.execute("SELECT MAX(t_wall_s) FROM events").fetchone()[0]
    finally:
        conn.close()
    # Entries keep their times to the microsecond (canonical JSON): the last one may read
    # up to half a microsecond after the time it was appended at.
    assert -1e-6 <= last_submitted - last_event_s <= 1.0


# The full-disk process: a 256 KiB file size limit (SIGXFSZ ignored, so writes fail with
# EFBIG as on a full disk), samples at about 10 kHz for 3 s; reports what happened.
FULL_DISK = textwrap.dedent('''
    import json, logging, resource, signal, sqlite3, sys, time
    from ondo.telemetry.schema import GpuSample
    from ondo.telemetry.store import TelemetryStore

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("ondo.telemetry.store").addHandler(Keep())
    logging.getLogger("ondo.telemetry.store").setLevel(logging.INFO)
    store = TelemetryStore(sys.argv[1], max_queue=2000, drop_log_every_s=0.5)
    worst_submit_s, start = 0.0, time.monotonic()
    while time.monotonic() - start < 3.0:
        t0 = time.perf_counter()
        for _ in range(100):
            store.submit(GpuSample(0, "sim", time.monotonic(), time.time(), 0.001, 0.0, temp_c=1.0))
        worst_submit_s = max(worst_submit_s, time.perf_counter() - t0)
        time.sleep(0.01)
    t0 = time.perf_counter()
    store.close()
    close_s = time.perf_counter() - t0
    print(json.dumps({"stored": store.stored, "dropped": store.dropped, "submitted": store.submitted,
                      "write_errors": store.write_errors, "worst_submit_s": worst_submit_s,
                      "close_s": close_s, "log": lines}))
''')


def test_a_full_disk_drops_samples_with_a_counter_and_a_log_line_and_never_blocks(tmp_path):
    db = tmp_path / "full.db"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(db)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["write_errors"] > 0 and r["dropped"] > 0 and r["stored"] > 0
    # Each sample stored or dropped (counted), none lost silently; drops begin only past
    # the 2,000 the queue holds (how many are submitted in 3 s depends on the machine).
    assert r["stored"] + r["dropped"] == r["submitted"] > 2_000
    # SQLite says "disk I/O error" for a write past the file size limit.
    assert any("write failed" in line and "error" in line for line in r["log"]), r["log"][:5]
    assert any("dropped" in line and "writes failing" in line for line in r["log"]), r["log"][:5]
    assert r["worst_submit_s"] < 0.1  # 100 submits; a blocked one would take the backoff or more
    assert r["close_s"] < 2.0  # close does not wait on a disk that takes nothing
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0] > 0
    finally:
        conn.close()


# `python -m ondo ...` with files limited to 256 KiB (a full disk), set inside the child:
# a preexec_fn would make the test process fork a copy of itself, which a large test
# process on a small machine may be refused (ENOMEM).
_WITH_FILE_SIZE_LIMIT = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024)); "
    "sys.argv[0] = 'ondo'; runpy.run_module('ondo', run_name='__main__', alter_sys=True)")


@pytest.mark.slow
def test_ondo_serve_keeps_serving_on_a_full_disk(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "serve.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, "serve", "--port", str(port),
         "--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64", "--telemetry", "sim",
         "--telemetry-hz", "100", "--telemetry-db", str(db), "--shutdown-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, base, 180)
        deadline = time.monotonic() + 180

        def write_errors() -> float:
            for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
                if line.startswith("ondo:telemetry_store_write_errors_total"):
                    return float(line.rsplit(" ", 1)[1])
            raise AssertionError("no write error counter in /metrics")

        # Samples queue in memory while the disk takes nothing (they are dropped, counted,
        # once the queue is full, minutes later at this rate); serving goes on regardless.
        body = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
        served = 0
        while write_errors() == 0 or served < 10:  # the disk fills up as requests keep coming
            assert time.monotonic() < deadline, "the store never failed to write"
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            served += 1
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 20  # the store's close did not hang on the disk
        log = proc.stdout.read()
        assert "telemetry store write failed" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


@pytest.mark.slow
def test_sigkill_of_ondo_serve_under_load_leaves_a_database_that_opens_and_verifies(tmp_path):
    """The whole server killed while it serves, samples GPU telemetry at 100 Hz and logs
    events (every request misses a 1 us TTFT objective): the database opens, its event
    chain verifies, and the samples reach to within a second of the kill."""
    import threading

    from ondo.events.verify import verify
    from tests.server_process import launch_server
    from tests.tokenizer_families import tiny_model_folder

    model = tiny_model_folder("byte_level_bpe", str(tmp_path / "model"))
    db = tmp_path / "serve.db"
    proc, base = launch_server(model, "--device", "cpu", "--max-model-len", "256",
                               "--num-kv-blocks", "64", "--engine-process", "--telemetry", "sim",
                               "--telemetry-hz", "100", "--telemetry-db", str(db),
                               "--slo-ttft-s", "0.000001", "--slo-tpot-s", "1000",
                               "--detector", "slo_min_violations=1")
    children = _children(proc.pid)
    served: list[int] = []
    stop = threading.Event()

    def load() -> None:
        body = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
        while not stop.is_set():
            try:
                r = httpx.post(base + "/v1/completions", json=body, timeout=30)
                served.append(r.status_code)
            except httpx.HTTPError:
                return  # the server is gone

    client = threading.Thread(target=load, daemon=True)
    try:
        client.start()
        deadline = time.monotonic() + 60
        while len(served) < 5 or not _has_events(base):
            assert time.monotonic() < deadline and proc.poll() is None, "no events logged"
            time.sleep(0.1)
        time.sleep(0.5)
        killed_wall_s = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # the engine process, if it outlived its server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        client.join(60)
    assert served and set(served) == {200}
    assert os.path.exists(str(db) + "-wal")  # killed with its log not checkpointed
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        last_sample_s, samples = conn.execute(
            "SELECT MAX(t_wall_s), COUNT(*) FROM gpu_samples").fetchone()
    finally:
        conn.close()
    assert samples > 100
    assert 0 <= killed_wall_s - last_sample_s <= 1.0, f"{killed_wall_s - last_sample_s:.3f} s lost"
    result = verify(db)
    assert result.ok and result.entries >= 1, result.describe()


def _has_events(base: str) -> bool:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("ondo:event_log_entries "):
            return float(line.rsplit(" ", 1)[1]) >= 1
    return False
