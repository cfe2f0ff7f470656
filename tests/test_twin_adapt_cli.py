"""`ondo twin adapt` and `ondo twin history` from the command line, on committed traces and a
real SQLite file; bad input is refused with the flag, file and line named."""

import csv
import json
import math
import subprocess
import sys

import pytest

from ondo.twin.store_tables import AdaptedConstants

H100_SERVING = "data/traces/ondo_serving_w1_qwen3-0.6b_h100.csv"
H200_SERVING = "data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv"


def ondo(*args):
    return subprocess.run([sys.executable, "-m", "ondo", "twin", *args], capture_output=True,
                          text=True, timeout=600)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_adapt_writes_predict_columns_then_the_band_and_the_constants_over_time(tmp_path):
    pred, traj = tmp_path / "pred.csv", tmp_path / "traj.csv"
    got = ondo("adapt", "--trace", H200_SERVING, "--horizon-s", "10", "-o", str(pred),
               "--trajectory", str(traj), "--score-from-s", "30")
    assert got.returncode == 0, got.stderr
    rows = read_csv(pred)
    assert len(rows) == 1801
    assert list(rows[0])[:7] == ["t", "temp_c_pred", "mem_temp_c_pred", "power_w_pred",
                                 "sm_mhz_pred", "power_cap_pred", "thermal_slowdown_pred"]
    assert list(rows[0])[7:] == ["temp_c_lo", "temp_c_hi", "mem_temp_c_lo", "mem_temp_c_hi",
                                 "throttle_probability"]
    for r in rows[::100]:
        assert float(r["temp_c_lo"]) < float(r["temp_c_pred"]) < float(r["temp_c_hi"])
        assert 0.0 <= float(r["throttle_probability"]) <= 1.0
    assert float(rows[-1]["t"]) == pytest.approx(90.0, abs=0.05)
    score = json.loads(got.stdout.strip().splitlines()[-1])
    assert score["rows"] == 1201 and score["temp_rmse_c"] <= 1.5
    assert score["mem_temp_rmse_c"] <= 2.0 and score["temp_band_coverage"] >= 0.8
    t = read_csv(traj)
    assert len(t) == 1801
    assert {"inlet_c", "board_amb_c_per_w", "board_amb_c_per_w_std", "compute_w",
            "excited"} <= set(t[0])
    first, last = t[0], t[-1]
    assert float(first["board_amb_c_per_w"]) == pytest.approx(0.0217, abs=1e-4)  # H100's
    assert float(last["board_amb_c_per_w"]) < 0.015  # this H200 sheds heat more easily
    assert float(last["compute_w"]) > 10 * float(first["compute_w"])
    assert first["excited"] == "0" and any(r["excited"] == "1" for r in t)


def test_adapt_starts_from_the_params_given(tmp_path):
    params = tmp_path / "p.json"
    from ondo.twin.gpu_models import H200_PARAMS_PATH

    params.write_text(H200_PARAMS_PATH.read_text())
    pred, traj = tmp_path / "pred.csv", tmp_path / "traj.csv"
    got = ondo("adapt", "--trace", H100_SERVING, "--params", str(params), "--horizon-s", "2",
               "-o", str(pred), "--trajectory", str(traj))
    assert got.returncode == 0, got.stderr
    assert float(read_csv(traj)[0]["die_sink_c_per_w"]) == pytest.approx(0.0058, abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--trace", "no_such.csv"], "--trace: no_such.csv: cannot read it"),
    (["--trace", H100_SERVING, "--horizon-s", "0"], "--horizon-s must be a positive"),
    (["--trace", H100_SERVING, "--params", "no.json"], "--params no.json"),
])
def test_bad_input_is_refused_naming_the_flag(tmp_path, args, message):
    got = ondo("adapt", *args, "-o", str(tmp_path / "p.csv"))
    assert got.returncode == 2
    assert message in got.stderr
    assert not (tmp_path / "p.csv").exists()


def test_a_malformed_trace_line_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    lines = open(H100_SERVING).read().splitlines()
    fields = lines[5].split(",")
    fields[3] = "hot"  # temp_c
    lines[5] = ",".join(fields)
    bad.write_text("\n".join(lines) + "\n")
    got = ondo("adapt", "--trace", str(bad), "-o", str(tmp_path / "p.csv"))
    assert got.returncode == 2
    assert "line 6" in got.stderr and "temp_c" in got.stderr


def test_history_shows_each_gpu_constants_and_their_drift(tmp_path):
    from ondo.telemetry.store import TelemetryStore
    from ondo.twin.adapt_params import theta_from_params
    from ondo.twin.params import h100_params
    from ondo.twin.store_tables import TWIN_TABLES

    db = tmp_path / "t.db"
    theta = theta_from_params(h100_params(), "engine")
    store = TelemetryStore(db, tables=TWIN_TABLES)
    for k, scale in enumerate((1.0, 1.1, 1.25)):  # the board's resistance walking up
        th = theta.copy()
        th[3] += math.log(scale)
        store.submit(AdaptedConstants("GPU-aa", "NVIDIA H200", 0, 1.8e9 + 86400 * 7 * k, 0.0,
                                      "h200_params.json", "engine", tuple(th),
                                      tuple([0.01] * len(th)), 30.0, 1000, 100.0, 50))
    store.close()
    got = ondo("history", "--db", str(db))
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout.strip().splitlines()[-1])
    assert out["GPU-aa"]["saved"] == 3
    assert out["GPU-aa"]["drift"]["board_amb_c_per_w"] == pytest.approx(1.25)
    assert out["GPU-aa"]["drift"]["idle_power_w"] == pytest.approx(1.0)
    assert "GPU-aa (NVIDIA H200), 3 saved" in got.stdout
    missing = ondo("history", "--db", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "--db" in missing.stderr
