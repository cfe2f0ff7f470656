"""Streamed text against the plain response's text, through `ondo serve` with its engine in
a process of its own, on a model shape with dummy weights and its word-level tokenizer
(a WordPiece decoder: words joined by spaces, the join a stream can get wrong).

Each prompt goes twice, at the same time: `stream: true` (the deltas concatenated) and
not; greedy, so both make the same tokens and must make the same text. Then the same with
n = 2 sampled (seeded) choices. Prints one row per prompt and one JSON line; exits 1 if
any text differs.

    python3 bench/stream_vs_final.py                                   # a GPU: qwen3-0.6b
    python3 bench/stream_vs_final.py --device cpu --dtype float32      # a CPU: the same shape
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile

import httpx

from ondo.bench.server_process import start_dummy_server
from ondo.bench.shapes import SHAPES, shape_folder


def start_server(args: argparse.Namespace, log_path: str) -> tuple[subprocess.Popen, str]:
    flags = ["--max-model-len", str(args.max_model_len), "--device", args.device,
             "--dtype", args.dtype, "--engine-process", "--telemetry", "off", "--events", "off"]
    if args.num_kv_blocks:
        flags += ["--num-kv-blocks", str(args.num_kv_blocks)]
    return start_dummy_server(shape_folder(args.model_shape), args.port, flags, log_path)


def prompts(num: int, vocab: int, seed: int) -> list[str]:
    """Words of the word-level tokenizer ("w<id>"), 1 to 12 of them; the first is the word
    that once lost its space."""
    rng = random.Random(seed)
    out = ["w115640"] if vocab > 115640 else []
    while len(out) < num:
        out.append(" ".join(f"w{rng.randrange(1, vocab)}" for _ in range(rng.randint(1, 12))))
    return out[:num]


async def texts(client: httpx.AsyncClient, body: dict) -> tuple[dict[int, str], dict[int, str]]:
    """Per choice: (the streamed deltas joined, the plain response's text)."""
    async def streamed() -> dict[int, str]:
        out: dict[int, str] = {}
        async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        out[c["index"]] = out.get(c["index"], "") + c["text"]
        return out

    async def plain() -> dict[int, str]:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return {c["index"]: c["text"] for c in r.json()["choices"]}

    return await asyncio.gather(streamed(), plain())


async def run(base: str, args: argparse.Namespace) -> list[dict]:
    vocab = SHAPES[args.model_shape]["vocab_size"]
    bodies = [{"prompt": p, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
              for p in prompts(args.prompts, vocab, args.seed)]
    bodies += [b | {"temperature": 1.0, "seed": i, "n": 2} for i, b in enumerate(bodies[:args.sampled])]
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout_s) as client:
        results = await asyncio.gather(*[texts(client, b) for b in bodies])
    rows = []
    for body, (streamed, plain) in zip(bodies, results):
        for index in sorted(plain):
            s, p = streamed.get(index, ""), plain[index]
            diff = next((i for i, (a, b) in enumerate(zip(s, p)) if a != b), min(len(s), len(p)))
            rows.append({"prompt": body["prompt"][:40], "n": body.get("n", 1), "index": index,
                         "words": len(p.split()), "equal": s == p,
                         "first_difference": None if s == p else diff,
                         "streamed": None if s == p else s[max(0, diff - 20):diff + 20],
                         "plain": None if s == p else p[max(0, diff - 20):diff + 20]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=20, help="greedy prompts")
    ap.add_argument("--sampled", type=int, default=4, help="of them, sent again with n=2 sampled")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--port", type=int, default=8332)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    args = ap.parse_args(argv)
    if args.prompts < 1 or not 0 <= args.sampled <= args.prompts or args.max_tokens < 1:
        ap.error("want --prompts >= 1, 0 <= --sampled <= --prompts, --max-tokens >= 1")
    log_path = os.path.join(tempfile.gettempdir(), f"ondo-stream-vs-final-{os.getpid()}.log")
    proc, base = start_server(args, log_path)
    try:
        rows = asyncio.run(run(base, args))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    print(f"{'prompt':42} {'n':>2} {'idx':>3} {'words':>5}  equal")
    for r in rows:
        print(f"{r['prompt']:42} {r['n']:>2} {r['index']:>3} {r['words']:>5}  "
              + ("yes" if r["equal"] else f"NO at {r['first_difference']}: "
                 f"{r['streamed']!r} vs {r['plain']!r}"))
    unequal = [r for r in rows if not r["equal"]]
    print(json.dumps({"model_shape": args.model_shape, "device": args.device, "engine_process": True,
                      "texts": len(rows), "equal": len(rows) - len(unequal), "unequal": len(unequal),
                      "max_tokens": args.max_tokens, "examples": unequal[:3]}))
    return 1 if unequal else 0


if __name__ == "__main__":
    sys.exit(main())
