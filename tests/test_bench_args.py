"""The benchmark commands refuse what no run could honour, in one line naming the flag,
before an engine starts or a request is sent; at the limits they accept, a run completes."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ondo.bench.throughput
import ondo.cli
from ondo.bench.arg_types import writable_file
from ondo.bench.serve import BenchServeArgs

# Nothing listens on the discard port: a request sent there would fail with a connection
# error, not with the message the case expects.
NOWHERE = "http://127.0.0.1:9"

SERVE_CASES = [
    (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
    (["--num-prompts", "-5"], "--num-prompts must be >= 1, got -5"),
    (["--input-len", "0"], "--input-len must be >= 1, got 0"),
    (["--output-len", "-1"], "--output-len must be >= 1, got -1"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1, got 0"),
    (["--max-concurrency", "-3"], "--max-concurrency must be >= 1, got -3"),  # hung before
    (["--token-id-vocab", "0"], "--token-id-vocab must be >= 1, got 0"),
    (["--range-ratio", "1.5"], "--range-ratio must be in [0, 1), got 1.5"),
    (["--range-ratio", "-1"], "--range-ratio must be in [0, 1), got -1.0"),
    (["--base-url", "localhost:8000"], "--base-url must be an http:// or https:// URL, got 'localhost:8000'"),
    (["--request-rate", "0"], "--request-rate must be > 0 requests/s, or inf, got 0.0"),
    (["--request-rate", "nan"], "--request-rate must be > 0 requests/s, or inf, got nan"),
]


@pytest.mark.parametrize("flags, says", SERVE_CASES, ids=[c[0][0] + " " + c[0][1] for c in SERVE_CASES])
def test_bench_serve_refuses_before_sending(capsys, flags, says):
    rc = ondo.cli.main(["bench", "serve", "--base-url", NOWHERE, "--tokenizer", "none", *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert says in err and "Cannot connect" not in err and "Traceback" not in err


@pytest.mark.parametrize("flags, says", [
    (["--result-file", "{tmp}"], "argument --result-file: {tmp} is a folder"),
    (["--result-file", "{tmp}/no/r.json"], "argument --result-file: no folder {tmp}/no to write r.json in"),
])
def test_bench_serve_refuses_flags_as_it_reads_them(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_:
        ondo.cli.main(["bench", "serve", "--base-url", NOWHERE, *[f.format(tmp=tmp_path) for f in flags]])
    assert exit_.value.code == 2
    assert says.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_result_file_is_checked_not_made(tmp_path):
    path = tmp_path / "r.json"
    assert writable_file(str(path)) == str(path) and not path.exists()
    path.write_text("kept")
    assert writable_file(str(path)) == str(path) and path.read_text() == "kept"
    if os.geteuid() != 0:  # root writes anywhere
        os.chmod(tmp_path, 0o500)
        try:
            with pytest.raises(Exception, match="permission denied"):
                writable_file(str(tmp_path / "new.json"))
        finally:
            os.chmod(tmp_path, 0o700)


def test_bench_serve_args_check_python_callers_too():
    with pytest.raises(ValueError, match="--dataset must be one of random, sharegpt-like"):
        BenchServeArgs(base_url=NOWHERE, dataset="sharegpt")
    with pytest.raises(ValueError, match="--request-rate must be > 0"):
        BenchServeArgs(base_url=NOWHERE, request_rate=float("nan"))
    assert BenchServeArgs(base_url=NOWHERE, range_ratio=0.0, max_concurrency=1).num_prompts == 100


@pytest.fixture()
def no_engine(monkeypatch):
    """Fails the test if the benchmark gets as far as starting an engine."""
    def started(*args, **kwargs):
        raise AssertionError("an engine started")

    monkeypatch.setattr(ondo.bench.throughput, "dummy_llm", started)


THROUGHPUT = ["bench", "throughput", "--model-shape", "tiny-llama", "--no-baselines"]


@pytest.mark.parametrize("flags, says", [
    (["--scale", "0"], "argument --scale: must be > 0 and finite, got 0"),
    (["--scale", "nan"], "argument --scale: must be > 0 and finite, got nan"),
    (["--telemetry-hz", "-5"], "argument --telemetry-hz: must be in (0, 100] Hz, got -5"),
    (["--telemetry-hz", "20", "500"], "argument --telemetry-hz: must be in (0, 100] Hz, got 500"),
    (["--events-pairs", "-1"], "argument --events-pairs: must be >= 0, got -1"),
    (["--caching-cost-pairs", "two"], "argument --caching-cost-pairs: 'two' is not an integer"),
    (["--baseline-batch-sizes", "32", "0"], "argument --baseline-batch-sizes: must be >= 1, got 0"),
    (["--baseline-workloads", "W9"], "argument --baseline-workloads: invalid choice: 'W9'"),
])
def test_bench_throughput_refuses_flags_as_it_reads_them(no_engine, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_:
        ondo.cli.main([*THROUGHPUT, *flags])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--workload", "W1", "--max-model-len", "8"],
     "--max-model-len 8 is shorter than W1's longest request (2048 tokens, prompt and output): give at least 2048"),
    (["--workload", "W3", "--max-model-len", "2048"],
     "--max-model-len 2048 is shorter than W3's longest request (2064 tokens"),
    # --sharing runs W1 (caching's cost) and W4 too, whatever --workload says.
    (["--workload", "W2", "--sharing", "--max-model-len", "1200"],
     "--max-model-len 1200 is shorter than W1's longest request (2048 tokens"),
    (["--workload", "W2", "--out-dir", "{tmp}/file.txt/sub"], "--out-dir {tmp}/file.txt/sub: Not a directory"),
])
def test_bench_throughput_refuses_a_run_it_could_not_finish(no_engine, tmp_path, capsys, flags, says):
    (tmp_path / "file.txt").write_text("")
    rc = ondo.cli.main([*THROUGHPUT, *[f.format(tmp=tmp_path) for f in flags]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert says.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run adds W1's warm-up pass")
def test_bench_throughput_runs_at_the_bound_it_asks_for(tmp_path, capsys):
    """W2's longest request is 128 + 1,024 tokens: a --max-model-len of exactly that runs
    it to the end, every request at its full length, into an --out-dir made for it."""
    out = tmp_path / "new" / "dir"
    rc = ondo.cli.main([*THROUGHPUT, "--workload", "W2", "--scale", "0.004", "--max-model-len", "1152",
                        "--caching-cost-pairs", "0", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "throughput-cpu-tiny-llama.json").read_text())
    assert [(r["workload"], r["num_requests"], r["output_tokens"]) for r in rows] == [("W2", 1, 1024)]
