"""The engine on the embedded model: preemption, chunked prefill, seeds, stops, bad input."""

from __future__ import annotations

import json
import re

import pytest

from ondo import LLM, SamplingParams
from ondo.cli import main as ondo_main
from tests.prompts import PARAGRAPH

BATCH = [
    "The three laws of thermodynamics are",
    "Write a haiku about GPUs.",
    "def quicksort(arr):",
    "A short story about a robot who learns to paint:",
    "The difference between a list and a tuple in Python is",
    "Explain PagedAttention in one paragraph.",
    "Paris, Rome, Madrid and",
    "The best way to cool a data center is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def unconstrained(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(BATCH, GREEDY)]


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_forced_preemption_gives_identical_outputs(mode, unconstrained):
    # 14 blocks of 16 tokens hold ~3 of the 8 sequences (each ~50 tokens by the end).
    small = LLM(num_kv_blocks=14, max_model_len=224, preemption_mode=mode)
    outs = small.generate(BATCH, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == unconstrained
    stats = small.stats()
    if mode == "swap":
        assert stats["num_preemptions_swap"] > 0 and stats["num_preemptions_recompute"] == 0
        assert stats["num_swapped_out_blocks"] > 0
    elif mode == "recompute":
        assert stats["num_preemptions_recompute"] > 0 and stats["num_preemptions_swap"] == 0
    else:
        costs = small.engine.runner.costs
        # A typical victim here: ~3 blocks, ~40 computed tokens.
        expect_swap = costs.swap_cost_s(3) < costs.recompute_cost_s(40)
        key = "num_preemptions_swap" if expect_swap else "num_preemptions_recompute"
        assert stats[key] > 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_cpu_blocks_used"] == 0


def test_chunked_prefill_matches_a_large_budget(llm):
    prompt = PARAGRAPH * 4 + "To sum up,"
    n = len(llm.tokenizer.encode(prompt))
    chunked = LLM(max_num_batched_tokens=64, max_model_len=512)
    assert n > 64
    want = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert chunked.generate(prompt, GREEDY)[0].outputs[0].token_ids == want


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Tell me about the ocean.", seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=7, max_tokens=10, ignore_eos=True), GREEDY]
    outs = llm.generate(["Tell me about the ocean.", *BATCH[:3]], [seeded, *others])
    assert outs[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate("Tell me about the ocean.", other_seed)[0].outputs[0].token_ids != alone


def test_parameters_changed_after_a_call_apply_to_the_next_call_only(llm, unconstrained):
    """The engine keeps its own copy of a request's parameters, and the sampler's summary of
    a step's rows follows the objects it is given: one object reused across two calls, changed
    in between, samples as a new object would."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(BATCH, params)] == unconstrained
    params.temperature, params.seed = 1.0, 5
    reused = [o.outputs[0].token_ids for o in llm.generate(BATCH, params)]
    fresh = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    assert reused == [o.outputs[0].token_ids for o in llm.generate(BATCH, fresh)]
    assert reused != unconstrained


def test_sampling_filters_that_leave_one_token_are_greedy(llm, unconstrained):
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=40, ignore_eos=True),
                   SamplingParams(temperature=1.0, min_p=1.0, max_tokens=40, ignore_eos=True)):
        assert llm.generate(BATCH[0], params)[0].outputs[0].token_ids == unconstrained[0]


def test_stop_strings_truncate_and_stream_consistently(llm, unconstrained):
    full = llm.tokenizer.decode(unconstrained[1])
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip()
    engine = llm.engine
    engine.add_request("s1", BATCH[1], SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].new_text
            if out.finished:
                final = out.outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == full[: full.find(stop)]
    assert streamed == final.text


def test_stop_token_ids_and_max_tokens(llm, unconstrained):
    target = unconstrained[2][5]
    out = llm.generate(BATCH[2], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[target], ignore_eos=True))
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == target
    assert c.token_ids == unconstrained[2][: unconstrained[2].index(target) + 1]
    c = llm.generate(BATCH[2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert c.finish_reason == "length" and c.token_ids == unconstrained[2][:3]


def test_eos_stops_a_chat_answer(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=64))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and "Paris" in c.text
    assert c.token_ids[-1] in llm.engine.eos_token_ids


def test_a_too_long_prompt_fails_alone_and_the_others_run(llm):
    long_prompt = list(range(100, 100 + 600))  # > max_model_len=512
    outs = llm.generate([BATCH[0], long_prompt, BATCH[2]], GREEDY)
    assert outs[1].outputs[0].finish_reason == "error"
    assert "600" in outs[1].error and "512" in outs[1].error
    assert outs[0].outputs[0].finish_reason == "length" and outs[2].outputs[0].finish_reason == "length"
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]


@pytest.mark.parametrize("prompts, says", [
    (None, "prompts must be a prompt or a sequence of prompts, not NoneType"),
    (5, "not int"),
    (b"bytes", "not bytes"),
    (["fine", 5], "prompts[1] is int 5"),
])
def test_what_is_no_prompt_is_refused_naming_it(llm, prompts, says):
    with pytest.raises(TypeError, match=re.escape(says)):
        llm.generate(prompts, GREEDY)
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]  # nothing was queued


@pytest.mark.parametrize("messages, says, error", [
    ("hello", "messages must be a list of message dicts", TypeError),
    ([{"role": "user"}], "messages[0] has no content", ValueError),
    ([{"content": "hi"}], "messages[0] has no role", ValueError),
    ([[{"role": "user", "content": "hi"}], ["hi"]], "messages[1][0] is str, not a message dict", ValueError),
    ([[{"role": "user", "content": "hi"}], []], "messages[1] must be a non-empty list", ValueError),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content: only text parts", ValueError),
])
def test_a_malformed_conversation_is_refused_naming_the_message(llm, messages, says, error):
    with pytest.raises(error, match=re.escape(says)):
        llm.chat(messages, GREEDY)


def test_numpy_token_ids_are_a_prompt(llm):
    import numpy as np

    ids = [o.prompt_token_ids for o in llm.generate([BATCH[0]], GREEDY)]
    outs = llm.generate([list(np.array(ids[0], dtype=np.int64)), {"prompt_token_ids": np.array(ids[0])}], GREEDY)
    assert [o.prompt_token_ids for o in outs] == ids * 2
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids != []


def test_text_parts_chat_as_their_text(llm):
    short = SamplingParams(temperature=0, max_tokens=8)
    plain = llm.chat([{"role": "user", "content": "Name a colour.\nJust one."}], short)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Name a colour."},
                                                   {"type": "text", "text": "Just one."}]}], short)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids
    assert parts.outputs[0].token_ids == plain.outputs[0].token_ids


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -5), ("max_tokens", 0), ("min_p", 2.0),
     ("presence_penalty", 3.0), ("logprobs", 50), ("stop", [""]), ("seed", "x"), ("n", 17)],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_invalid_engine_args_name_the_argument():
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(preemption_mode="sometimes")
    with pytest.raises(TypeError, match="bogus"):
        LLM(bogus=1)


def test_a_kv_cache_too_small_for_one_sequence_fails_at_start_with_the_setting_to_change():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLM(num_kv_blocks=4, max_model_len=512)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(kv_cache_memory=1 << 20)


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    total = engine.stats()["num_total_blocks"]
    engine.add_request("a1", BATCH[3], SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["num_free_blocks"] < total
    assert engine.abort_request("a1")
    assert engine.stats()["num_free_blocks"] == total
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"]
    assert not engine.has_unfinished_requests()


def test_generate_cli_prints_json(capsys):
    rc = ondo_main(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "16", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Paris" in result["text"] and result["finish_reason"] in ("stop", "length")
