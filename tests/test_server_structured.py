"""Structured outputs, n > 1, best_of, logit_bias and tool calling over the OpenAI API: a real
server on loopback with the embedded model, driven by the official `openai` client."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server_harness import MODEL_NAME, make_async_llm, serve, wait_for

CHAT = [{"role": "user", "content": "Name a colour."}]
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                      "parameters": {"type": "object",
                                                     "properties": {"zone": {"type": "string",
                                                                             "maxLength": 12}},
                                                     "required": ["zone"]}}},
]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
BOOK = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40},
                   "year": {"type": "integer", "minimum": 1800, "maximum": 2030},
                   "genres": {"type": "array", "items": {"type": "string", "enum": [
                       "novel", "poetry", "history", "science"]}, "minItems": 1, "maxItems": 2}},
    "required": ["title", "year", "genres"],
}


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
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def streamed_texts(chunks, field: str) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Text per choice index and the finish reasons each index got."""
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = c.delta.content if field == "delta" else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            if c.finish_reason:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    return texts, finishes


def test_chat_n4_gives_four_choices_streamed_and_not(client):
    kwargs = dict(model=MODEL_NAME, messages=CHAT, n=4, max_tokens=8, temperature=1.0, seed=21)
    r = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens <= 32
    texts, finishes = streamed_texts(client.chat.completions.create(stream=True, **kwargs), "delta")
    assert sorted(texts) == [0, 1, 2, 3] and all(len(f) == 1 for f in finishes.values())
    # Seeded sequences sample the same alone or in any batch: the stream matches.
    assert texts == {c.index: c.message.content for c in r.choices}
    assert len(set(texts.values())) > 1


def test_completions_n4_over_two_prompts_index_by_prompt_then_sample(client):
    kwargs = dict(model=MODEL_NAME, prompt=["The sea is", "My cat"], n=4, max_tokens=6, seed=5)
    r = client.completions.create(**kwargs)
    assert sorted(c.index for c in r.choices) == list(range(8))
    texts, finishes = streamed_texts(client.completions.create(stream=True, **kwargs), "text")
    assert sorted(texts) == list(range(8)) and all(len(f) == 1 for f in finishes.values())
    assert texts == {c.index: c.text for c in r.choices}
    # Choice 4..7 belong to the second prompt: sample i of it equals sample i of n=4 alone.
    alone = client.completions.create(model=MODEL_NAME, prompt="My cat", n=4, max_tokens=6, seed=5)
    assert [c.text for c in sorted(alone.choices, key=lambda c: c.index)] == [texts[i] for i in range(4, 8)]


def test_forced_tool_call_parses_into_tool_calls_that_validate(client):
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                           tool_choice=choice, max_tokens=120, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        assert call.function.name in params
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


def test_streamed_forced_tool_call_adds_up_to_the_same_call(client):
    kwargs = dict(model=MODEL_NAME, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2  # the arguments arrive as they are generated
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and
            ch.choices[0].finish_reason] == ["tool_calls"]


def test_auto_tools_are_shown_to_a_model_whose_template_has_none(client):
    plain = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=4, temperature=0)
    with_tools = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                                max_tokens=4, temperature=0)
    # The tools' descriptions (Hermes-style system message) are in the prompt.
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 100
    # A conversation carrying an earlier call and its result goes through the template.
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=turn, tools=TOOLS, max_tokens=6,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_json_schema_stream_concatenates_to_the_non_streamed_answer(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK}}
    kwargs = dict(model=MODEL_NAME, max_tokens=120, temperature=0, response_format=fmt,
                  messages=[{"role": "user", "content": "Describe a famous book as JSON."}])
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), BOOK)
    texts, finishes = streamed_texts(client.chat.completions.create(stream=True, **kwargs), "delta")
    assert texts[0] == whole.message.content and finishes[0] == ["stop"]


def test_guided_choice_and_regex_through_extra_body(client):
    choices = ["positive", "negative", "neutral"]
    r = client.completions.create(model=MODEL_NAME, prompt="Review: great film! Sentiment:", n=4,
                                  max_tokens=10, seed=2, extra_body={"guided_choice": choices})
    assert len(r.choices) == 4 and all(c.text in choices for c in r.choices)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "A date?"}],
                                       max_tokens=20, temperature=0.7, seed=4,
                                       extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r.choices[0].message.content)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Cat?"}],
                                       max_tokens=40, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_best_of_logit_bias_and_seed(client, async_llm):
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", n=2, best_of=4,
                                  max_tokens=6, seed=3, logprobs=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    cumulative = [sum(c.logprobs.token_logprobs) for c in sorted(r.choices, key=lambda c: c.index)]
    assert cumulative[0] >= cumulative[1] - 1e-4  # ranked, most likely first
    token = async_llm.tokenizer.encode(" blue", add_special_tokens=False)[0]
    r = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=3, seed=1,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == " blue" * 3
    a, b = (client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=8, temperature=1.0,
                                      seed=99).choices[0].text for _ in range(2))
    assert a == b


def test_n_greater_than_one_frees_every_block(async_llm, client):
    client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=3, max_tokens=4, seed=1)
    assert wait_for(lambda: async_llm.stats()["num_running"] == 0, 5.0)
    stats = async_llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


SCHEMA_FMT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "not": {}}}}},
     "response_format", "Unimplemented"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}},
     "response_format.json_schema", "schema"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}},
     "response_format.type", "xml"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "[a-"}, "guided_regex", "unclosed"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, "guided_choice", "choice"),
    ("/v1/completions", {"prompt": "x", "guided_json": "{not json"}, "guided_json", "JSON"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": SCHEMA_FMT,
                              "guided_json": {"type": "object"}}, "guided_json", "not several"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]},
     "guided_choice", "not several"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_decoding_backend": "outlines"},
     "guided_decoding_backend", "llguidance"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "required",
                              "response_format": SCHEMA_FMT}, "response_format", "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "launch"}}}, "tool_choice", "launch"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice", "tools"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 5}}, "logit_bias", "99999999"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 5}}, "logit_bias", "abc"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of", "n=3"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, "best_of", "streamed"),
])
def test_bad_structured_requests_get_a_400_naming_the_field(http, path, body, param, words):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
