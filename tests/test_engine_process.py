"""The engine in its own process (`AsyncLLM.from_engine_args(..., engine_process=True)`),
on the CPU with the embedded model: the same outputs as the engine on a thread, step
statistics carried back, aborts freeing blocks, a dead engine process failing its
requests with the reason, and `ondo serve --engine-process` answering streamed and
plain requests alike."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time

import httpx
import pytest

from ondo.engine.async_llm import AsyncLLM, EngineUnavailable
from ondo.engine.config import EngineArgs
from ondo.engine.engine_loop import AddRequest, Published
from ondo.engine.engine_process import (
    EngineProcess,
    EngineStartError,
    Publisher,
    WireDecoder,
    WireEncoder,
)
from ondo.engine.outputs import CompletionOutput, RequestOutput, coalesce
from ondo.engine.sampling_params import SamplingParams
from tests.server_harness import wait_for
from tests.server_process import launch_server

ARGS = dict(max_model_len=512, num_kv_blocks=256, device="cpu")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


async def _collect(llm: AsyncLLM, request_id: str, prompt: str, params: SamplingParams):
    return [o async for o in llm.generate(request_id, prompt, params)]


def _run_all(llm: AsyncLLM, params: SamplingParams):
    async def main():
        return await asyncio.gather(*[_collect(llm, f"r{i}", p, params) for i, p in enumerate(PROMPTS)])

    return asyncio.run(main())


def _on_a_thread(params: SamplingParams):
    threaded = AsyncLLM.from_engine_args(EngineArgs(**ARGS), engine_process=False)
    try:
        return _run_all(threaded, params)
    finally:
        threaded.close()


@pytest.fixture(scope="module")
def in_process():
    llm = AsyncLLM.from_engine_args(EngineArgs(**ARGS), engine_process=True)
    yield llm
    llm.close()


@pytest.mark.parametrize("logprobs", [2, None], ids=["logprobs", "plain"])  # plain: wire deltas
def test_outputs_equal_the_engine_on_a_thread(in_process, logprobs):
    assert in_process.engine_process and in_process.engine is None
    steps = []
    in_process.add_step_listener(steps.append)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    got = _run_all(in_process, params)
    want = _on_a_thread(params)
    for g, w in zip(got, want, strict=True):
        gl, wl = g[-1], w[-1]
        assert gl.finished and gl.outputs[0].finish_reason == "length"
        assert gl.outputs[0].token_ids == wl.outputs[0].token_ids and len(gl.outputs[0].token_ids) == 12
        assert gl.outputs[0].text == wl.outputs[0].text
        assert gl.prompt_token_ids == wl.prompt_token_ids
        # Every output, not only the last, carries the prompt and the text so far.
        joined = ""
        for out in g:
            joined += out.outputs[0].new_text
            assert out.prompt_token_ids == gl.prompt_token_ids
            if not out.finished:
                assert out.outputs[0].text == joined
        assert joined == gl.outputs[0].text
        streamed = [t for out in g for t in out.outputs[0].new_token_ids]
        assert streamed == gl.outputs[0].token_ids
        if logprobs is not None:
            assert ([len(lp) for out in g for lp in out.outputs[0].new_logprobs]
                    == [len(lp) for lp in gl.outputs[0].logprobs])
        else:
            assert all(out.outputs[0].new_logprobs is None for out in g) and gl.outputs[0].logprobs is None
    # Step statistics crossed the process boundary: 4 prompts' tokens, then 12 steps' decodes.
    assert sum(s.num_output_tokens for s in steps) == 4 * 12
    assert sum(s.num_prefill_tokens for s in steps) == sum(len(g[-1].prompt_token_ids) for g in got)
    stats = in_process.stats()
    assert wait_for(lambda: in_process.stats()["num_free_blocks"] == stats["num_total_blocks"], 2.0)
    assert in_process.stats()["num_generation_tokens_total"] >= 48


def test_an_abandoned_stream_frees_its_blocks(in_process):
    total = in_process.stats()["num_total_blocks"]

    async def main():
        gen = in_process.generate("leaver", "Tell me everything", SamplingParams(max_tokens=400, ignore_eos=True))
        got = [await anext(gen) for _ in range(3)]  # noqa: F821
        assert in_process.stats()["num_free_blocks"] < total
        await gen.aclose()
        return got

    assert len(asyncio.run(main())) == 3
    # The abort crosses the pipe and the freed counters come back after the engine's next
    # pass: milliseconds, but seconds on a busy machine; what matters is that they come.
    assert wait_for(lambda: in_process.stats()["num_free_blocks"] == total, 30.0)
    assert in_process.num_in_flight == 0


def test_bad_input_is_a_value_error_from_the_engine_process(in_process):
    async def main():
        async for _ in in_process.generate("too-long", [1] * 600, SamplingParams(max_tokens=1)):
            pass

    with pytest.raises(ValueError, match="512"):
        asyncio.run(main())


def test_an_engine_that_cannot_start_says_why():
    with pytest.raises(EngineStartError, match="no-such-model"):
        AsyncLLM.from_engine_args(EngineArgs(model="/no-such-model", device="cpu"), engine_process=True)


def test_a_killed_engine_process_fails_its_requests_with_the_reason():
    llm = AsyncLLM.from_engine_args(EngineArgs(**ARGS), engine_process=True)
    try:
        async def main():
            outs = []
            async for out in llm.generate("doomed", "Once", SamplingParams(max_tokens=400, ignore_eos=True)):
                outs.append(out)
                if len(outs) == 2:
                    os.kill(llm._core.pid, signal.SIGKILL)
            return outs[-1]

        last = asyncio.run(main())
        assert last.finished and last.outputs[0].finish_reason == "error"
        assert "exited unexpectedly" in last.error
        assert not llm.is_healthy

        async def late():
            async for _ in llm.generate("late", "x", SamplingParams(max_tokens=1)):
                pass

        with pytest.raises(EngineUnavailable, match="stopped"):
            asyncio.run(late())
    finally:
        llm.close()


def _output(request_id: str, texts: list[str], finished: bool, step: int) -> RequestOutput:
    completions = [CompletionOutput(i, t, [step] if finished else [], finish_reason="length" if finished else None,
                                    new_text=t[-1:], new_token_ids=[step]) for i, t in enumerate(texts)]
    metrics = {"arrival_time_s": 1.0} | ({"first_token_s": 2.0} if step > 1 else {})
    return RequestOutput(request_id, "prompt", [7, 8, 9], completions, finished, metrics=metrics)


def test_the_wire_format_strips_and_restores_what_the_receiver_has():
    encoder, decoder = WireEncoder(), WireDecoder()
    sent = [_output("a", ["x", "y"], False, 1), _output("a", ["xx", "yz"], False, 2),
            _output("a", ["xxz", "yzw"], False, 3), _output("a", ["xxzq", "yzwv"], True, 4)]
    expected = [(o.prompt, list(o.prompt_token_ids), [c.text for c in o.outputs], [c.new_token_ids for c in o.outputs],
                 dict(o.metrics)) for o in sent]
    wire = pickle.loads(pickle.dumps(encoder.encode(Published(list(sent), [], 0, {})).outputs))
    assert isinstance(wire[0], RequestOutput) and isinstance(wire[3], RequestOutput)  # first and last whole
    assert isinstance(wire[1], tuple) and "prompt" not in repr(wire[1]) and "xx" not in repr(wire[1])
    assert wire[1][1] == {"arrival_time_s": 1.0, "first_token_s": 2.0} and wire[2][1] is None  # metrics once changed
    back = [decoder.decode(o) for o in wire]
    assert [(o.prompt, o.prompt_token_ids, [c.text for c in o.outputs], [c.new_token_ids for c in o.outputs],
             o.metrics) for o in back] == expected
    assert [o.finished for o in back] == [False, False, False, True]


def test_the_publisher_never_blocks_the_engine_and_merges_what_the_reader_has_not_taken():
    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    publisher = Publisher(writer)
    chunk = "z" * 20_000  # 50 steps of this overflow a pipe's 64 KiB many times over

    def output(step: int) -> RequestOutput:
        return RequestOutput("r", "prompt", [7], [CompletionOutput(
            0, chunk * step, [], new_text=chunk, new_token_ids=[step])], False, metrics={})

    start = time.monotonic()
    for step in range(1, 51):
        publisher.publish(Published([output(step)], [], 1, {"step": float(step)}))
    publish_s = time.monotonic() - start
    received: list[Published] = []
    drain = threading.Thread(target=lambda: [received.append(reader.recv()) for _ in iter(
        lambda: reader.poll(2.0), False)])
    drain.start()
    publisher.close()
    drain.join()
    assert publish_s < 1.0  # nothing read yet, and the engine side was never held up
    decoder = WireDecoder()
    outputs = [decoder.decode(o) for b in received for o in b.outputs]
    assert [o.outputs[0].new_token_ids for o in outputs] == [[s] for s in range(1, 51)]
    assert [o.outputs[0].text for o in outputs] == [chunk * s for s in range(1, 51)]
    assert sum(b.num_added for b in received) == 50 and received[-1].stats == {"step": 50.0}
    assert publisher.num_items == 50 and 1 <= len(received) == publisher.num_messages < 50


def test_commands_sent_while_the_engine_loads_never_block_and_all_arrive_in_order():
    published: list[Published] = []
    core = EngineProcess(EngineArgs(**ARGS), published.append, lambda reason: None)
    try:
        start = time.monotonic()
        # About 1 MB of commands while the engine is still loading and reads nothing: a
        # pipe holds 64 KiB, so a direct write would wait for the engine's first read.
        for i in range(200):
            core.send(AddRequest(f"r{i}", None, [1 + i] * 2000, SamplingParams(max_tokens=1), 0.0))
        send_s = time.monotonic() - start
        core.wait_ready()
        core.start_reading()
        assert wait_for(lambda: sum(len(b.rejected) for b in published) == 200, 60.0)
        rejected = [r for b in published for r in b.rejected]
        assert [r.request_id for r in rejected] == [f"r{i}" for i in range(200)]
        assert all(r.invalid and "2000 tokens" in r.message for r in rejected)
        assert send_s < 1.0
    finally:
        core.close()


def test_coalesce_joins_deltas_and_keeps_the_later_state():
    a = RequestOutput("r", None, [1], [CompletionOutput(0, "ab", [], new_text="ab", new_token_ids=[5, 6],
                                                        new_logprobs=[{5: -0.1}, {6: -0.2}])], False)
    b = RequestOutput("r", None, [1], [CompletionOutput(0, "abc", [], new_text="c", new_token_ids=[7],
                                                        new_logprobs=[{7: -0.3}])], False)
    c = coalesce(a, b)
    out = c.outputs[0]
    assert (out.text, out.new_text, out.new_token_ids) == ("abc", "abc", [5, 6, 7])
    assert out.new_logprobs == [{5: -0.1}, {6: -0.2}, {7: -0.3}]


def test_ondo_serve_with_the_engine_in_its_own_process():
    proc, base = launch_server("--device", "cpu", "--max-model-len", "512", "--num-kv-blocks", "256",
                               "--engine-process", "--shutdown-timeout", "5")
    try:
        body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        plain = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
        text = ""
        with httpx.stream("POST", base + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            text += json.loads(line[6:])["choices"][0]["text"]
        assert text == plain["choices"][0]["text"] and plain["usage"]["completion_tokens"] == 16
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert "ondo:generation_tokens_total" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_strings_and_parallel_samples_match_the_thread(in_process):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3, n=2, stop=[" the"])
    got = _run_all(in_process, params)
    want = _on_a_thread(params)
    for g, w in zip(got, want, strict=True):
        assert [c.text for c in g[-1].outputs] == [c.text for c in w[-1].outputs]
        assert [c.finish_reason for c in g[-1].outputs] == [c.finish_reason for c in w[-1].outputs]
        for i in range(2):
            streamed = "".join(c.new_text for out in g for c in out.outputs if c.index == i)
            assert streamed == g[-1].outputs[i].text


def test_a_stop_tokens_text_is_left_out_as_on_the_thread(in_process):
    # The engine process sends ids; this side makes the text and must leave the stop out too.
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[30])  # "."
    got = _run_all(in_process, params)
    want = _on_a_thread(params)
    for g, w in zip(got, want, strict=True):
        final = g[-1].outputs[0]
        assert final.text == w[-1].outputs[0].text == "".join(o.outputs[0].new_text for o in g)
        assert final.token_ids == w[-1].outputs[0].token_ids
        if final.finish_reason == "stop":
            assert final.token_ids[-1] == 30 and not final.text.endswith(".")
    assert any(o[-1].outputs[0].finish_reason == "stop" for o in got)
