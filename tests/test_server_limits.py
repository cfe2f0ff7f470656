"""No single request can stall the server: a body over --max-request-bytes gets 413 before
it is parsed, a large legal prompt is tokenized off the event loop, and meanwhile another
client's stream keeps receiving tokens; stop lists are bounded; --request-timeout ends a
request that runs too long. `ondo serve --engine-process` on the CPU, as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from ondo.engine.config import EngineArgs
from ondo.model.tokenizer import load_tokenizer
from ondo.server.app import build_app
from ondo.server.async_tokenizer import AsyncTokenizer
from ondo.server.limits import DEFAULT_MAX_REQUEST_BYTES, MAX_STOP_STRINGS, RequestLimits
from tests.server_harness import MODEL_NAME, ServerThread
from tests.server_process import launch_server
from tests.tokenizer_families import tiny_model_folder

pytestmark = pytest.mark.slow

# The longest silence a stream may see while another client's request is handled: a
# bound of the design (nothing big runs on the event loop), far above a CPU step.
MAX_GAP_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A tiny model with the embedded model's tokenizer: its steps take milliseconds, so a
    # stream's gaps show the server, not the model's compute on a busy CPU.
    folder = tiny_model_folder("byte_level_bpe", str(tmp_path_factory.mktemp("tiny")))
    proc, base = launch_server(folder, "--device", "cpu", "--max-model-len", "512",
                               "--num-kv-blocks", "256", "--engine-process", "--shutdown-timeout", "5")
    yield base
    proc.kill()
    proc.wait()


class StreamWatch:
    """Streamed completions read on a thread, one after the other, each chunk's arrival
    time noted; they run from `with` until the block ends and one more chunk has come."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.arrivals: list[float] = []
        self.stop_after_s = float("inf")
        self.done = threading.Event()
        self.error: Exception | None = None
        self.finish_reasons: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"prompt": "Tell me a long story about the sea.", "max_tokens": 480,
                "ignore_eos": True, "stream": True, "temperature": 0}
        try:
            while not self._one(body):
                pass
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.error = e
        finally:
            self.done.set()

    def _one(self, body: dict) -> bool:
        """One stream to its end (False) or until the watch is over (True)."""
        with httpx.stream("POST", self.base + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.arrivals.append(time.monotonic())
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                    if reason is not None:
                        self.finish_reasons.append(reason)
                    if self.arrivals[-1] > self.stop_after_s:
                        return True
        return False

    def __enter__(self) -> StreamWatch:
        self.thread.start()
        deadline = time.monotonic() + 60
        while len(self.arrivals) < 5 and not self.done.is_set():
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_after_s = time.monotonic()
        self.thread.join(120)

    def max_gap_s(self, t0: float, t1: float) -> float:
        """The longest time without a chunk over [t0, t1] (the stream must outlast it)."""
        inside = [t for t in self.arrivals if t0 <= t <= t1]
        before = [t for t in self.arrivals if t < t0]
        after = [t for t in self.arrivals if t > t1]
        assert before and after, "the stream did not span the whole interval"
        points = [before[-1], *inside, after[0]]
        return max(b - a for a, b in zip(points, points[1:]))


def post_reading_while_sending(base: str, body: bytes) -> tuple[int, dict, float]:
    """POST /v1/completions from a raw socket that reads the answer while another thread
    still sends the body (as curl does): (status, JSON body, seconds from the start to
    the whole answer)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    t0 = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    def send_body() -> None:
        with contextlib.suppress(OSError):  # the server may close once it has dropped it
            sock.sendall(body)

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    elapsed = time.monotonic() - t0
    sender.join(60)
    sock.close()
    head, payload = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(payload[:_length(data)]), elapsed


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_a_64_mb_body_gets_413_at_once_while_a_stream_keeps_going(server):
    body = b'{"prompt": "' + b"a" * (64 * 1024 * 1024) + b'", "max_tokens": 1}'
    with StreamWatch(server) as watch:
        t0 = time.monotonic()
        status, answer, answer_s = post_reading_while_sending(server, body)
        # A client that reads only once it has sent everything (httpx) gets it as well.
        r = httpx.post(server + "/v1/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        t1 = time.monotonic()
    assert status == 413 and answer_s < MAX_GAP_S
    error = answer["error"]
    assert error["code"] == "request_too_large" and "--max-request-bytes" in error["message"]
    assert str(DEFAULT_MAX_REQUEST_BYTES) in error["message"] and str(len(body)) in error["message"]
    assert r.status_code == 413 and r.json() == answer
    assert watch.error is None and set(watch.finish_reasons) <= {"length"}
    assert watch.max_gap_s(t0, t1) < MAX_GAP_S
    assert httpx.get(server + "/health", timeout=5).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        for _ in range(8):
            yield b"x" * (1024 * 1024)

    r = httpx.post(server + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def health_latencies_while(server: str, request) -> tuple[httpx.Response, list[float]]:
    """`request()`'s response, and how long each /health polled meanwhile took to answer."""
    latencies: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        while not done.is_set():
            t = time.monotonic()
            assert httpx.get(server + "/health", timeout=30).status_code == 200
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        r = request()
    finally:
        done.set()
        poller.join(60)
    return r, latencies


def test_a_large_legal_prompt_is_tokenized_off_the_event_loop(server):
    # ~3 MB of text, under the limit: it takes the tokenizer seconds of CPU, then it is too
    # long for the model. Meanwhile the event loop answers /health (the engine's stream is
    # not the measure here: on two cores the tokenizer's CPU slows the engine's steps).
    prompt = "The quick brown fox jumps over the lazy dog. " * 70_000
    r, latencies = health_latencies_while(server, lambda: httpx.post(
        server + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=120))
    assert r.status_code == 400
    assert "maximum context length is 512 tokens, but the prompt has" in r.json()["error"]["message"]
    assert len(latencies) >= 3 and max(latencies) < MAX_GAP_S


def test_a_large_chat_with_tools_is_templated_off_the_event_loop(server):
    # The chat template (with the tools, or the system prompt describing them) renders and
    # tokenizes on the tokenizer's thread like a plain prompt.
    content = "The quick brown fox jumps over the lazy dog. " * 60_000
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather forecast",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    body = {"messages": [{"role": "user", "content": content}], "tools": tools, "n": 2,
            "max_tokens": 4}
    r, latencies = health_latencies_while(server, lambda: httpx.post(
        server + "/v1/chat/completions", json=body, timeout=120))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "maximum context length is 512 tokens, but the prompt has" in r.json()["error"]["message"]
    assert len(latencies) >= 3 and max(latencies) < MAX_GAP_S


def test_the_tokenizer_thread_leaves_the_event_loop_free():
    """The loop's longest turn while a 3 MB prompt is encoded: the encoding runs on the
    tokenizer's thread, without the interpreter lock; the loop only waits for it."""
    tokenizer = load_tokenizer(None)
    pool = AsyncTokenizer(tokenizer)
    prompt = "The quick brown fox jumps over the lazy dog. " * 70_000

    async def main():
        turns: list[float] = []
        done = asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                turns.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        ids = await pool.encode(prompt)
        done.set()
        await task
        return ids, turns

    try:
        ids, turns = asyncio.run(main())
    finally:
        pool.close()
    assert len(ids) == 700_001
    assert len(turns) > 20 and max(turns) < MAX_GAP_S


def test_stop_lists_are_bounded(server):
    url = server + "/v1/completions"
    many = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    r = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2, "stop": many}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert f"at most {MAX_STOP_STRINGS}" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2, "stop": "x" * 5000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2, "stop_token_ids": list(range(1000))},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
    r = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2, "stop": many[:MAX_STOP_STRINGS]},
                   timeout=30)
    assert r.status_code == 200
    # Also beside n > 1 and a structured output, on the chat endpoint.
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2,
            "response_format": {"type": "json_object"}}
    r = httpx.post(server + "/v1/chat/completions", json=chat | {"stop": many}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = httpx.post(server + "/v1/chat/completions", json=chat | {"stop": many[:2]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_the_request_timeout_aborts_a_request_that_runs_too_long():
    from ondo.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(EngineArgs(max_model_len=512, num_kv_blocks=256, device="cpu"))
    app = build_app(llm, MODEL_NAME, limits=RequestLimits(max_request_bytes=10_000,
                                                          request_timeout_s=1.5))
    try:
        with ServerThread(app) as srv:
            url = srv.base_url + "/v1/completions"
            body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
            t0 = time.monotonic()
            choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
            assert choice["finish_reason"] == "abort"
            assert "--request-timeout" in choice["stop_reason"] and choice["text"]
            assert time.monotonic() - t0 < 30  # ended by its deadline, not by its 480 tokens
            with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            assert events[-1]["choices"][0]["finish_reason"] == "abort"
            assert "--request-timeout" in events[-1]["choices"][0]["stop_reason"]
            # Every completion of an n > 1 request it cut says why, streamed or not.
            choices = httpx.post(url, json=body | {"n": 2}, timeout=60).json()["choices"]
            assert [c["finish_reason"] for c in choices] == ["abort", "abort"]
            assert all("--request-timeout" in c["stop_reason"] for c in choices)
            with httpx.stream("POST", url, json=body | {"n": 2, "stream": True}, timeout=60) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            ends = {c["index"]: c for e in events for c in e["choices"] if c["finish_reason"]}
            assert sorted(ends) == [0, 1]
            assert all("--request-timeout" in c["stop_reason"] for c in ends.values())
            # A short one is unaffected, and the small body limit holds.
            short = httpx.post(url, json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True},
                               timeout=60).json()["choices"][0]
            assert short["finish_reason"] == "length"
            r = httpx.post(url, json={"prompt": "x" * 20_000}, timeout=30)
            assert r.status_code == 413 and "10000" in r.json()["error"]["message"]
            assert llm.num_in_flight == 0
    finally:
        app.state.ctx.close()
        llm.close()


def _http_exchange(sock: socket.socket, base: str) -> bytes:
    """One keep-alive POST on `sock` and its whole answer (b"" if the server had closed)."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}).encode()
    host = base.removeprefix("http://")
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            answer.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk
    return answer


def test_an_idle_keep_alive_connection_outlives_the_clients_own_timeouts(server):
    """The server keeps an idle connection longer than clients do (aiohttp 15 s, httpx 5 s):
    a request sent on a connection the server is closing at that moment would be lost."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        assert _http_exchange(sock, server).startswith(b"HTTP/1.1 200")
        time.sleep(6.0)  # past the HTTP layer's own default of 5 s
        assert _http_exchange(sock, server).startswith(b"HTTP/1.1 200")


def test_bad_limits_name_their_flag():
    with pytest.raises(ValueError, match="--max-request-bytes"):
        RequestLimits(max_request_bytes=0)
    with pytest.raises(ValueError, match="--request-timeout"):
        RequestLimits(request_timeout_s=0)
    with pytest.raises(ValueError, match="--timeout-keep-alive"):
        RequestLimits(keep_alive_s=0)


def test_the_async_tokenizer_batches_concurrent_prompts_and_isolates_a_bad_one():
    tokenizer = load_tokenizer(None)
    texts = [f"Prompt number {i}: the quick brown fox 😀" for i in range(40)]
    pool = AsyncTokenizer(tokenizer, max_batch_size=16)

    async def main():
        good = await asyncio.gather(*[pool.encode(t) for t in texts])
        mixed = await asyncio.gather(pool.encode("fine"), pool.encode("bad \ud800"),
                                     pool.encode("also fine", add_special_tokens=False),
                                     return_exceptions=True)
        return good, mixed

    try:
        good, mixed = asyncio.run(main())
    finally:
        pool.close()
    assert good == [tokenizer.encode(t) for t in texts]
    assert pool.num_encoded == 43 and pool.num_batches < 43 - 10  # most waited in batches
    assert mixed[0] == tokenizer.encode("fine")
    assert isinstance(mixed[1], TypeError)
    assert mixed[2] == tokenizer.encode("also fine", add_special_tokens=False)
