"""Bad input to `ondo twin fit|predict|adapt|history` ends with one `error: ...` line naming
the flag and exit status 2, before anything is fitted or written, and no input is lost.

Everything runs in-process on a 6 s cut of the shared H100 trace, so each command takes a
second or two at most."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ondo.cli import main as cli_main
from ondo.twin.params import TwinParams

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"
PACKAGED_PARAMS = (
    ROOT / "ondo/twin/h100_params.json",
    ROOT / "ondo/twin/h200_params.json",
    ROOT / "ondo/control/sim/h100_serving_params.json",
)
SHORT_ROWS = 400  # the first 5.7869 s of h100_prbs.csv


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    lines = (TRACES / "h100_prbs.csv").read_text().splitlines(keepends=True)
    short = tmp_path / "tr.csv"
    short.write_text("".join(lines[: SHORT_ROWS + 1]))
    params = tmp_path / "pp.json"
    params.write_text((ROOT / "ondo/twin/h100_params.json").read_text())
    (tmp_path / "notdb.txt").write_text("this is not a trace\n")
    (tmp_path / "notjson.txt").write_text("hello\n")
    (tmp_path / "adir").mkdir()
    return {
        "trace": short,
        "params": params,
        "notdb": tmp_path / "notdb.txt",
        "notjson": tmp_path / "notjson.txt",
        "dir": tmp_path,
        "out": tmp_path / "out.csv",
    }


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture()
def ondo(capsys) -> Run:
    """`ondo ARGS...` in-process: (exit status, stdout, stderr)."""

    def run(*argv: object) -> tuple[int, str, str]:
        rc = cli_main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def refused(got: tuple[int, str, str], *words: str) -> str:
    """Asserts exit status 2, one `error:` line holding every word, and no traceback."""
    rc, _, err = got
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def strict_json(text: str) -> dict:
    """JSON as the standard has it: NaN and Infinity are refused."""

    def no_constant(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=no_constant)


# 1. The horizon: finite, positive, at most the trace's length.


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["predict", "adapt"])
@pytest.mark.parametrize("horizon, words", [
    ("inf", ["--horizon-s", "positive", "inf"]),
    ("nan", ["--horizon-s", "positive", "nan"]),
    ("-5", ["--horizon-s", "positive", "-5"]),
    ("1e12", ["--horizon-s 1e+12", "longer than --trace", "at most 5.786"]),
])
def test_horizon_must_be_finite_positive_and_within_the_trace(ondo, files, command, horizon,
                                                             words):
    got = ondo("twin", command, "--trace", files["trace"], "--horizon-s", horizon,
               "-o", files["out"])
    refused(got, *words)
    assert not files["out"].exists()


def test_a_horizon_as_long_as_the_trace_is_forecast(ondo, files):
    rc, _, err = ondo("twin", "predict", "--trace", files["trace"], "--horizon-s", "5.7869",
                      "-o", files["out"])
    assert rc == 0, err
    assert len(files["out"].read_text().splitlines()) == SHORT_ROWS + 1


@pytest.mark.timeout(60)
def test_replay_past_the_trace_stops_at_its_end():
    """Beyond the trace every row is forecast from the first: as with the trace's length
    for a horizon, and in as many steps, not the 1e11 a horizon of 1e9 s would take."""
    from ondo.twin.params import h100_params
    from ondo.twin.replay import replay
    from ondo.twin.traces import read_trace

    tr = read_trace(TRACES / "h100_prbs.csv").window(-np.inf, 2.0)
    length_s = float(tr.t_s[-1] - tr.t_s[0])
    far, within = replay(h100_params(), tr, 1e9), replay(h100_params(), tr, length_s)
    np.testing.assert_array_equal(far.temp_c_pred, within.temp_c_pred)
    with pytest.raises(ValueError, match="positive"):
        replay(h100_params(), tr, -5.0)


# 2. `twin fit --until-s`: at most one per trace, each leaving rows to fit on.


@pytest.mark.parametrize("until, words", [
    (["1", "2"], ["2 --until-s for 1 --trace", "at most one per --trace"]),
    (["0"], ["--until-s 0", "leaves no row", "tr.csv"]),
    (["-5"], ["--until-s -5", "leaves no row"]),
    (["nan"], ["--until-s nan", "tr.csv"]),
])
def test_fit_until_is_checked_before_fitting(ondo, files, until, words):
    argv = ["twin", "fit", "--trace", files["trace"]]
    for u in until:
        argv += ["--until-s", u]
    out = files["dir"] / "fit.json"
    refused(ondo(*argv, "-o", out), *words)
    assert not out.exists()


# 3. `--params`: every constant, each a finite number, nothing else.


def _params_with(files: dict[str, Path], **changes: object) -> Path:
    data = json.loads(files["params"].read_text())
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    path = files["dir"] / "changed.json"
    path.write_text(json.dumps(data))
    return path


_DROP = object()


@pytest.mark.parametrize("command", ["predict", "adapt"])
@pytest.mark.parametrize("changes, words", [
    ({"ambient_c": None}, ["ambient_c must be a finite number, got null"]),
    ({"ambient_c": "25"}, ["ambient_c must be a finite number, got \"25\""]),
    ({"power_limit_w": True}, ["power_limit_w must be a finite number, got true"]),
    ({"die_sink_c_per_w": float("nan")}, ["die_sink_c_per_w must be a finite number"]),
    ({"ambient_c": _DROP}, ["not twin params", "missing ambient_c"]),
    ({"ambiant_c": 25.0}, ["not twin params", "unknown keys ambiant_c"]),
    ({"notes": [1]}, ["notes must be a JSON object"]),
])
def test_params_file_constants_are_checked(ondo, files, command, changes, words):
    path = _params_with(files, **changes)
    got = ondo("twin", command, "--params", path, "--trace", files["trace"], "--horizon-s", "2",
               "-o", files["out"])
    refused(got, f"--params {path}", *words)
    assert not files["out"].exists()


def test_an_empty_object_or_another_json_file_is_not_params(ondo, files):
    empty = files["dir"] / "empty.json"
    empty.write_text("{}")
    got = ondo("twin", "predict", "--params", empty, "--trace", files["trace"], "-o",
               files["out"])
    refused(got, f"--params {empty}", "not twin params", "missing sm_max_mhz", "more")
    facts = TRACES / "h100_facts.json"
    got = ondo("twin", "predict", "--params", facts, "--trace", files["trace"], "-o",
               files["out"])
    refused(got, f"--params {facts}", "not twin params", "unknown keys name")
    assert not files["out"].exists()


def test_events_replay_refuses_a_null_constant(ondo, files):
    path = _params_with(files, ambient_c=None)
    db = files["dir"] / "events.db"
    got = ondo("events", "replay", "--trace", files["trace"], "--db", db, "--params", path)
    refused(got, f"--params {path}", "ambient_c must be a finite number")
    assert not db.exists()


@pytest.mark.parametrize("path", PACKAGED_PARAMS, ids=lambda p: p.name)
def test_the_packaged_params_still_load_with_every_value(path):
    data = json.loads(path.read_text())
    p = TwinParams.load(path)
    for key, value in data.items():
        assert getattr(p, key) == value, key
    assert TwinParams.from_dict(asdict(p)) == p


def test_params_without_the_engine_load_map_get_the_identity_map():
    """h100_params.json was fitted before the map existed: it has none, and means none."""
    data = json.loads((ROOT / "ondo/twin/h100_params.json").read_text())
    assert "engine_compute_gain" not in data
    p = TwinParams.from_dict(data)
    assert (p.engine_compute_gain, p.engine_compute_inv_max, p.engine_memory_gain) == (
        1.0, 0.0, 1.0)


# 4. `twin fit --facts`: a file named must exist and hold NVML facts.


@pytest.mark.parametrize("name, content, words", [
    ("nope.json", None, ["cannot read it", "No such file"]),
    ("notjson.txt", "hello\n", ["not a JSON file"]),
    ("params.json", (ROOT / "ondo/twin/h100_params.json").read_text(), ["not NVML facts"]),
    ("null.json", json.dumps({"thr_gpu_max": None}), ["thr_gpu_max must be a number"]),
], ids=["missing", "not json", "params", "null"])
def test_fit_facts_named_must_be_facts(ondo, files, name, content, words):
    facts = files["dir"] / name
    if content is not None:
        facts.write_text(content)
    out = files["dir"] / "fit.json"
    got = ondo("twin", "fit", "--trace", files["trace"], "--until-s", "1", "--facts", facts,
               "-o", out)
    refused(got, f"--facts {facts}", *words)
    assert not out.exists()


def test_fit_without_facts_still_takes_those_beside_the_trace(ondo, files):
    facts = json.loads((TRACES / "h100_facts.json").read_text())
    (files["dir"] / "h100_facts.json").write_text(json.dumps({**facts, "thr_gpu_max": 80}))
    out = files["dir"] / "fit.json"
    rc, _, err = ondo("twin", "fit", "--trace", files["trace"], "--until-s", "3", "-o", out)
    assert rc == 0, err
    assert TwinParams.load(out).sw_thermal_c == 80.0


def test_a_fit_that_runs_off_is_not_written(ondo, files):
    """One second of the trace leaves the board's capacitance free: the fit sends it to
    infinity, and a params file holding that could not be loaded."""
    out = files["dir"] / "fit.json"
    got = ondo("twin", "fit", "--trace", files["trace"], "--until-s", "1", "-o", out)
    refused(got, f"-o {out} not written", "board_c_j_per_c must be a finite number",
            "--until-s")
    assert not out.exists()


# 5. `--score-from-s`: finite, and leaving rows to score; the score is JSON.


@pytest.mark.parametrize("command", ["predict", "adapt"])
@pytest.mark.parametrize("from_s, words", [
    ("nan", ["--score-from-s must be a finite number", "nan"]),
    ("inf", ["--score-from-s must be a finite number", "inf"]),
    ("1e9", ["--score-from-s 1e+09", "no row", "to score"]),
])
def test_score_from_is_finite_and_leaves_rows(ondo, files, command, from_s, words):
    got = ondo("twin", command, "--trace", files["trace"], "--horizon-s", "2",
               "--score-from-s", from_s, "-o", files["out"])
    refused(got, *words)
    assert "NaN" not in got[1]
    assert not files["out"].exists()


@pytest.mark.parametrize("command", ["predict", "adapt"])
def test_a_score_is_strict_json(ondo, files, command):
    rc, out, err = ondo("twin", command, "--trace", files["trace"], "--horizon-s", "2",
                        "--score-from-s", "3", "-o", files["out"])
    assert rc == 0, err
    score = strict_json(out.strip().splitlines()[-1])
    assert score["rows"] > 0 and math.isfinite(score["temp_rmse_c"])


def test_score_json_writes_null_for_a_figure_of_no_readings():
    from ondo.twin.cli_checks import score_json

    line = score_json(2.0, 3.0, {"rows": 5, "temp_band_coverage": math.nan})
    assert strict_json(line)["temp_band_coverage"] is None


# 6. An output that is also an input is refused; the input is left as it was.


@pytest.mark.parametrize("case", [
    "predict -o trace", "predict -o ./trace", "predict -o params", "adapt -o trace",
    "adapt -o params", "adapt --trajectory trace", "adapt --trajectory -o", "fit -o trace",
])
def test_an_output_that_is_an_input_is_refused(ondo, files, case):
    command, flag, which = case.split()
    trace, params = files["trace"], files["params"]
    # "./trace": the same file spelled otherwise (Path would drop the "/./").
    target = {"trace": trace, "./trace": f"{trace.parent}/./{trace.name}", "params": params,
              "-o": files["out"]}[which]
    kept = {p: p.read_bytes() for p in (trace, params)}
    if command == "predict":
        argv = ["predict", "--trace", trace, "--params", params, "--horizon-s", "2",
                "-o", target]
    elif command == "adapt" and flag == "-o":
        argv = ["adapt", "--trace", trace, "--params", params, "--horizon-s", "2", "-o", target]
    elif command == "adapt":
        argv = ["adapt", "--trace", trace, "--params", params, "--horizon-s", "2",
                "-o", files["out"], "--trajectory", target]
    else:
        argv = ["fit", "--trace", trace, "--until-s", "1", "-o", target]
    also = {"trace": "--trace", "./trace": "--trace", "params": "--params", "-o": "-o"}[which]
    refused(ondo("twin", *argv), f"{flag} {target} is also {also}", "choose another file")
    for path, content in kept.items():
        assert path.read_bytes() == content
    assert not files["out"].exists()


# 7. Every refusal says `error:` with exit status 2; `twin history`'s databases.


def test_adapt_refusals_say_error(ondo, files):
    refused(ondo("twin", "adapt", "--trace", files["dir"] / "no_such.csv", "-o", files["out"]),
            "--trace: ", "no_such.csv: cannot read it")
    refused(ondo("twin", "adapt", "--trace", files["trace"], "--horizon-s", "0",
                 "-o", files["out"]), "--horizon-s must be a positive")


def test_refit_thermal_without_engine_load_says_error(ondo, files):
    refused(ondo("twin", "fit", "--refit-thermal", "--trace", files["trace"],
                 "-o", files["dir"] / "p.json"), "--refit-thermal goes with --engine-load")


@pytest.mark.parametrize("command", ["predict", "adapt", "fit"])
def test_a_file_that_is_no_trace_is_named_so_by_each_command(ondo, files, command):
    out = files["dir"] / ("p.json" if command == "fit" else "p.csv")
    got = ondo("twin", command, "--trace", files["notdb"], "-o", out)
    refused(got, f"--trace: {files['notdb']}", "not a trace this reader knows")


def _history(ondo: Run, db: object, *more: str) -> tuple[int, str, str]:
    return ondo("twin", "history", "--db", db, *more)


def test_history_of_a_missing_file_or_a_folder(ondo, files):
    missing = files["dir"] / "nope.db"
    refused(_history(ondo, missing), f"--db {missing}: no such database")
    assert not missing.exists()
    refused(_history(ondo, files["dir"] / "adir"), "is a folder, not a database")


def test_history_of_a_file_that_is_no_database(ondo, files):
    refused(_history(ondo, files["notdb"]), f"--db {files['notdb']}", "not a database")


@pytest.mark.parametrize("kind", ["empty file", "other tables", "empty twin table"])
def test_history_of_a_database_without_twin_constants(ondo, files, kind):
    db = files["dir"] / "t.db"
    if kind == "empty file":
        db.write_bytes(b"")
    else:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE gpu_samples (t REAL)")
        if kind == "empty twin table":
            from ondo.twin.store_tables import TWIN_PARAMS_TABLE

            conn.executescript(TWIN_PARAMS_TABLE.ddl)
        conn.commit()
        conn.close()
    got = _history(ondo, db)
    refused(got, f"--db {db}", "no twin constants saved")
    assert got[1] == ""


def test_history_of_a_gpu_not_in_the_database(ondo, files):
    from ondo.telemetry.store import TelemetryStore
    from ondo.twin.adapt_params import theta_from_params
    from ondo.twin.params import h100_params
    from ondo.twin.store_tables import TWIN_TABLES, AdaptedConstants

    db = files["dir"] / "t.db"
    theta = theta_from_params(h100_params(), "engine")
    store = TelemetryStore(db, tables=TWIN_TABLES)
    store.submit(AdaptedConstants("GPU-aa", "NVIDIA H200", 0, 1.8e9, 0.0, "h200_params.json",
                                  "engine", tuple(theta), tuple([0.01] * len(theta)), 30.0,
                                  1000, 100.0, 50))
    store.close()
    refused(_history(ondo, db, "--gpu", "GPU-bb"), "--gpu GPU-bb", "saved: GPU-aa")
    rc, out, err = _history(ondo, db, "--gpu", "GPU-aa")
    assert rc == 0, err
    assert strict_json(out.strip().splitlines()[-1])["GPU-aa"]["saved"] == 1


@pytest.mark.parametrize("command", ["predict", "adapt"])
def test_an_output_with_no_folder_is_refused_before_the_run(files, capsys, command):
    out = files["dir"] / "no" / "folder" / "out.csv"
    with pytest.raises(SystemExit) as stop:  # argparse's refusal, as for any bad flag
        cli_main(["twin", command, "--trace", str(files["trace"]), "--horizon-s", "2",
                  "-o", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument -o/--output: no folder" in err and "Traceback" not in err
