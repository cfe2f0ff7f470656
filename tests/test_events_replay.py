"""`ondo events replay` on the committed traces: the expected episodes, the same log twice
(in one process and across processes), clear errors for bad traces with nothing left behind,
and a replay killed mid-way that still verifies."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ondo.cli
from bench.events_replay import write_synthetic_trace
from ondo.events.replay import replay_trace
from ondo.events.table import EventQuery, read_events
from ondo.events.trace_input import TraceError
from ondo.events.verify import verify

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "data" / "traces"
H200 = TRACES / "ondo_serving_steps_w1_qwen3-0.6b_h200.csv"


def events_of(db: Path, *kinds: str) -> list[dict]:
    conn = sqlite3.connect(db)
    try:
        return list(read_events(conn, EventQuery(kinds=kinds)))
    finally:
        conn.close()


def episodes(db: Path, reason: str = "sw_power_cap") -> list[tuple[float, float | None]]:
    """(start, end) of each throttle episode of `reason` in the log."""
    out: dict[int, list] = {}
    for e in events_of(db, "throttle_started", "throttle_ended"):
        if e["payload"]["reason"] != reason:
            continue
        if e["kind"] == "throttle_started":
            out[e["seq"]] = [e["payload"]["since_s"], None]
        else:
            out[e["payload"]["onset_seq"]][1] = e["payload"]["ended_s"]
    return [tuple(v) for v in out.values()]


def phase_segments(trace: Path) -> list[tuple[str, float, float]]:
    with open(trace, newline="") as f:
        rows = [(r["phase"], float(r["t"])) for r in csv.DictReader(f)]
    segments, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][0] != rows[start][0]:
            segments.append((rows[start][0], rows[start][1], rows[i - 1][1]))
            start = i
    return segments


def test_h100_step_gives_one_power_cap_episode_over_the_matmul_phase(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    summary = replay_trace(TRACES / "h100_step.csv", db)
    (start, end), = episodes(db)
    load = next(s for s in phase_segments(TRACES / "h100_step.csv") if s[0] == "load")
    assert load[1] <= start <= load[1] + 1.0  # the cap follows the load within a second
    assert load[2] <= end <= load[2] + 1.5  # and lets go within the averaging window
    assert [e["payload"]["since_s"] for e in events_of(db, "power_cap_sustained")] == [start]
    assert summary.gpu_rows == 12_473 and summary.twin_snapshots == 185
    assert verify(db).ok and verify(db).entries == summary.events


def test_h100_prbs_power_cap_episodes_sit_on_the_matmul_steps_never_on_idle(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    replay_trace(TRACES / "h100_prbs.csv", db)
    segments = phase_segments(TRACES / "h100_prbs.csv")
    eps = episodes(db)
    assert len(eps) == 8

    def phase_at(t: float) -> str:
        return next(p for p, a, b in segments if a <= t <= b + 0.02)

    assert all(phase_at(start) == "mm" for start, _ in eps)
    # Every matmul step of a second or more has its episode.
    for phase, a, b in segments:
        if phase == "mm" and b - a >= 1.0:
            assert any(start <= b and end >= a for start, end in eps), (a, b)
    # No episode reaches more than a second into an idle stretch (NVML's averaged power lags).
    for phase, a, b in segments:
        if phase == "idle" and b - a >= 3.0:
            assert not any(start < b and end > a + 1.0 for start, end in eps), (a, b)


def test_h200_serving_trace_caps_during_load_and_never_while_idle(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    summary = replay_trace(H200, db)
    eps = episodes(db)
    assert len(eps) == 5
    conn = sqlite3.connect(db)
    steps = np.array(conn.execute(
        "SELECT start_monotonic_s, end_monotonic_s FROM engine_steps ORDER BY end_monotonic_s"
    ).fetchall())
    gpu_rows = conn.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0]
    conn.close()
    assert gpu_rows == summary.gpu_rows == 1801 and len(steps) == summary.engine_rows == 7627
    for start, _ in eps:  # an engine step ran within 0.1 s before each episode began
        i = np.searchsorted(steps[:, 1], start - 0.1)
        assert i < len(steps) and steps[i, 0] <= start, start
    # The idle stretches (before the first step, between the two load phases, after the
    # last step) hold no episode.
    pauses = [(a, b) for a, b in zip(steps[:-1, 1], steps[1:, 0]) if b - a > 1.0]
    assert len(pauses) == 1 and pauses[0][1] - pauses[0][0] > 19.0  # the schedule's idle 20 s
    idle = [(-np.inf, steps[0, 0]), *pauses, (steps[-1, 1], np.inf)]
    for a, b in idle:
        assert not any(a + 1.0 < s < b for s, _ in eps)
    assert summary.by_kind == {"throttle_ended": 5, "throttle_started": 5}


def test_replaying_a_trace_twice_gives_the_same_log(tmp_path: Path) -> None:
    a = replay_trace(H200, tmp_path / "a.db")
    b = replay_trace(H200, tmp_path / "b.db")
    assert a.head_hash == b.head_hash and a.events == b.events == 10
    bodies = [[e["hash"] for e in events_of(db)] for db in (tmp_path / "a.db", tmp_path / "b.db")]
    assert bodies[0] == bodies[1]


def test_replays_in_two_processes_give_the_same_head_hash(tmp_path: Path) -> None:
    heads = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("one.db", "two.db"):
        out = subprocess.run(
            [sys.executable, "-m", "ondo", "events", "replay", "--trace",
             str(TRACES / "h100_prbs.csv"), "--db", str(tmp_path / name)],
            capture_output=True, text=True, env=env, timeout=300, check=True)
        heads.append(json.loads(out.stdout.strip().splitlines()[-1])["head_hash"])
    assert heads[0] == heads[1] == verify(tmp_path / "one.db").head_hash


def _cut(src: Path, dst: Path, keep_lines: int, tail: str = "") -> None:
    lines = src.read_text().splitlines(keepends=True)
    dst.write_text("".join(lines[:keep_lines]) + tail)


@pytest.mark.parametrize("mangle, message", [
    (lambda s: s.replace("\n0.5204,idle,38,", "\n0.5204,idle,thirty-eight,", 1),
     "line 38: column 'temp_c': 'thirty-eight' is not a number"),
    (lambda s: s.replace("\n0.5204,idle,38,", "\n0.5204,nap,38,", 1),
     "line 38: column 'phase'"),
    (lambda s: s.replace("\n0.5204,", "\n0.0001,", 1), "line 38: column 't': time goes backwards"),
])
def test_a_malformed_trace_names_its_line_and_leaves_no_database(tmp_path: Path, mangle, message,
                                                                 capsys) -> None:
    bad = tmp_path / "bad.csv"
    text = (TRACES / "h100_prbs.csv").read_text()
    assert "\n0.5204,idle,38," in text  # the row on line 38
    bad.write_text(mangle(text))
    db = tmp_path / "r.db"
    with pytest.raises(TraceError, match=message):
        replay_trace(bad, db)
    assert not db.exists()
    assert ondo.cli.main(["events", "replay", "--trace", str(bad), "--db", str(db)]) == 2
    assert message.split(":")[0] in capsys.readouterr().err
    assert not any(tmp_path.glob("r.db*"))


def test_a_truncated_trace_names_its_last_line_and_leaves_no_database(tmp_path: Path) -> None:
    trace = tmp_path / "cut.csv"
    text = H200.read_text()
    trace.write_text(text[: len(text) // 2])  # cut in the middle of a row
    n_lines = trace.read_text().count("\n") + 1
    with pytest.raises(TraceError, match=f"line {n_lines}: .* fields where the header has 41"):
        replay_trace(trace, tmp_path / "r.db")
    assert not any(tmp_path.glob("r.db*"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TraceError, match="line 1: the file is empty"):
        replay_trace(empty, tmp_path / "r.db")
    with pytest.raises(TraceError, match="column 'kind': 'cpu'"):
        trace.write_text(text.replace(",engine,", ",cpu,", 1))
        replay_trace(trace, tmp_path / "r.db")
    assert not any(tmp_path.glob("r.db*"))


def test_replay_refuses_to_write_into_an_existing_database(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    replay_trace(H200, db)
    with pytest.raises(FileExistsError, match="--overwrite"):
        replay_trace(H200, db)
    assert replay_trace(H200, db, overwrite=True).events == 10


def test_a_replay_killed_mid_way_leaves_a_log_that_verifies(tmp_path: Path) -> None:
    trace = tmp_path / "synthetic.csv"
    write_synthetic_trace(trace, seconds=240.0, hz=20.0)  # a power cap every 10 s of load
    db = tmp_path / "r.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ondo", "events", "replay", "--trace",
                             str(trace), "--db", str(db), "--speed", "10"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    count = 0
    deadline = time.monotonic() + 120
    try:
        while count < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            if db.exists():
                try:
                    with sqlite3.connect(db, timeout=1.0) as conn:
                        count = conn.execute("SELECT count FROM event_log_head").fetchone()[0]
                except sqlite3.Error:
                    pass
        assert proc.poll() is None, "the replay finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    result = verify(db)
    assert result.ok and result.entries >= 6
    full = replay_trace(trace, tmp_path / "full.db")
    assert result.entries < full.events
    # What the killed replay committed is the start of the full log, entry for entry.
    full_hashes = [e["hash"] for e in events_of(tmp_path / "full.db")]
    assert [e["hash"] for e in events_of(db)] == full_hashes[: result.entries]


# The heads docs/events.md records: the same bytes on every machine, not only in one process.
HEADS = [
    ("h100_step.csv", 4, "6a67f693ae36e1b1646580327f4d1915bb71c156380fcc783126c96b5b6c1e92"),
    ("h100_prbs.csv", 24, "a198fd8eabcf5c0afb047ee663c66a71315aec8b3495effdbb78e9e2123a2916"),
    ("ondo_serving_steps_w1_qwen3-0.6b_h200.csv", 10,
     "a9218180c17a00943444dc16c71498b92de4d4a43d5384d3470f58ff838a0773"),
    ("ondo_serving_w1_qwen3-0.6b_h100.csv", 0,
     "3d9e00fdd29289d42094671e8dc103827c4b52c1802a8de91090cf595bb6d688"),
]


@pytest.mark.parametrize("name, events, head", HEADS)
def test_the_committed_traces_replay_to_the_heads_the_docs_record(tmp_path: Path, name: str,
                                                                  events: int, head: str) -> None:
    summary = replay_trace(TRACES / name, tmp_path / "r.db")
    assert (summary.events, summary.head_hash) == (events, head)
    assert head in (ROOT / "docs" / "events.md").read_text()


def test_the_replayed_twin_sees_a_heating_die_coming_before_its_sensor(tmp_path: Path) -> None:
    """An NVML-format trace: idle 10 s, then full load with the die sensor climbing 1 C/s
    from 40 C, past the 87 C limit at 57 s (no thermal throttle bit is ever set)."""
    trace = tmp_path / "hot.csv"
    energy_j, rows = 1e6, []
    for i in range(3000):
        t = i * 0.02
        load = t >= 10.0
        temp = 40.0 + (t - 10.0) if load else 40.0
        power_w = (700.0 if load else 120.0) + (i % 7) * 0.5
        energy_j += power_w * 0.02
        rows.append({"t": round(t, 4), "phase": "load" if load else "idle0",
                     "temp_c": int(temp), "power_mw": int(power_w * 1000),
                     "energy_mj": int(energy_j * 1000), "sm_mhz": 1400 if load else 1980,
                     "mem_mhz": 2619, "event_reasons": 4 if load else 0,
                     "util": 100 if load else 0, "mem_temp_c": int(temp) + 3})
    with open(trace, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    db = tmp_path / "hot.db"
    summary = replay_trace(trace, db)
    assert summary.twin_snapshots == 59
    (predicted,) = events_of(db, "throttle_predicted")
    p = predicted["payload"]
    assert predicted["subject"] == {"gpu": 0, "reason": "thermal"} and p["basis"] == "replay twin"
    reaches_limit_s = 57.0  # the first reading of 87 C
    assert predicted["t_monotonic_s"] < reaches_limit_s
    assert abs(predicted["t_monotonic_s"] + p["time_to_throttle_s"] - reaches_limit_s) < 1.5
    margins = {e["subject"]["basis"]: e for e in events_of(db, "thermal_margin_low")}
    assert margins["forecast"]["t_monotonic_s"] < margins["measured"]["t_monotonic_s"]
    assert margins["measured"]["payload"]["temp_c"] == 83.0  # 4 C of margin, held 1 s
