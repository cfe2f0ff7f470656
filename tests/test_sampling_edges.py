"""Sampling at its edges on the embedded model: min_tokens keeps the tokens that would end a
sequence out of its first min_tokens draws, a stop token's text is left out of the output,
and parameter values at the ends of their ranges draw what they mean (never garbage, and
never a failure for the other requests of the step)."""

from __future__ import annotations

import pytest

from ondo import LLM, SamplingParams

CHAT = [{"role": "user", "content": "Reply with just the word ok."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def chat_answer(llm):
    """The greedy answer to CHAT, which ends with EOS within 30 tokens."""
    c = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert c.finish_reason == "stop" and c.token_ids[-1] in llm.engine.eos_token_ids
    return c.token_ids


def test_min_tokens_keeps_eos_out_of_the_first_draws(llm, chat_answer):
    eos = llm.engine.eos_token_ids
    min_tokens = len(chat_answer) + 2  # past where the answer ends by itself
    c = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=60, min_tokens=min_tokens))[0].outputs[0]
    assert not set(c.token_ids[:min_tokens]) & set(eos)
    # Greedy up to the answer's EOS, then the best token that is not EOS.
    assert c.token_ids[: len(chat_answer) - 1] == chat_answer[:-1]
    assert len(c.token_ids) > min_tokens or c.finish_reason == "length"
    # An EOS is allowed again from token min_tokens + 1 on: where it comes, it ends the answer.
    assert c.finish_reason == "length" or c.token_ids[-1] in eos


def test_min_tokens_keeps_stop_token_ids_out_too(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    ids = greedy.outputs[0].token_ids
    stop = ids[1]  # "." after " Paris"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop],
                            min_tokens=6)
    c = llm.generate(PROMPT, params)[0].outputs[0]
    assert stop not in c.token_ids[:6]
    assert c.token_ids[0] == ids[0] and c.token_ids[1] != stop
    if c.finish_reason == "stop":
        assert c.stop_reason == stop and c.token_ids[-1] == stop and len(c.token_ids) > 6
    # Without min_tokens the same stop ends it at once: the mask, not chance, kept it out.
    early = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                stop_token_ids=[stop]))[0].outputs[0]
    assert early.token_ids == ids[:2] and early.finish_reason == "stop"


def test_a_seeded_draw_with_min_tokens_still_repeats(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, min_tokens=25)
    first = llm.chat(CHAT, params)[0].outputs[0].token_ids
    again = llm.chat(CHAT, params)[0].outputs[0].token_ids
    assert first == again and not set(first[:25]) & set(llm.engine.eos_token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_token_leaves_its_text_out(llm, stream):
    tok = llm.tokenizer
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[30])  # "."
    full = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[30],
                          include_stop_str_in_output=True)
    outs = {}
    for name, p in (("plain", params), ("included", full)):
        engine = llm.engine
        engine.add_request(name, PROMPT, p, stream=stream)
        streamed, final = "", None
        while engine.has_unfinished_requests():
            for out in engine.step():
                streamed += out.outputs[0].new_text
                if out.finished:
                    final = out.outputs[0]
        assert streamed == final.text
        outs[name] = final
    plain, included = outs["plain"], outs["included"]
    assert plain.token_ids == included.token_ids and plain.token_ids[-1] == 30
    assert plain.finish_reason == "stop" and plain.stop_reason == 30
    assert plain.text == tok.decode(plain.token_ids[:-1]) == " Paris"
    assert included.text == tok.decode(included.token_ids) == " Paris."


def test_eos_text_is_left_out_even_with_special_tokens_shown(llm, chat_answer):
    shown = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40,
                                          skip_special_tokens=False))[0].outputs[0]
    assert shown.token_ids == chat_answer
    assert shown.text == llm.tokenizer.decode(chat_answer[:-1], skip_special_tokens=False)
    assert not shown.text.endswith("<|im_end|>")
    kept = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False,
                                         include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == shown.text + "<|im_end|>"


def test_a_top_k_past_the_vocabulary_cuts_nothing_and_harms_no_one(llm):
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    plain = llm.generate(PROMPT, seeded)[0].outputs[0].token_ids
    huge = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, top_k=2**70)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([PROMPT, "Paris, Rome, Madrid and"], [huge, greedy])
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    assert outs[0].outputs[0].token_ids == plain
    assert outs[1].outputs[0].token_ids == llm.generate("Paris, Rome, Madrid and", greedy)[0] \
        .outputs[0].token_ids


@pytest.mark.parametrize("top_p", [1e-300, 5e-324])
def test_a_top_p_below_float32_keeps_the_top_token(llm, top_p):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    tiny = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=top_p, seed=1, max_tokens=10,
                                               ignore_eos=True))
    assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_a_tiny_repetition_penalty_repeats_what_was_seen(llm):
    # Dividing positive logits by ~0 makes seen tokens far likelier than any other (a
    # penalty that rounds to 0 made them infinite, and the draws NaN).
    out = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True,
                                              repetition_penalty=1e-300, logprobs=0))[0]
    c = out.outputs[0]
    seen = set(out.prompt_token_ids)
    for i, token in enumerate(c.token_ids):
        assert token in seen, (i, token)
        seen.add(token)
    assert all(lp[t] > -100 for lp, t in zip(c.logprobs, c.token_ids))  # the model's, finite
