"""An `ondo` command never destroys its own input: an output path that is an input is
refused before anything is written (the input byte for byte as it was), and a tampered
column of the event log that would hide an entry from a query is found by verify."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

import ondo.cli

TRACES = Path(__file__).resolve().parent.parent / "data" / "traces"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def event_db(tmp_path_factory) -> Path:
    """A real event log (and its telemetry): the step trace replayed, as fast as it goes."""
    db = tmp_path_factory.mktemp("events") / "ev.db"
    assert ondo.cli.main(["events", "replay", "--trace", str(TRACES / "h100_step.csv"), "--db", str(db),
                          "--speed", "0"]) == 0
    return db


@pytest.fixture()
def copy(tmp_path, event_db) -> Path:
    out = tmp_path / "copy.db"
    shutil.copy(event_db, out)
    return out


@pytest.mark.parametrize("argv", [
    ["telemetry", "export", "--db", "{db}", "-o", "{db}"],
    ["telemetry", "export", "--db", "{db}", "--format", "parquet", "-o", "{db}"],
    ["events", "export", "--db", "{db}", "--format", "csv", "-o", "{db}"],
    ["events", "export", "--db", "{db}", "--format", "json", "-o", "{same}"],
], ids=["telemetry csv", "telemetry parquet", "events csv", "events json, another spelling"])
def test_an_export_onto_its_own_database_is_refused_and_the_database_kept(copy, capsys, argv):
    before = digest(copy)
    same = copy.parent / "." / copy.name  # the same file through another path
    rc = ondo.cli.main([a.replace("{db}", str(copy)).replace("{same}", str(same)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "is also --db: writing it would destroy that input" in err, err
    assert digest(copy) == before
    assert ondo.cli.main(["events", "verify", "--db", str(copy)]) == 0


def test_a_replay_onto_its_own_trace_is_refused_and_the_trace_kept(tmp_path, capsys):
    trace = tmp_path / "step.csv"
    shutil.copy(TRACES / "h100_step.csv", trace)
    before = digest(trace)
    rc = ondo.cli.main(["events", "replay", "--trace", str(trace), "--db", str(trace), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--db {trace} is also --trace" in err
    assert digest(trace) == before


def test_verify_finds_a_gpu_index_that_differs_from_the_body(copy, capsys):
    conn = sqlite3.connect(copy)
    rows = conn.execute("SELECT seq, gpu_index FROM events WHERE gpu_index IS NOT NULL").fetchall()
    assert rows  # the replayed events are about GPU 0
    seq = rows[0][0]
    triggers = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    for name in triggers:  # an attacker with the file can drop the append-only guards
        conn.execute(f"DROP TRIGGER {name}")
    for value in (7, None):
        conn.execute("UPDATE events SET gpu_index = ? WHERE seq = ?", (value, seq))
        conn.commit()
        assert ondo.cli.main(["events", "verify", "--db", str(copy)]) != 0
        out = capsys.readouterr()
        assert "gpu_index column differs from its body" in out.out + out.err
    conn.execute("UPDATE events SET gpu_index = ? WHERE seq = ?", (rows[0][1], seq))
    conn.commit()
    conn.close()
    assert ondo.cli.main(["events", "verify", "--db", str(copy)]) == 0


def test_analyze_refuses_a_bin_too_fine_for_memory(copy, capsys):
    assert ondo.cli.main(["analyze", "--db", str(copy), "--bin-s", "1e-9"]) == 2
    err = capsys.readouterr().err
    assert "bins over the record's" in err and "give a larger --bin-s" in err


def test_recording_until_the_end_of_a_replayed_trace_with_seconds_inf(tmp_path, capsys):
    db = tmp_path / "t.db"
    assert ondo.cli.main(["telemetry", "record", "--source", "replay", "--trace",
                          str(TRACES / "h100_step.csv"), "--speed", "0", "--seconds", "inf",
                          "--db", str(db)]) == 0
    assert '"stored": ' in capsys.readouterr().out
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM gpu_samples").fetchone()[0]
    assert rows > 10_000  # the whole trace


def test_a_bad_flag_creates_no_database(tmp_path, capsys):
    db = tmp_path / "t.db"
    assert ondo.cli.main(["telemetry", "record", "--source", "sim", "--sim-load", "2,0",
                          "--seconds", "0", "--db", str(db)]) == 2
    assert not db.exists()


def test_an_unknown_log_level_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        ondo.cli.main(["--log-level", "bogus", "events", "tail", "--db", "x.db"])
    assert e.value.code == 2 and "invalid choice: 'BOGUS'" in capsys.readouterr().err
