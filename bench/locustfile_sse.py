"""The Locust user of `bench/outside_client.py --locust`: Locust (PyPI `locust`) drives the
load — its users, its gevent HTTP client (`FastHttpUser`), its statistics — and this file
says what one request is: a streamed `/v1/completions` (server-sent events, `ignore_eos`,
`stream_options.include_usage`), read line by line as it arrives.

Run by `ondo.bench.locust_stage`, not by hand. It reads the requests to send from the JSON
file named by ONDO_LOCUST_REQUESTS ({"model": ..., "requests": [{"prompt", "prompt_len",
"max_tokens", "arrival_s"}, ...]}); each user takes the next request, waits for its
arrival time (seconds after the first request was taken; all 0 for a burst) and sends it,
until none is left; when the last one has finished the run quits. When it quits it writes
Locust's own statistics (the request, plus a "TTFT" and a "TPOT" entry per request: counts
and p50 / p99 / max as Locust computes them) as JSON to ONDO_LOCUST_STATS, and every
request's record, in `outside_load.LoadResult`'s fields, as JSON lines to
ONDO_LOCUST_RECORDS.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

_PENDING: deque = deque()
_RECORDS: list[dict] = []
_SPEC: dict = {"model": "", "total": 0, "t0": None}


@events.init.add_listener
def _load_requests(environment, **_kwargs) -> None:
    with open(os.environ["ONDO_LOCUST_REQUESTS"]) as f:
        spec = json.load(f)
    _SPEC["model"] = spec["model"]
    _SPEC["total"] = len(spec["requests"])
    _PENDING.extend(spec["requests"])


@events.quitting.add_listener
def _write_records(environment, **_kwargs) -> None:
    with open(os.environ["ONDO_LOCUST_RECORDS"], "w") as f:
        for rec in _RECORDS:
            f.write(json.dumps(rec) + "\n")
    stats = {}
    for entry in environment.stats.entries.values():
        stats[entry.name] = {"requests": entry.num_requests, "failures": entry.num_failures,
                             "p50": entry.get_response_time_percentile(0.5),
                             "p99": entry.get_response_time_percentile(0.99),
                             "max": entry.max_response_time}
    with open(os.environ["ONDO_LOCUST_STATS"], "w") as f:
        json.dump(stats, f)


def _lines(response):
    """The body's lines as each arrives: geventhttpclient's `readline` on the response under
    Locust's (Locust's own `iter_content` waits until a whole chunk of the size asked for has
    arrived, which holds back a stream's first events and bunches the rest)."""
    stream = response._response
    while True:
        line = stream.readline(b"\n")
        if not line:
            return
        yield line.decode("utf-8", errors="replace").rstrip("\r\n")


class CompletionStreamUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = 3600.0
    connection_timeout = 30.0

    @task
    def complete(self) -> None:
        if not _PENDING:
            raise StopUser()
        req = _PENDING.popleft()
        if _SPEC["t0"] is None:
            _SPEC["t0"] = time.monotonic() + 0.2  # the common start, once every user is up
        gevent.sleep(max(0.0, _SPEC["t0"] + req.get("arrival_s", 0.0) - time.monotonic()))
        rec = {"ok": False, "error": "", "max_tokens": req["max_tokens"],
               "prompt_len": req["prompt_len"], "prompt_tokens": 0, "output_tokens": 0,
               "chunks": 0, "start_s": time.monotonic(), "ttft_s": 0.0, "latency_s": 0.0}
        payload = {"model": _SPEC["model"], "prompt": req["prompt"],
                   "max_tokens": req["max_tokens"], "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True}, "ignore_eos": True}
        start = time.perf_counter()
        try:
            with self.client.post("/v1/completions", json=payload, stream=True,
                                  name="/v1/completions (stream)", catch_response=True) as resp:
                if resp.status_code != 200:
                    rec["error"] = f"HTTP {resp.status_code}"
                    resp.failure(rec["error"])
                else:
                    self._read_stream(resp, rec, start)
                    if not rec["ok"]:
                        resp.failure(rec["error"])
        except Exception as e:  # noqa: BLE001 — any failure is this request's record
            rec["error"] = rec["error"] or f"{type(e).__name__}: {str(e)[:200]}"
        _RECORDS.append(rec)
        if len(_RECORDS) == _SPEC["total"]:
            gevent.spawn(self.environment.runner.quit)
            raise StopUser()

    def _read_stream(self, resp, rec: dict, start: float) -> None:
        for line in _lines(resp):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                rec["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                rec["output_tokens"] = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                if rec["chunks"] == 0:
                    rec["ttft_s"] = time.perf_counter() - start
                rec["chunks"] += 1
        rec["latency_s"] = time.perf_counter() - start
        rec["ok"] = rec["chunks"] > 0 and rec["output_tokens"] > 0
        if not rec["ok"]:
            rec["error"] = "no text or no usage in the stream"
            return
        fire = self.environment.events.request.fire
        fire(request_type="SSE", name="TTFT", response_time=rec["ttft_s"] * 1e3,
             response_length=0, exception=None, context={})
        if rec["output_tokens"] > 1:
            tpot = (rec["latency_s"] - rec["ttft_s"]) / (rec["output_tokens"] - 1)
            fire(request_type="SSE", name="TPOT", response_time=tpot * 1e3,
                 response_length=0, exception=None, context={})
