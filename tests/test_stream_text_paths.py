"""Streamed text equals final text through the real engine, on a thread and in an engine
process, for each tokenizer family: a tiny random Llama over the family's vocabulary
samples random ids (temperature 1, random seeds), so the text crosses multi-byte
characters, special tokens and word joins as a real model's would not on purpose.
Also `ondo serve --engine-process` on the WordPiece-style model: a streamed completion
and a plain one of the same greedy request give the same text."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondo.engine.async_llm import AsyncLLM
from ondo.engine.config import EngineArgs
from ondo.engine.sampling_params import SamplingParams
from tests.server_process import launch_server
from tests.tokenizer_families import FAMILIES, MODEL_VOCAB_SIZES, tiny_model_folder

pytestmark = pytest.mark.slow

EXAMPLES = 20  # per family; each runs 3 requests through both paths


@pytest.fixture(scope="module", params=FAMILIES)
def engines(request, tmp_path_factory):
    folder = tiny_model_folder(request.param, str(tmp_path_factory.mktemp(request.param)))
    args = EngineArgs(model=folder, device="cpu", max_model_len=128, num_kv_blocks=64)
    thread = AsyncLLM.from_engine_args(args, engine_process=False)
    process = AsyncLLM.from_engine_args(args, engine_process=True)
    yield request.param, thread, process
    thread.close()
    process.close()


async def _run(llm: AsyncLLM, request_id: str, prompt: list[int], params: SamplingParams):
    outs = [o async for o in llm.generate(request_id, prompt, params)]
    c = outs[-1].outputs[0]
    return "".join(o.outputs[0].new_text for o in outs), c.text, c.token_ids


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_both_paths_stream_the_final_text(engines, data):
    family, thread, process = engines
    vocab = MODEL_VOCAB_SIZES[family]
    cases = [(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8)),
              SamplingParams(temperature=1.0, seed=data.draw(st.integers(0, 2**31)),
                             max_tokens=data.draw(st.integers(1, 16)),
                             skip_special_tokens=data.draw(st.booleans())))
             for _ in range(3)]

    async def main(llm: AsyncLLM, tag: str):
        return await asyncio.gather(*[_run(llm, f"{tag}{i}", p, params)
                                      for i, (p, params) in enumerate(cases)])

    on_thread = asyncio.run(main(thread, "t"))
    in_process = asyncio.run(main(process, "p"))
    for (t_streamed, t_final, t_ids), (p_streamed, p_final, p_ids) in zip(on_thread, in_process):
        assert t_ids == p_ids  # same seeds, same model: the same ids
        assert t_streamed == t_final == p_streamed == p_final, family


async def _run_choices(llm: AsyncLLM, request_id: str, prompt: list[int], params: SamplingParams):
    """Per choice index: (streamed deltas joined, final text, final ids)."""
    streamed: dict[int, str] = {}
    last = None
    async for out in llm.generate(request_id, prompt, params):
        for c in out.outputs:
            streamed[c.index] = streamed.get(c.index, "") + c.new_text
        last = out
    return {c.index: (streamed[c.index], c.text, c.token_ids) for c in last.outputs}


def test_n_and_best_of_choices_stream_their_final_text_on_both_paths(engines):
    """n > 1 streams one detokenizer per sequence (forked after the prompt) on both paths;
    best_of's ranked choices carry the same text on both."""
    family, thread, process = engines
    vocab = MODEL_VOCAB_SIZES[family]
    prompts = [[(7 * i + 3 * k) % vocab for k in range(1, 6)] for i in range(1, 5)]
    cases = [(p, SamplingParams(n=3, temperature=1.0, seed=100 + i, max_tokens=12,
                                skip_special_tokens=bool(i % 2)))
             for i, p in enumerate(prompts[:3])]
    cases.append((prompts[3], SamplingParams(n=2, best_of=3, temperature=1.0, seed=7, max_tokens=10)))

    async def main(llm: AsyncLLM, tag: str):
        return await asyncio.gather(*[_run_choices(llm, f"{tag}n{i}", p, params)
                                      for i, (p, params) in enumerate(cases)])

    on_thread = asyncio.run(main(thread, "t"))
    in_process = asyncio.run(main(process, "p"))
    for (_, params), t_choices, p_choices in zip(cases, on_thread, in_process):
        assert sorted(t_choices) == sorted(p_choices) == list(range(params.n))
        for index in t_choices:
            t_streamed, t_final, t_ids = t_choices[index]
            p_streamed, p_final, p_ids = p_choices[index]
            assert t_ids == p_ids and t_ids, family
            assert t_streamed == t_final == p_streamed == p_final, (family, index)
    # The n sequences are sampled apart, not copies of one.
    assert any(len({tuple(ids) for _, _, ids in choices.values()}) > 1 for choices in on_thread[:3])


def _completion_texts(base: str, body: dict) -> tuple[dict[int, str], dict[int, str]]:
    """Per choice index: the streamed text and the plain response's text."""
    plain = httpx.post(base + "/v1/completions", json=body, timeout=120).json()
    streamed: dict[int, str] = {}
    with httpx.stream("POST", base + "/v1/completions", json=body | {"stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    return streamed, {c["index"]: c["text"] for c in plain["choices"]}


def test_ondo_serve_streams_the_plain_text_on_a_wordpiece_model(tmp_path):
    folder = tiny_model_folder("wordpiece", str(tmp_path / "model"))
    proc, base = launch_server(folder, "--device", "cpu", "--max-model-len", "128",
                               "--num-kv-blocks", "64", "--engine-process")
    try:
        for prompt in ("w5 w6 w7", "w115640"):
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            streamed, plain = _completion_texts(base, body)
            assert streamed == plain and list(plain) == [0]
            words = plain[0].split(" ")
            assert words[0] == "" and len(words) == 13  # " wA wB ...": one space before each word
            assert all(w.startswith("w") and w[1:].isdigit() for w in words[1:])
        # n > 1, seeded: each choice streams the text the plain response gives it.
        body = {"prompt": "w5 w6 w7", "max_tokens": 10, "temperature": 1.0, "seed": 3, "n": 3,
                "ignore_eos": True}
        streamed, plain = _completion_texts(base, body)
        assert streamed == plain and sorted(plain) == [0, 1, 2]
        assert all(len(text.split(" ")) == 11 for text in plain.values())
        assert len(set(plain.values())) > 1
    finally:
        proc.kill()
        proc.wait()


def test_the_stream_vs_final_bench_runs_on_a_tiny_shape(capsys):
    from bench.stream_vs_final import main as bench_main
    from tests.server_process import free_port

    status = bench_main(["--model-shape", "tiny-llama", "--device", "cpu", "--dtype", "float32",
                         "--num-kv-blocks", "64", "--prompts", "4", "--sampled", "1",
                         "--max-tokens", "6", "--port", str(free_port())])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0 and summary["texts"] == 6 and summary["equal"] == 6
    assert summary["engine_process"] and summary["unequal"] == 0
