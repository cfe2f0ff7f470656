"""The OpenAI-compatible server on loopback with the embedded model, driven by the official
`openai` client and by raw HTTP where the client would hide what is checked."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from ondo.server.protocol import ChatCompletionChunk, CompletionResponse
from tests.server_harness import MODEL_NAME, make_async_llm, serve, wait_for

CHAT = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


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
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def idle_free_blocks(async_llm) -> int:
    assert wait_for(lambda: async_llm.stats()["num_running"] == 0, 5.0)
    return async_llm.stats()["num_free_blocks"]


def test_chat_usage_counts_match_the_tokenizer(client, async_llm):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    expected_prompt = len(async_llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    assert r.usage.prompt_tokens == expected_prompt
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant" and choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    assert r.object == "chat.completion" and r.model == MODEL_NAME


def test_chat_stream_concatenates_to_the_non_streamed_text(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_max_completion_tokens_and_seed(client):
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_completion_tokens=6, temperature=1.0,
                  seed=1234, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.usage.completion_tokens == 6 and a.choices[0].finish_reason == "length"
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completion_stream_matches_and_usage_counts_prompt_tokens(client, async_llm):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert full.usage.prompt_tokens == len(async_llm.tokenizer.encode(PROMPT))
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_prompt_list_and_token_ids(client, async_llm):
    ids = async_llm.tokenizer.encode(PROMPT)
    single = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    batch = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, ids], max_tokens=5,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == batch.choices[1].text == single.choices[0].text
    assert batch.usage.prompt_tokens == 2 * len(ids)


def test_completion_echo_stop_and_logprobs(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                     logprobs=3)
    text = full.choices[0].text
    lp = full.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == full.usage.completion_tokens
    assert all(len(top) == 3 for top in lp.top_logprobs)
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + text
    stop = text.strip()[:3]
    stopped = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra.get("stop_reason") == stop


def test_twenty_concurrent_streaming_clients_all_complete(server, client):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(4)]
    expected = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
                for p in prompts]

    async def one(aclient, i):
        stream = await aclient.completions.create(model=MODEL_NAME, prompt=prompts[i % 4],
                                                  max_tokens=6, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="EMPTY",
                                     max_retries=0)
        try:
            return await asyncio.gather(*[one(aclient, i) for i in range(20)])
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert [f for _, f in results] == ["length"] * 20
    # Batched greedy decoding may flip a near-tie token; the first words must agree.
    for i, (text, _) in enumerate(results):
        assert text.split()[:2] == expected[i % 4].split()[:2], (i, text, expected[i % 4])


def test_client_leaving_mid_stream_frees_its_blocks_within_a_second(server, async_llm):
    free_before = idle_free_blocks(async_llm)
    body = {"model": MODEL_NAME, "prompt": PROMPT * 20, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert async_llm.stats()["num_free_blocks"] < free_before
    t0 = time.monotonic()
    assert wait_for(lambda: async_llm.stats()["num_free_blocks"] == free_before, 1.0)
    assert time.monotonic() - t0 < 1.0


def test_client_leaving_a_non_streamed_request_frees_its_blocks(server, async_llm):
    free_before = idle_free_blocks(async_llm)
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=1.0)
    assert wait_for(lambda: async_llm.stats()["num_free_blocks"] == free_before, 1.0)
    assert async_llm.num_in_flight == 0


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": [999999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", [1, -2]]}, 400, "prompt[1]"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 17}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content[0]"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
])
def test_bad_requests_name_the_parameter(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"]


def test_too_long_requests_state_both_numbers(http, async_llm):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 600})
    assert r.status_code == 400
    n = len(async_llm.tokenizer.encode(PROMPT))
    msg = r.json()["error"]["message"]
    assert "512" in msg and str(n) in msg and "600" in msg
    r = http.post("/v1/completions", json={"prompt": [5] * 600, "max_tokens": 1})
    assert r.status_code == 400 and "600" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"null", b'{"prompt": "x",}',
                                 b"\xff\xfe", b'{"prompt": "\\ud800"}'])
def test_malformed_bodies_get_400_json(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw, content_type, says", [
    (b'{"prompt": "x", "max_tokens": 1}', "text/plain", "sent as Content-Type: application/json, not 'text/plain'"),
    (b'{"prompt": "x", "max_tokens": 1}', "application/x-www-form-urlencoded", "not 'application/x-www-form"),
    (b"[1, 2]", "application/json", "the request body must be a JSON object"),
    (b'"text"', "application/json; charset=utf-8", "the request body must be a JSON object"),
])
def test_a_body_that_is_no_json_object_is_refused_saying_so(http, raw, content_type, says):
    r = http.post("/v1/completions", content=raw, headers={"content-type": content_type})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error" and error["param"] is None


def test_unknown_routes_and_methods_answer_in_the_error_shape(http):
    r = http.get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_is_required_on_v1_when_set(async_llm):
    with serve(async_llm, api_key="sekret") as s:
        with httpx.Client(base_url=s.base_url, timeout=30) as c:
            assert c.get("/v1/models").status_code == 401
            r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get("/health").status_code == 200
        ok = openai.OpenAI(base_url=s.base_url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == [MODEL_NAME]
        bad = openai.OpenAI(base_url=s.base_url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)


def test_models_health_tokenize_detokenize(http, async_llm):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == 512
    assert http.get("/health").json() == {"status": "ok"}
    tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tok["tokens"] == async_llm.tokenizer.encode(PROMPT) and tok["count"] == len(tok["tokens"])
    chat_tok = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat_tok["tokens"] == async_llm.tokenizer.apply_chat_template(CHAT)
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}


def _sample(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{[^}]*" + re.escape(labels) + r"[^}]*\}" if labels else r"(\{[^}]*\})?")
    m = re.search(r"^" + pattern + r" ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} {labels} not exposed"
    return float(m.groups()[-1])


def test_metrics_expose_vllm_names_with_values(http, async_llm):
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True})
    text = http.get("/metrics").text
    stats = async_llm.stats()
    assert _sample(text, "ondo:prompt_tokens_total") == stats["num_prompt_tokens_total"]
    assert _sample(text, "ondo:generation_tokens_total") == stats["num_generation_tokens_total"]
    assert _sample(text, "ondo:request_success_total", 'finished_reason="length"') >= 1
    assert _sample(text, "ondo:num_preemptions_total", 'mode="swap"') == 0
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
                 "kv_cache_usage_perc", "cpu_swap_usage_perc"):
        assert _sample(text, f"ondo:{name}") == 0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert _sample(text, f"ondo:{name}_count") >= 1


def test_sse_stream_ends_with_done_and_valid_chunks(http):
    body = {"messages": CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("path, body, model", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "stream": True, "n": 2},
     CompletionResponse),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "stream": True}, ChatCompletionChunk),
])
def test_every_streamed_event_is_the_response_models_own_json(http, path, body, model):
    # Mid-stream text chunks are written from a template, the rest by the models: on the
    # wire every event must be exactly what the model dumps.
    with http.stream("POST", path, json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert len(events) > 4
    for event in events[:-1]:
        assert model.model_validate_json(event).model_dump_json() == event
    texts = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert any(c.get("finish_reason") for c in texts)
