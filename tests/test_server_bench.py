"""`ondo bench serve` against a real test server: every request completes and the JSON
summary carries every field `vllm bench serve` users look for."""

from __future__ import annotations

import asyncio
import json

import pytest

import ondo.cli
from ondo.bench.serve import _sse_data
from tests.server_harness import make_async_llm, serve

FIELDS = ["completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
          "request_throughput", "output_throughput", "total_token_throughput"] + [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "p99")]


@pytest.fixture(scope="module")
def server():
    llm = make_async_llm(max_model_len=256, num_kv_blocks=128)
    with serve(llm) as s:
        yield s
    llm.close()


@pytest.mark.parametrize(("dataset", "rate"), [("random", "inf"), ("sharegpt-like", "20")])
def test_bench_serve_writes_the_full_json(server, tmp_path, capsys, dataset, rate):
    out = tmp_path / "result.json"
    rc = ondo.cli.main(["bench", "serve", "--base-url", server.base_url, "--num-prompts", "5",
                        "--dataset", dataset, "--input-len", "24", "--output-len", "6",
                        "--range-ratio", "0.5", "--request-rate", rate, "--result-file", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert [f for f in FIELDS if f not in summary] == []
    assert summary["completed"] == 5 and summary["failed"] == 0
    if dataset == "random":  # ignore_eos: every request runs to its max_tokens
        assert 5 * 3 <= summary["total_output_tokens"] <= 5 * 9
    assert summary["mean_ttft_ms"] > 0 and summary["p99_itl_ms"] >= summary["median_itl_ms"] > 0
    assert "Serving Benchmark Result" in capsys.readouterr().out


class _Reads:
    """A response whose body arrives in the given pieces (as `content.iter_any()` gives it)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.content = self
        self.pieces = pieces

    async def iter_any(self):
        for piece in self.pieces:
            yield piece


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_sse_payloads_split_across_reads_or_sharing_one(newline):
    body = (b": comment" + newline * 2 + b'data: {"a": 1}' + newline * 2 + b"event: x" + newline
            + b'data: {"b": 2}' + newline * 2 + b"data: [DONE]" + newline * 2 + b'data: {"late": 3}'
            + newline * 2)

    async def payloads(pieces):
        return [p async for p in _sse_data(_Reads(pieces))]

    expected = [b'{"a": 1}', b'{"b": 2}']  # nothing after [DONE]
    assert asyncio.run(payloads([body])) == expected
    assert asyncio.run(payloads([body[i:i + 1] for i in range(len(body))])) == expected
    assert asyncio.run(payloads([body[:7], body[7:31], body[31:]])) == expected
