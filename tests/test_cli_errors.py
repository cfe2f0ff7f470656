"""Bad input to the `ondo` commands gets one clear line and exit status 2, never a
traceback; a defect still raises."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

import ondo.cli
from ondo.cli_errors import describe_user_error, user_error


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "no_time.csv").write_text("a,b\n1,2\n")
    (tmp_path / "bad_cell.csv").write_text("t,temp_c,sm_mhz\n0.0,40,1980\n0.1,hot,1980\n")
    (tmp_path / "garbage.db").write_text("this is no database\n")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE x (a)").connection.close()
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1, 2]")
    return {name: str(tmp_path / name) for name in
            ("no_time.csv", "bad_cell.csv", "garbage.db", "other.db", "bad.json", "list.json", "missing.csv",
             "missing.db")} | {"no_folder_db": str(tmp_path / "no" / "folder" / "t.db"), "dir": str(tmp_path)}


CASES = [
    (["telemetry", "record", "--source", "replay", "--trace", "{no_time.csv}", "--db", "{dir}/t.db"],
     "{no_time.csv}: not a trace: its header has no time column 't' (columns: a, b)"),
    (["telemetry", "record", "--source", "replay", "--trace", "{bad_cell.csv}", "--db", "{dir}/t.db"],
     "{bad_cell.csv}: line 3: column 'temp_c': 'hot' is not a number"),
    (["telemetry", "record", "--source", "sim", "--seconds", "-1", "--db", "{dir}/t.db"],
     "--seconds must be 0 or more (inf: until interrupted), got -1.0"),
    (["telemetry", "record", "--source", "sim", "--seconds", "nan", "--db", "{dir}/t.db"],
     "--seconds must be 0 or more (inf: until interrupted), got nan"),
    (["telemetry", "record", "--source", "sim", "--sim-load", "nan,nan", "--seconds", "0", "--db", "{dir}/t.db"],
     "--sim-load 'nan,nan': C and M are utilizations, each in [0, 1]"),
    (["telemetry", "record", "--source", "sim", "--raw-retention-s", "nan", "--seconds", "0", "--db", "{dir}/t.db"],
     "--raw-retention-s must be a number of seconds above 0, got nan"),
    (["telemetry", "record", "--source", "sim", "--sim-load", "busy", "--seconds", "0", "--db", "{dir}/t.db"],
     "--sim-load 'busy': expected idle, step or C,M"),
    (["telemetry", "record", "--source", "sim", "--seconds", "0", "--db", "{no_folder_db}"],
     "--db {no_folder_db}: unable to open database file"),
    (["telemetry", "record", "--source", "sim", "--seconds", "0", "--db", "{garbage.db}"],
     "--db {garbage.db}: file is not a database"),
    (["telemetry", "export", "--db", "{missing.db}", "-o", "{dir}/x.csv"], "{missing.db}: no such database"),
    (["telemetry", "export", "--db", "{other.db}", "-o", "{dir}/x.csv"],
     "{other.db}: not a telemetry database (no engine_steps or gpu_samples table)"),
    (["telemetry", "export", "--db", "{garbage.db}", "-o", "{dir}/x.csv"], "--db {garbage.db}: file is not a database"),
    (["twin", "fit", "--trace", "{missing.csv}", "-o", "{dir}/p.json"], "No such file or directory"),
    (["twin", "fit", "--trace", "{no_time.csv}", "-o", "{dir}/p.json"],
     "{no_time.csv}: no column 't', which an NVML trace needs"),
    (["twin", "predict", "--params", "{bad.json}", "--trace", "{no_time.csv}", "-o", "{dir}/f.csv"],
     "--params {bad.json}: not a JSON file"),
    (["twin", "predict", "--params", "{list.json}", "--trace", "{no_time.csv}", "-o", "{dir}/f.csv"],
     "--params {list.json}: not twin params"),
    (["twin", "history", "--db", "{garbage.db}"], "--db {garbage.db}: file is not a database"),
    (["events", "tail", "--db", "{garbage.db}"], "--db {garbage.db}: file is not a database"),
    (["analyze", "--db", "{garbage.db}"], "--db {garbage.db}: file is not a database"),
    (["agent", "recommend", "--db", "{garbage.db}", "--rules-only"], "--db {garbage.db}: file is not a database"),
    (["console", "token", "list", "--db", "{garbage.db}"], "--db {garbage.db}: file is not a database"),
    (["console", "token", "list", "--db", "{missing.db}"], "--db {missing.db}: no such database"),
    (["console", "token", "revoke", "deadbeef", "--db", "{other.db}"], "no active token 'deadbeef'"),
    (["console", "token", "create", "--role", "viewer", "--name", "", "--db", "{dir}/c.db"], "--name ''"),
    (["console", "--db", "{garbage.db}", "--port", "0"], "--db {garbage.db}: file is not a database"),
    (["console", "--db", "{dir}", "--port", "0"], "is a folder, not a database"),
    (["analyze", "--db", "{garbage.db}", "--bin-s", "inf"], "--bin-s must be a number of seconds above 0, got inf"),
    (["bench", "governor", "--scenario", "nominal", "--duration-s", "inf"], "--duration-s must be above 20"),
    (["generate", "--model", "{dir}/no-model", "--prompt", "hi", "--device", "cpu"], "model config not found"),
]


def fill(text: str, files: dict[str, str]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", path)
    return text


@pytest.mark.parametrize("argv, says", CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_one_line_and_status_2(files, capsys, caplog, argv, says):
    with caplog.at_level(logging.ERROR):
        rc = ondo.cli.main([fill(a, files) for a in argv])
    err = capsys.readouterr().err + caplog.text  # `ondo telemetry` logs its errors
    assert rc == 2, err
    assert fill(says, files) in err
    assert "Traceback" not in err


def test_a_defect_still_raises(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug, not bad input")

    parser = ondo.cli.build_parser()
    args = parser.parse_args(["analyze", "--db", "x.db"])
    monkeypatch.setattr(ondo.cli.argparse.ArgumentParser, "parse_args", lambda self, argv=None: args)
    args.func = broken
    with pytest.raises(RuntimeError, match="a bug"):
        ondo.cli.main([])
    assert not user_error(RuntimeError()) and not user_error(KeyError("t"))


def test_the_traceback_is_kept_at_debug(files, caplog):
    with caplog.at_level(logging.DEBUG, logger="ondo"):
        assert ondo.cli.main(["--log-level", "DEBUG", "twin", "history", "--db", files["garbage.db"]]) == 2
    failed = [r for r in caplog.records if r.getMessage() == "twin failed"]
    assert failed and failed[0].exc_info is not None


def test_database_errors_name_the_db_once():
    class Args:
        db = "t.db"

    assert describe_user_error(sqlite3.DatabaseError("file is not a database"), Args()) == \
        "--db t.db: file is not a database"
    assert describe_user_error(sqlite3.OperationalError("t.db is locked"), Args()) == "t.db is locked"
    assert describe_user_error(ValueError("--bin-s must be > 0"), Args()) == "--bin-s must be > 0"
