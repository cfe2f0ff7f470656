"""Load from the official `openai` client, in several processes, against any OpenAI-compatible
server: a check of `ondo bench serve` by a client that ondo did not write.

Each request is a streaming `completions.create` (token-id or text prompt, `ignore_eos`,
`stream_options.include_usage`); its tokens are the server's usage count, its TTFT the
first chunk with text. The requests are split round-robin over --processes worker
processes (spawned), each running one `AsyncOpenAI` client on its own event loop, so no
single Python process has to parse every streamed chunk. Arrival times are drawn once in
the parent (all at zero for a burst, Poisson gaps otherwise) and every worker waits for
the same start instant on the shared monotonic clock; a burst's concurrency bound is
split over the workers. The `openai` package is imported in the workers only (it is a
test extra, not a runtime dependency).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time
from dataclasses import asdict, dataclass
from queue import Empty

import numpy as np


@dataclass(frozen=True)
class LoadRequest:
    prompt: str | list[int]
    prompt_len: int
    max_tokens: int
    arrival_s: float  # after the common start


@dataclass
class LoadResult:
    ok: bool = False
    error: str = ""
    max_tokens: int = 0
    prompt_len: int = 0  # as built
    prompt_tokens: int = 0  # the server's usage count
    output_tokens: int = 0  # the server's usage count
    chunks: int = 0  # streamed chunks with text
    start_s: float = 0.0  # sent, after the common start
    ttft_s: float = 0.0  # first chunk with text, after start_s
    latency_s: float = 0.0  # the stream's end, after start_s


def make_load(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
              vocab_size: int, prompt_kind: str, request_rate: float,
              seed: int) -> list[LoadRequest]:
    """Lengths uniform in [lo, hi]; token ids from [100, vocab − 100) (past the low ids,
    often special tokens); text prompts are the same ids as the shape's word tokenizer's
    words ("w123"), one token each. Arrivals: Poisson at `request_rate`, or all at 0."""
    if prompt_kind not in ("token-ids", "text"):
        raise ValueError(f"prompt kind must be 'token-ids' or 'text', got {prompt_kind!r}")
    rng = random.Random(seed)
    lo_id = min(100, vocab_size // 4)
    out, arrival_s = [], 0.0
    for _ in range(num_requests):
        prompt_len, max_tokens = rng.randint(*input_len), rng.randint(*output_len)
        ids = [rng.randrange(lo_id, vocab_size - lo_id) for _ in range(prompt_len)]
        prompt = ids if prompt_kind == "token-ids" else " ".join(f"w{i}" for i in ids)
        out.append(LoadRequest(prompt, prompt_len, max_tokens, arrival_s))
        if request_rate != float("inf"):
            arrival_s += rng.expovariate(request_rate)
    return out


async def _one(client, model: str, req: LoadRequest, t0: float) -> LoadResult:
    import openai

    result = LoadResult(max_tokens=req.max_tokens, prompt_len=req.prompt_len)
    start = time.monotonic()
    result.start_s = start - t0
    try:
        stream = await client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                if result.chunks == 0:
                    result.ttft_s = time.monotonic() - start
                result.chunks += 1
        result.latency_s = time.monotonic() - start
        result.ok = result.chunks > 0 and result.output_tokens > 0
        if not result.ok:
            result.error = "no text or no usage in the stream"
    except openai.OpenAIError as e:
        result.error = f"{type(e).__name__}: {str(e)[:200]}"
    return result


async def _run_worker(base_url: str, model: str, requests: list[LoadRequest],
                      max_concurrency: int | None, ready, start_at
                      ) -> tuple[list[LoadResult], float]:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=30.0)
    client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="none",
                                max_retries=0, timeout=timeout,
                                http_client=httpx.AsyncClient(limits=limits, timeout=timeout))
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def arrive(req: LoadRequest, t0: float) -> LoadResult:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
        if gate is None:
            return await _one(client, model, req, t0)
        async with gate:
            return await _one(client, model, req, t0)

    async with client:
        # One request off the clock: the client's first-use costs (building its response
        # types, a connection) would otherwise land on the first measured requests' TTFT.
        # Its prompt is one token, shorter than a KV block: nothing of it is prefix-cached.
        first = requests[0].prompt
        one = first[:1] if isinstance(first, list) else first.split()[0]
        warm = await _one(client, model, LoadRequest(one, 1, 1, 0.0), time.monotonic())
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        ready.put(1)
        t0 = await asyncio.to_thread(start_at.get)
        cpu0 = time.process_time()
        out = list(await asyncio.gather(*(arrive(r, t0) for r in requests)))
        return out, time.process_time() - cpu0


def _worker(base_url: str, model: str, requests: list[LoadRequest],
            max_concurrency: int | None, ready, start_at, results) -> None:
    """One process: warm up, say ready, wait for the common start, send; puts its results
    and its CPU seconds from the start."""
    out, cpu_s = asyncio.run(_run_worker(base_url, model, requests, max_concurrency, ready,
                                         start_at))
    results.put(([asdict(r) for r in out], cpu_s))


def run_load(base_url: str, model: str, requests: list[LoadRequest], processes: int,
             max_concurrency: int | None = None, timeout_s: float = 3600.0) -> dict:
    """Sends `requests` from `processes` worker processes; returns the summary (see
    `summarize`) with the workers' CPU share."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    processes = min(processes, len(requests))
    if max_concurrency is not None and max_concurrency < processes:
        raise ValueError(f"max concurrency {max_concurrency} is below the {processes} processes")
    ctx = mp.get_context("spawn")
    ready, start_at, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    shares = [requests[k::processes] for k in range(processes)]
    bounds = ([max_concurrency // processes + (k < max_concurrency % processes)
               for k in range(processes)] if max_concurrency else [None] * processes)
    workers = [ctx.Process(target=_worker, args=(base_url, model, share, bound, ready,
                                                 start_at, results), daemon=True)
               for share, bound in zip(shares, bounds)]
    for w in workers:
        w.start()
    try:
        for _ in workers:
            _get(ready, workers, 120.0)
        t0 = time.monotonic() + 0.2
        for _ in workers:
            start_at.put(t0)
        collected = [_get(results, workers, timeout_s) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
    rows = [LoadResult(**r) for rs, _ in collected for r in rs]
    summary = summarize(rows)
    summary["processes"] = processes
    summary["max_concurrency"] = max_concurrency
    duration_s = summary["duration_s"] or 1.0
    summary["client_cpu_share_max"] = max(cpu for _, cpu in collected) / duration_s
    return summary


def _get(queue, workers: list, timeout_s: float):
    """The next item, or an error as soon as a worker has died (not after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client worker process exited with status {dead[0]}"
                                   " (its error is above)") from None
    raise TimeoutError(f"the client workers did not answer within {timeout_s:.0f} s")


def _percentiles_ms(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ms = np.asarray(values_s) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max())}


def summarize(rows: list[LoadResult]) -> dict:
    """Output tokens per second over the run (first send to last stream end), TTFT and TPOT
    (per request: (latency − TTFT) / (output tokens − 1)) p50 / p99 / max in ms."""
    ok = [r for r in rows if r.ok]
    first = min((r.start_s for r in rows), default=0.0)
    last = max((r.start_s + r.latency_s for r in ok), default=first)
    duration_s = last - first
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(rows), "completed": len(ok), "failed": len(rows) - len(ok),
        "short": sum(r.output_tokens != r.max_tokens for r in ok),
        "prompt_len_mismatch": sum(r.prompt_tokens != r.prompt_len for r in ok),
        "duration_s": duration_s, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": _percentiles_ms([r.ttft_s for r in ok]),
        "tpot_ms": _percentiles_ms([(r.latency_s - r.ttft_s) / (r.output_tokens - 1)
                                    for r in ok if r.output_tokens > 1]),
        "ttft_after_end": sum(r.ttft_s > r.latency_s for r in ok),
        "errors": sorted({r.error for r in rows if not r.ok})[:5],
    }
