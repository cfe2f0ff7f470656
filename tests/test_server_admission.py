"""Admission control and failure handling: a burst past the waiting-queue limit gets
completions or 503s (never a 500), a failing engine step fails its requests with the
reason, and AsyncLLM's shutdown says why it aborted what was left."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ondo.engine.async_llm import AsyncLLM, QueueFull, default_max_waiting_requests
from ondo.engine.sampling_params import SamplingParams
from tests.server_harness import MODEL_NAME, make_async_llm, serve, wait_for

QUEUE_LIMIT = 4


@pytest.fixture(scope="module")
def async_llm():
    llm = make_async_llm(max_waiting_requests=QUEUE_LIMIT, max_num_seqs=2)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(async_llm):
    with serve(async_llm) as s:
        yield s


def test_default_limit_follows_kv_capacity():
    assert default_max_waiting_requests(100, 16) == 64
    assert default_max_waiting_requests(10_000, 16) == 10_000 * 16 // 512


def test_burst_of_five_times_the_limit_gets_completions_or_503(server, async_llm):
    total_blocks = async_llm.stats()["num_total_blocks"]
    n = 5 * QUEUE_LIMIT

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"model": MODEL_NAME, "prompt": f"Request {i}:", "max_tokens": 4,
                "ignore_eos": True, "stream": i % 2 == 0}
        return await client.post("/v1/completions", json=body)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*[one(c, i) for i in range(n)])

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= QUEUE_LIMIT
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        elif r.text.startswith("data:"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert wait_for(lambda: async_llm.stats()["num_free_blocks"] == total_blocks, 2.0)
    assert async_llm.num_in_flight == 0


def test_queue_full_is_raised_by_generate(async_llm):
    async def main():
        gens = [async_llm.generate(f"qf-{i}", [1, 2, 3], SamplingParams(max_tokens=3,
                                                                          ignore_eos=True))
                for i in range(QUEUE_LIMIT + 8)]
        started = []
        for g in gens:  # admission is decided on each generator's first step
            started.append(asyncio.ensure_future(anext(g)))  # noqa: F821
            await asyncio.sleep(0)
        results = await asyncio.gather(*started, return_exceptions=True)
        for g in gens:
            await g.aclose()
        return results

    results = asyncio.run(main())
    assert any(isinstance(r, QueueFull) for r in results)
    assert wait_for(lambda: async_llm.num_in_flight == 0, 2.0)
    assert wait_for(lambda: async_llm.stats()["num_free_blocks"]
                    == async_llm.stats()["num_total_blocks"], 2.0)


def test_a_failing_step_fails_its_requests_with_the_reason(async_llm, monkeypatch):
    engine = async_llm.engine
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("kernel exploded")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def main():
        outs = []
        async for out in async_llm.generate("boom", [1, 2, 3], SamplingParams(max_tokens=50,
                                                                               ignore_eos=True)):
            outs.append(out)
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and last.outputs[0].finish_reason == "error"
    assert "kernel exploded" in last.error
    monkeypatch.setattr(engine, "step", real_step)
    assert wait_for(lambda: async_llm.stats()["num_free_blocks"]
                    == async_llm.stats()["num_total_blocks"], 2.0)


def test_engine_rejections_reach_the_caller_as_value_errors(async_llm):
    async def main():
        async for _ in async_llm.generate("too-long", [1] * 600, SamplingParams(max_tokens=1)):
            pass

    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(main())


def test_shutdown_aborts_what_is_left_and_says_why():
    llm: AsyncLLM = make_async_llm(max_num_seqs=2)

    async def main():
        async def run():
            last = None
            async for out in llm.generate("long", "Once upon a time",
                                          SamplingParams(max_tokens=400, ignore_eos=True)):
                last = out
            return last

        task = asyncio.create_task(run())
        await asyncio.sleep(0.5)
        await llm.shutdown(timeout_s=0.2)
        return await task

    last = asyncio.run(main())
    c = last.outputs[0]
    assert c.finish_reason == "abort" and c.stop_reason == "server shutting down"
    assert 0 < len(c.token_ids) < 400 and c.text
    assert not llm.is_healthy
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]
