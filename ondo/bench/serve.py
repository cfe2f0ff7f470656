"""`ondo bench serve`: open-loop load against any OpenAI-compatible server, like `vllm bench serve`.

Requests arrive as a Poisson process at --request-rate (or all at once with `inf`);
each is a streaming /v1/completions call with max_tokens = its output length and
`ignore_eos: true` (servers that do not know it ignore it). Prompts are random words
cut to the wanted token count with a local tokenizer (the embedded model's by default);
lengths are uniform in [len·(1−r), len·(1+r)] or drawn ShareGPT-like (log-normal with
the real conversations' spread, medians at the given lengths), generated locally with
no download.

Reported: request and token throughput, TTFT, TPOT (per request: (latency − TTFT) /
(output tokens − 1)) and ITL (gaps between streamed chunks), mean / p50 / p99 in ms,
as a table and a JSON line (--result-file writes it too).

The client is aiohttp: with hundreds of streams at once, the client's own CPU per
streamed chunk decides how fast a burst is even sent, and aiohttp's is the lowest of
the Python HTTP clients.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np

DATASETS = ("random", "sharegpt-like")
_WORDS = ("time person year way day thing man world life hand part child eye woman place work "
          "week case point number group problem fact water light story river mountain city "
          "garden music color winter summer ocean forest engine signal market letter").split()


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids for a server with no tokenizer
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)


def _lengths(dataset: str, n: int, input_len: int, output_len: int, range_ratio: float,
             rng: random.Random) -> list[tuple[int, int]]:
    if dataset == "random":
        def draw(mean: int) -> int:
            lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
            return rng.randint(lo, hi)
        return [(draw(input_len), draw(output_len)) for _ in range(n)]
    # ShareGPT-like: log-normal lengths with the spread of the ShareGPT V3 conversations vLLM
    # benchmarks with (sigma ~1.0 for prompts, ~0.9 for outputs), medians at --input-len and
    # --output-len, clipped to [1, 4 x median].
    out = []
    for _ in range(n):
        p = int(min(4 * input_len, max(1, rng.lognormvariate(math.log(input_len), 1.0))))
        o = int(min(4 * output_len, max(1, rng.lognormvariate(math.log(output_len), 0.9))))
        out.append((p, o))
    return out


def make_requests(tokenizer, dataset: str, num_prompts: int, input_len: int, output_len: int,
                  range_ratio: float, seed: int, token_id_vocab: int | None = None) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests = []
    for prompt_len, out_len in _lengths(dataset, num_prompts, input_len, output_len, range_ratio, rng):
        if token_id_vocab:
            lo = min(100, token_id_vocab // 4)  # skip the low ids, often special tokens
            ids = [rng.randrange(lo, token_id_vocab - lo) for _ in range(prompt_len)]
            requests.append(BenchRequest(ids, prompt_len, out_len))
            continue
        words = " ".join(rng.choice(_WORDS) for _ in range(prompt_len + 8))
        if tokenizer is not None:
            ids = tokenizer.encode(words, add_special_tokens=False)[:prompt_len]
            words = tokenizer.decode(ids)
        requests.append(BenchRequest(words, prompt_len, out_len))
    return requests


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The `data:` payloads of a server-sent event stream, up to `[DONE]`; events may be
    split across reads or share one, and lines may end in CRLF."""
    buffer = b""
    async for data in response.content.iter_any():
        buffer = (buffer + data).replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")  # an event ends with a blank line
        for event in events:
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    yield payload


async def _one(session: aiohttp.ClientSession, url: str, model: str, req: BenchRequest,
               headers: dict[str, str]) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len)
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return result
            async for payload in _sse_data(r):
                msg = json.loads(payload)
                if "error" in msg:
                    result.error = str(msg["error"].get("message", msg["error"]))
                    return result
                if msg.get("usage"):  # the server's own counts, where it sends them
                    result.output_tokens = msg["usage"].get("completion_tokens", chunks)
                    result.prompt_len = msg["usage"].get("prompt_tokens", result.prompt_len)
                if not msg.get("choices") or not msg["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                chunks += 1
        result.latency_s = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = chunks > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _stats(values_s: list[float]) -> tuple[float, float, float]:
    if not values_s:
        return 0.0, 0.0, 0.0
    ms = np.asarray(values_s) * 1000.0
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def run_benchmark(base_url: str, requests: list[BenchRequest], request_rate: float,
                        model: str | None = None, api_key: str | None = None,
                        max_concurrency: int | None = None, seed: int = 0) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = base_url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)  # 0: no limit
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        if model is None:
            async with client.get(base + "/v1/models", headers=headers) as r:
                r.raise_for_status()
                model = (await r.json())["data"][0]["id"]
        rng = random.Random(seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(req: BenchRequest) -> RequestResult:
            if gate is None:
                return await _one(client, base + "/v1/completions", model, req, headers)
            async with gate:
                return await _one(client, base + "/v1/completions", model, req, headers)

        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - start
    return summarize(results, duration_s, model, base_url, request_rate, max_concurrency)


def summarize(results: list[RequestResult], duration_s: float, model: str, base_url: str,
              request_rate: float, max_concurrency: int | None) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl_s]
    e2e = [r.latency_s for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    summary = {
        "backend": "openai-completions", "base_url": base_url, "model": model,
        "request_rate": "inf" if request_rate == float("inf") else request_rate,
        "max_concurrency": max_concurrency,
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": total_out / duration_s if duration_s else 0.0,
        "total_token_throughput": (total_in + total_out) / duration_s if duration_s else 0.0,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        mean, p50, p99 = _stats(values)
        summary[f"mean_{name}_ms"], summary[f"median_{name}_ms"], summary[f"p99_{name}_ms"] = mean, p50, p99
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return summary


def format_table(s: dict) -> str:
    rows = [
        ("Successful requests", f"{s['completed']}"),
        ("Failed requests", f"{s['failed']}"),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", f"{s['total_input_tokens']}"),
        ("Total generated tokens", f"{s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("itl", "Inter-token Latency")):
        rows.append((f"-- {title} --", ""))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            rows.append((f"{label} {name.upper()} (ms)", f"{s[f'{stat}_{name}_ms']:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    lines = ["=" * (width + 12), " Serving Benchmark Result ".center(width + 12, "=")]
    lines += [f"{k:<{width}}{v:>12}" if v else k.center(width + 12, "-") for k, v in rows]
    lines.append("=" * (width + 12))
    return "\n".join(lines)


@dataclass
class BenchServeArgs:
    base_url: str
    model: str | None = None
    num_prompts: int = 100
    request_rate: float = float("inf")
    dataset: str = "random"
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    seed: int = 0
    tokenizer: str | None = None
    token_id_vocab: int | None = None  # send random token-id prompts from [100, vocab - 100)
    api_key: str | None = None
    max_concurrency: int | None = None
    result_file: str | None = None

    def __post_init__(self) -> None:
        """Refuses what no run could honour, naming the flag, before a request is sent."""
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must be an http:// or https:// URL, got {self.base_url!r}")
        for flag, value in (("--num-prompts", self.num_prompts), ("--input-len", self.input_len),
                            ("--output-len", self.output_len),
                            ("--max-concurrency", self.max_concurrency),
                            ("--token-id-vocab", self.token_id_vocab)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 requests/s, or inf, got {self.request_rate}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")


def bench_serve(args: BenchServeArgs) -> dict:
    from ondo.model.tokenizer import load_tokenizer

    tokenizer = None
    if args.tokenizer != "none" and not args.token_id_vocab:
        tokenizer = load_tokenizer(args.tokenizer)
    requests = make_requests(tokenizer, args.dataset, args.num_prompts, args.input_len,
                             args.output_len, args.range_ratio, args.seed, args.token_id_vocab)
    summary = asyncio.run(run_benchmark(args.base_url, requests, args.request_rate, args.model,
                                        args.api_key, args.max_concurrency, args.seed))
    summary["config"] = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                         for k, v in asdict(args).items()}
    return summary
