"""bench/outside_client.py on the CPU: a real `ondo serve` (tiny Llama shape, dummy weights)
measured by the official `openai` client from two worker processes, at saturation and at
two Poisson rates. Every request completes with exactly the tokens it asked for (the
server's usage count against the lengths rebuilt from the same seed), every prompt is the
length it was built to, TTFT comes before each stream's end, and percentiles are ordered.
Locust's three stages (`--locust`) are checked the same way, with its own statistics beside
ours. With an AIPerf executable (ONDO_AIPERF, or `aiperf` on PATH) its stage is checked too."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ondo.bench.aiperf_stage import aiperf_command, window_args
from ondo.bench.locust_stage import run_locust
from ondo.bench.outside_load import LoadRequest, LoadResult, make_load, summarize
from ondo.bench.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]
SMOKE_LEN = {"input": (4, 32), "output": (4, 24)}  # what --smoke sets


def run_smoke(tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "outside.json"
    proc = subprocess.run(
        [sys.executable, "bench/outside_client.py", "--smoke", "--port", str(_free_port()),
         "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("stage ") and "TTFT p99" in line for line in lines)
    result = json.loads(lines[-1])["outside_client"]
    assert json.loads(out.read_text())["outside_client"] == result
    return result


def _free_port() -> int:
    from tests.server_process import free_port

    return free_port()


def assert_ordered(stage: dict) -> None:
    for name in ("ttft_ms", "tpot_ms"):
        p = stage[name]
        assert 0.0 < p["p50"] <= p["p99"] <= p["max"], (stage["stage"], name, p)
    assert stage["ttft_ms"]["max"] <= 1e3 * stage["duration_s"]


def test_openai_client_stages_complete_every_request_with_its_tokens(tmp_path):
    result = run_smoke(tmp_path, "--prompt-kind", "text", "--offline-tok-s", "100")
    stages = result["stages"]
    assert [s["stage"].split()[:2] for s in stages] == [["openai", "saturation"],
                                                        ["openai", "poisson"],
                                                        ["openai", "poisson"]]
    vocab = SHAPES["tiny-llama"]["vocab_size"]
    rates = [math.inf, stages[1]["request_rate"], stages[2]["request_rate"]]
    assert 0 < rates[1] < rates[2]  # 0.5 and 0.8 of the saturation's request rate
    for seed, (stage, rate) in enumerate(zip(stages, rates)):
        requests = make_load(32, SMOKE_LEN["input"], SMOKE_LEN["output"], vocab, "text",
                             rate, seed)
        assert stage["requests"] == stage["completed"] == 32 and stage["failed"] == 0
        assert stage["short"] == 0 and stage["prompt_len_mismatch"] == 0
        assert stage["output_tokens"] == sum(r.max_tokens for r in requests)
        assert stage["ttft_after_end"] == 0
        assert stage["processes"] == 2
        assert stage["output_tokens_per_s"] == pytest.approx(
            stage["output_tokens"] / stage["duration_s"])
        assert stage["fraction_of_offline"] == pytest.approx(stage["output_tokens_per_s"] / 100)
        assert 0.0 < stage["client_cpu_share_max"] < 1.5
        assert_ordered(stage)
    assert stages[0]["max_concurrency"] == 8


@pytest.mark.slow
def test_locust_stages_complete_every_request_with_its_tokens(tmp_path):
    result = run_smoke(tmp_path, "--locust")
    openai_stages, stages = result["stages"][:3], result["stages"][3:]
    assert [s["stage"].split()[:2] for s in stages] == [["locust", "saturation"],
                                                        ["locust", "poisson"],
                                                        ["locust", "poisson"]]
    rates = [math.inf, openai_stages[1]["request_rate"], openai_stages[2]["request_rate"]]
    assert [s.get("request_rate") for s in stages[1:]] == rates[1:]
    vocab = SHAPES["tiny-llama"]["vocab_size"]
    for k, (stage, rate) in enumerate(zip(stages, rates)):
        requests = make_load(32, SMOKE_LEN["input"], SMOKE_LEN["output"], vocab, "token-ids",
                             rate, 10 + k)
        assert stage["requests"] == stage["completed"] == 32 and stage["failed"] == 0
        assert stage["short"] == 0 and stage["prompt_len_mismatch"] == 0
        assert stage["output_tokens"] == sum(r.max_tokens for r in requests)
        assert stage["ttft_after_end"] == 0
        assert stage["users"] == (8 if k == 0 else 32)
        assert stage["locust_version"] and 0.0 < stage["client_cpu_share_max"] < 1.5
        assert_ordered(stage)
        # Locust's own account of the same requests: one TTFT and one TPOT entry each,
        # percentiles as it rounds them (whole milliseconds below 100 ms).
        own = stage["locust_stats"]
        assert own["TTFT"]["requests"] == 32 and own["TTFT"]["failures"] == 0
        assert own["TPOT"]["requests"] == sum(r.max_tokens > 1 for r in requests)
        for name, ours in (("TTFT", stage["ttft_ms"]), ("TPOT", stage["tpot_ms"])):
            assert own[name]["max"] == pytest.approx(ours["max"], rel=1e-6)
            assert abs(own[name]["p50"] - ours["p50"]) <= 1.0 + 0.05 * ours["p50"]
        if k:  # open loop: the stage lasts at least until the last request's arrival
            assert stage["duration_s"] >= 0.9 * requests[-1].arrival_s


@pytest.mark.slow
def test_locust_counts_requests_a_dead_server_never_answers_as_failed():
    requests = [LoadRequest([5, 6, 7], 3, 4, 0.0), LoadRequest([8, 9], 2, 3, 0.0),
                LoadRequest([10], 1, 2, 0.01)]
    s = run_locust(f"http://127.0.0.1:{_free_port()}", "m", requests, users=2, timeout_s=60)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 0, 3)
    assert s["errors"] and all("Error" in e or "HTTP" in e for e in s["errors"])
    assert s["locust_stats"]["/v1/completions (stream)"]["failures"] == 3
    assert "TTFT" not in s["locust_stats"]


def test_locust_stage_refuses_nothing_to_send_and_no_users():
    with pytest.raises(ValueError, match="no requests"):
        run_locust("http://127.0.0.1:1", "m", [], users=1)
    with pytest.raises(ValueError, match="users must be >= 1"):
        run_locust("http://127.0.0.1:1", "m", [LoadRequest([1], 1, 1, 0.0)], users=0)


def test_summary_counts_short_and_failed_requests_and_orders_percentiles():
    rows = [LoadResult(ok=True, max_tokens=5, prompt_len=3, prompt_tokens=3, output_tokens=5,
                       chunks=3, start_s=0.0, ttft_s=0.1, latency_s=0.5),
            LoadResult(ok=True, max_tokens=9, prompt_len=4, prompt_tokens=5, output_tokens=7,
                       chunks=7, start_s=0.2, ttft_s=0.3, latency_s=1.5),
            LoadResult(ok=False, error="HTTP 503", max_tokens=4, start_s=0.1)]
    s = summarize(rows)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["short"] == 1 and s["prompt_len_mismatch"] == 1
    assert s["duration_s"] == pytest.approx(1.7) and s["output_tokens"] == 12
    assert s["output_tokens_per_s"] == pytest.approx(12 / 1.7)
    # TPOT: (0.5 - 0.1) / 4 = 100 ms and (1.5 - 0.3) / 6 = 200 ms.
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0) and s["tpot_ms"]["max"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] <= s["ttft_ms"]["max"] == pytest.approx(300.0)
    assert s["errors"] == ["HTTP 503"]


def test_aiperf_window_covers_the_uniform_lengths_to_within_a_token():
    for lo, hi in ((100, 1024), (4, 32), (4, 24), (7, 7)):
        mean, ratio = window_args(lo, hi)
        assert abs(math.floor(mean * (1 - ratio)) - lo) <= 1
        assert abs(math.ceil(mean * (1 + ratio)) - hi) <= 1
    cmd = aiperf_command("aiperf", "http://h:1", "m", "/tok", 512, 256, (100, 1024),
                         (100, 1024), 3, "/art")
    assert cmd[cmd.index("--concurrency") + 1] == "256"
    assert cmd[cmd.index("--request-count") + 1] == "512"
    assert json.loads(cmd[cmd.index("--random-range-ratio") + 1])["input"] == pytest.approx(
        924 / 1124)
    assert "ignore_eos:true" in cmd and "--streaming" in cmd


AIPERF = os.environ.get("ONDO_AIPERF") or shutil.which("aiperf")


@pytest.mark.slow
@pytest.mark.skipif(not AIPERF, reason="no AIPerf executable (ONDO_AIPERF or aiperf on PATH)")
def test_aiperf_stage_completes_every_request_with_its_tokens(tmp_path):
    result = run_smoke(tmp_path, "--aiperf", AIPERF)
    stage = result["stages"][-1]
    assert stage["stage"] == "aiperf saturation"
    assert stage["requests"] == stage["completed"] == 32 and stage["failed"] == 0
    assert stage["short"] == 0 and stage["ttft_after_end"] == 0
    assert stage["output_tokens"] > 0 and stage["aiperf_version"]
    assert_ordered(stage)


def test_locust_flag_without_locust_installed_is_refused_before_any_load(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("outside_client", ROOT / "bench" / "outside_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "locust" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--smoke", "--locust"])
    assert exit_info.value.code == 2
    assert "Locust is not installed" in capsys.readouterr().err
