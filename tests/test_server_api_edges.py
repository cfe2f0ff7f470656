"""The server's API where it meets OpenAI's and vLLM's finer points, on loopback with the
embedded model: the legacy logprobs object (top_logprobs with the sampled token, text
offsets into the returned text, streamed or not), one model by id, an assistant's prefill
continued, and parameters that must fail alone or not at all."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from ondo import LLM, SamplingParams
from tests.server_harness import MODEL_NAME, make_async_llm, serve

EMOJI = "Emoji: 😀😃😄"  # at seed 5 the model answers in tokens that are parts of characters


@pytest.fixture(scope="module")
def async_llm():
    llm = make_async_llm()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(async_llm):
    with serve(async_llm) as s:
        yield s


@pytest.fixture(scope="module")
def offline_llm() -> LLM:
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def completion(http, body: dict) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL_NAME} | body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed_completion(http, body: dict) -> tuple[str, dict]:
    """(the text, the logprobs) of a streamed one-choice completion, put together."""
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with http.stream("POST", "/v1/completions", json={"model": MODEL_NAME, "stream": True} | body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                text += c["text"]
                for key in lp:
                    lp[key] += (c["logprobs"] or {}).get(key, [])
    return text, lp


def test_top_logprobs_hold_the_sampled_token_as_well(http):
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 1.5, "seed": 1,
            "ignore_eos": True}
    lp = completion(http, body | {"logprobs": 1})["logprobs"]
    outside = 0
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob and len(top) in (1, 2)
        best = max(top.values())
        outside += logprob < best
    assert outside >= 1  # at this temperature some draws are not the most likely token
    zero = completion(http, body | {"logprobs": 0})["logprobs"]
    assert [list(top) for top in zero["top_logprobs"]] == [[t] for t in zero["tokens"]]


@pytest.mark.parametrize("prompt, seed", [(EMOJI, 5), ("The capital of France is", 2)])
def test_text_offsets_point_into_the_text_the_same_streamed_or_not(http, offline_llm, prompt, seed):
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "seed": seed, "logprobs": 1}
    choice = completion(http, body)
    text, offsets = choice["text"], choice["logprobs"]["text_offset"]
    tokens = choice["logprobs"]["tokens"]
    # The same seeded draws offline give the ids (a seeded request draws the same tokens in
    # any engine and batch).
    offline = offline_llm.generate(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=24))
    ids = offline[0].outputs[0].token_ids
    tokenizer = offline_llm.tokenizer
    assert offline[0].outputs[0].text == text and len(ids) == len(tokens)
    assert any("\ufffd" in t for t in tokens) == (prompt == EMOJI)  # tokens that are no characters
    # Each token starts where the whole characters made by the tokens before it end.
    expected = [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    assert offsets == expected
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    streamed_text, streamed = streamed_completion(http, body)
    assert streamed_text == text and streamed["text_offset"] == offsets
    assert streamed["tokens"] == tokens


def test_a_model_is_found_by_its_id(server, http):
    r = http.get(f"/v1/models/{MODEL_NAME}")
    assert r.status_code == 200 and r.json()["id"] == MODEL_NAME and r.json()["object"] == "model"
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    r = http.get("/v1/models/org/other-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


def test_continue_final_message_goes_on_with_the_assistants_prefill(http, async_llm):
    messages = [{"role": "user", "content": "Name three colours."},
                {"role": "assistant", "content": "The first colour is"}]
    r = http.post("/tokenize", json={"messages": messages, "continue_final_message": True})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    expected = async_llm.tokenizer.hf_tokenizer.apply_chat_template(
        messages, continue_final_message=True, tokenize=False)
    assert async_llm.tokenizer.decode(ids, skip_special_tokens=False) == expected
    assert expected.endswith("The first colour is")  # open: no end of turn after it
    closed = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert closed.json()["tokens"][: len(ids)] == ids and len(closed.json()["tokens"]) > len(ids)
    r = http.post("/v1/chat/completions", json={
        "messages": messages, "continue_final_message": True, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    greedy = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["text"]
    both = http.post("/v1/chat/completions", json={
        "messages": messages, "continue_final_message": True, "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_a_text_part_without_its_text_is_named(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[0].text" and "needs its text" in err["message"]


def test_a_top_k_too_large_for_any_integer_type_runs_and_harms_no_one(http):
    body = {"prompt": "Paris, Rome, Madrid and", "max_tokens": 6, "temperature": 1.0, "seed": 3,
            "ignore_eos": True}
    alone = completion(http, body)["text"]
    for top_k in (2**63, 10**30):
        assert completion(http, body | {"top_k": top_k})["text"] == alone
