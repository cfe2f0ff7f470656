"""Structured outputs in the engine, on the embedded model: every output matches its
constraint, whatever runs beside it (preemption by swap or recompute, asynchronous
scheduling, n > 1, best_of), compilation runs beside the engine's steps, and the
other sampling controls (logit_bias, best_of) do what they say."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest

from ondo import LLM, SamplingParams, StructuredOutputsParams
from ondo.engine.async_llm import AsyncLLM
from ondo.engine.config import EngineArgs
from ondo.engine.grammar import GrammarCompiler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Rome", "Madrid", "Berlin"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
}
CHAT = "Describe a person as JSON with name, age, city and hobbies."
PROMPTS = [
    "A person from the south of Europe:",
    "Write a JSON record of an old sailor.",
    "Here is a profile of a young painter.",
    "JSON for a chef who loves cycling:",
    "A teacher who moved abroad, as data:",
]


def json_params(**kw) -> SamplingParams:
    kw = {"temperature": 0, "max_tokens": 100} | kw
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=PERSON), **kw)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    """Greedy guided outputs of PROMPTS, synchronous, nothing preempted."""
    outs = llm.generate(PROMPTS, json_params())
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    return [o.outputs[0].token_ids for o in outs]


def test_json_outputs_validate_and_the_grammar_is_compiled_once(llm, reference):
    stats = llm.stats()
    assert stats["num_grammars_compiled"] >= 1
    # Five requests with one schema: one compilation, four cache hits (at least).
    assert stats["num_grammar_cache_hits"] >= len(PROMPTS) - 1
    assert stats["grammar_mask_steps"] > 0
    assert len({tuple(t) for t in reference}) > 1  # the prompts do steer the content


def test_choice_is_always_one_of_the_choices(llm):
    choices = ["yes", "no", "it depends on the weather"]
    params = SamplingParams(temperature=1.0, seed=7, n=4, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    outs = llm.generate(["Is it going to rain? Answer:", "Do you like tea?", "Is 7 prime?"], params)
    texts = [c.text for o in outs for c in o.outputs]
    assert len(texts) == 12 and set(texts) <= set(choices)
    assert all(c.finish_reason == "stop" for o in outs for c in o.outputs)


def test_regex_matches_whole_and_ends_without_waiting_for_eos(llm):
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=30,
                            structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"))
    out = llm.generate(["My phone number is"], params)[0]
    for c in out.outputs:
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text), c.text
        # Complete after 8 characters: the sequence ends there, with no EOS token sampled.
        assert c.finish_reason == "stop" and c.stop_reason is None
        assert llm.engine.eos_token_ids[0] not in c.token_ids


def test_json_object_mode_gives_an_object(llm):
    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    c = llm.chat([{"role": "user", "content": "Give me a JSON object about a cat."}], params)[0].outputs[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    else:
        assert c.text.startswith("{")


def test_truncated_json_ends_with_length(llm):
    c = llm.generate([PROMPTS[0]], json_params(max_tokens=5))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5
    assert c.text.startswith('{"name": "')
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_stop_strings_still_end_a_constrained_output(llm, reference):
    full = llm.tokenizer.decode(reference[0])
    c = llm.generate([PROMPTS[0]], json_params(stop=[', "age"']))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == ', "age"'
    assert full.startswith(c.text) and c.text.startswith('{"name": ')


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_every_matcher_with_its_sequence(mode, reference):
    # 9 blocks of 16 tokens hold two of the five sequences (~60 tokens each by the end):
    # the others are preempted and resumed, their matchers with them.
    small = LLM(num_kv_blocks=9, max_model_len=128, preemption_mode=mode)
    outs = small.generate(PROMPTS, json_params())
    assert [o.outputs[0].token_ids for o in outs] == reference
    stats = small.stats()
    key = "num_preemptions_swap" if mode == "swap" else "num_preemptions_recompute"
    assert stats[key] > 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_asynchronous_scheduling_gives_the_same_outputs(reference):
    ahead = LLM(max_model_len=512, async_scheduling=True)
    mixed = [json_params() if i % 2 == 0 else SamplingParams(temperature=0, max_tokens=20)
             for i in range(len(PROMPTS))]
    outs = ahead.generate(PROMPTS, mixed)
    for i, o in enumerate(outs):
        if i % 2 == 0:
            assert o.outputs[0].token_ids == reference[i]
    assert ahead.engine.num_steps_ahead > 0  # the guided ones did not make it drain


def test_n_with_a_grammar_runs_ahead_with_the_synchronous_outputs(llm, monkeypatch):
    """A guided request with n > 1 forks (grammar states
    too) without making the engine drain, and its sequences draw what they draw stepping
    synchronously."""
    monkeypatch.setenv("ONDO_PARALLEL_SAMPLING_AHEAD", "1")
    params = [json_params(temperature=0.9, seed=21, n=3, max_tokens=60),
              json_params(n=2, max_tokens=40), SamplingParams(temperature=0, max_tokens=12)]
    want = llm.generate(PROMPTS[:3], params)
    ahead = LLM(max_model_len=512, async_scheduling=True)
    got = ahead.generate(PROMPTS[:3], params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert [len(o.outputs) for o in got] == [3, 2, 1]
    assert ahead.engine.num_steps_ahead > 0.5 * ahead.engine.step_timing_s["steps"]


def test_n_and_best_of_sample_each_sequence_within_the_schema(llm):
    params = json_params(temperature=0.9, seed=11, n=2, best_of=3)
    out = llm.chat([{"role": "user", "content": CHAT}], params)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    for c in out.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)
        else:
            assert c.finish_reason == "length"


def test_best_of_returns_the_most_likely_of_its_sequences(llm):
    prompt = "The weather today is"
    everyone = llm.generate([prompt], SamplingParams(n=4, seed=5, temperature=1.0, max_tokens=8,
                                                      logprobs=0))[0].outputs
    ranked = sorted(everyone, key=lambda c: -c.cumulative_logprob)
    best = llm.generate([prompt], SamplingParams(n=2, best_of=4, seed=5, temperature=1.0,
                                                  max_tokens=8))[0].outputs
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]


def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = "The capital of France is"
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    banned = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4,
                                                   logit_bias={greedy[0]: -100}))[0].outputs[0]
    assert banned.token_ids[0] != greedy[0]
    forced = llm.generate([prompt], SamplingParams(temperature=0.8, seed=1, max_tokens=4,
                                                   logit_bias={"1234": 100}))[0].outputs[0]
    assert forced.token_ids == [1234] * 4


def test_bad_constraints_fail_alone_naming_the_problem(llm):
    bad = [
        StructuredOutputsParams(json={"type": "string", "not": {"const": "x"}}),
        StructuredOutputsParams(regex="[a-"),
        StructuredOutputsParams(json={"type": "integer", "minimum": 5, "maximum": 1}),
    ]
    params = [SamplingParams(max_tokens=4, structured_outputs=s) for s in bad]
    outs = llm.generate(["a", "b", "c", "d"], [*params, SamplingParams(temperature=0, max_tokens=4)])
    assert "not" in outs[0].error and "Unimplemented" in outs[0].error
    assert "regex" in outs[1].error and "unclosed" in outs[1].error
    assert "minimum" in outs[2].error
    assert outs[3].error is None and len(outs[3].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 300})
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="logit_bias names token id"):
        llm.engine.add_request("oob", "x", SamplingParams(logit_bias={10**7: 1.0}))


def test_compilation_runs_beside_the_engine_and_the_request_waits_for_it(llm, monkeypatch):
    release = threading.Event()
    real = GrammarCompiler._compile

    def slow_compile(self, key, spec):
        assert release.wait(30)
        return real(self, key, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow_compile)
    engine = llm.engine
    schema = {"type": "object", "properties": {"slow": {"type": "boolean"}}, "required": ["slow"]}
    engine.add_request("guided", "Is it slow?", SamplingParams(
        temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(json=schema)))
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=6))
    assert engine.stats()["num_waiting"] == 2
    finished = {}
    for _ in range(50):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "plain" in finished:
            break
    # The plain request ran to its end while the guided one waited for its grammar.
    assert "plain" in finished and "guided" not in finished
    assert engine.stats()["num_waiting"] == 1 and engine.has_unfinished_requests()
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert json.loads(finished["guided"].outputs[0].text) in ({"slow": True}, {"slow": False})


def test_abort_while_compiling_frees_the_request(llm, monkeypatch):
    release = threading.Event()
    real = GrammarCompiler._compile
    monkeypatch.setattr(GrammarCompiler, "_compile",
                        lambda self, key, spec: (release.wait(30), real(self, key, spec))[1])
    engine = llm.engine
    engine.add_request("gone", "x", SamplingParams(
        max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[a-z]{2}[0-9]")))
    assert engine.abort_request("gone")
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs if o.request_id == "gone"] == ["abort"]
    release.set()
    assert not engine.has_unfinished_requests()
    assert engine.stats()["num_waiting"] == 0


@pytest.mark.slow
def test_constraints_cross_to_an_engine_process():
    async_llm = AsyncLLM.from_engine_args(
        EngineArgs(device="cpu", max_model_len=256, num_kv_blocks=64), engine_process=True)

    async def run() -> list:
        params = json_params(n=2, temperature=0.8, seed=2)
        streamed = []
        async for out in async_llm.generate("p", async_llm.tokenizer.encode(PROMPTS[1]), params):
            streamed.append(out)
        return streamed

    try:
        assert async_llm.engine_process
        outs = asyncio.run(run())
    finally:
        async_llm.close()
    final = outs[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1]
    for c in final.outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)
        # The streamed deltas add up to the final text.
        assert "".join(o.outputs[c.index].new_text for o in outs if len(o.outputs) > c.index) == c.text
