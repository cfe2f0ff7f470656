"""`python3 -m ondo serve` as a subprocess, SIGTERM with requests in flight: the short one
finishes, the long one ends with finish_reason "abort" and the stated reason, new requests
get 503 meanwhile, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server_process import launch_server


@pytest.fixture(scope="module")
def served():
    proc, base = launch_server("--device", "cpu", "--max-model-len", "512", "--num-kv-blocks", "256",
                               "--shutdown-timeout", "5")
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_finishes_or_aborts_in_flight_requests_and_exits_zero(served):
    proc, base = served
    results: dict[str, object] = {}

    def long_stream():
        body = {"prompt": "Once upon a time", "max_tokens": 450, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            results["long_stream"] = [json.loads(line[6:]) for line in r.iter_lines()
                                      if line.startswith("data: {")]

    def long_plain():
        body = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 450,
                "ignore_eos": True}
        results["long_plain"] = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)

    def short():
        body = {"prompt": "Hello", "max_tokens": 10, "ignore_eos": True}
        results["short"] = httpx.post(base + "/v1/completions", json=body, timeout=60)

    threads = [threading.Thread(target=f) for f in (long_stream, long_plain, short)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
    for t in threads:
        t.join(timeout=60)
    assert proc.wait(timeout=60) == 0

    assert results["short"].status_code == 200
    assert results["short"].json()["choices"][0]["finish_reason"] == "length"
    last = results["long_stream"][-1]["choices"][0]
    assert last["finish_reason"] == "abort" and last["stop_reason"] == "server shutting down"
    plain = results["long_plain"]
    assert plain.status_code == 200
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "abort" and choice["stop_reason"] == "server shutting down"
    assert 0 < plain.json()["usage"]["completion_tokens"] < 450
