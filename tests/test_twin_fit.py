"""`ondo twin fit` identifies the plant from a trace with small residuals."""

import argparse
import json
from pathlib import Path

from ondo.twin.cli import register
from ondo.twin.params import TwinParams

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"


def test_fit_cli_on_first_minute_of_prbs_has_small_residuals(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "params.json"
    args = parser.parse_args(
        ["twin", "fit", "--trace", str(TRACES / "h100_prbs.csv"), "--until-s", "60", "-o", str(out)]
    )
    assert args.func(args) == 0
    assert "residuals" in capsys.readouterr().out
    p = TwinParams.load(out)
    res = p.notes["residuals"]
    assert res["fast power RMS [W]"] < 30
    assert res["h100_prbs.csv[-inf:60] temp_c RMS [C]"] < 1.5
    assert res["h100_prbs.csv[-inf:60] mem_temp_c RMS [C]"] < 1.5
    assert res["h100_prbs.csv[-inf:60] sm_mhz RMS [MHz]"] < 90
    assert p.power_limit_w == 700.0 and p.hw_slowdown_c == 89.0  # from NVML facts, not fitted
    json.loads(out.read_text())


def test_committed_params_are_what_the_cli_fit_reproduces(tmp_path):
    committed = TwinParams.load(Path(__file__).resolve().parents[1] / "ondo/twin/h100_params.json")
    assert committed.notes["fitted_on"] == ["h100_step.csv", "h100_prbs.csv[-inf:77]"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "params.json"
    argv = [
        "twin",
        "fit",
        "--trace",
        str(TRACES / "h100_step.csv"),
        "--trace",
        str(TRACES / "h100_prbs.csv"),
    ]
    argv += ["--until-s", "inf", "--until-s", "77", "-o", str(out)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    refit = TwinParams.load(out)
    for name in (
        "compute_power_w",
        "die_sink_c_per_w",
        "board_c_j_per_c",
        "sink_board_c_per_w",
        "cap_gain_mhz_per_w_s",
    ):
        assert abs(getattr(refit, name) - getattr(committed, name)) <= 0.01 * abs(
            getattr(committed, name)
        ), name
