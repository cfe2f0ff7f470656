"""The server's own CPU time per streamed token, by uvicorn event loop and HTTP parser.

ondo's app runs on uvicorn in this process with the engine (the embedded model, CPU) in a
process of its own, so this process's CPU time is the server's work alone: HTTP parsing,
JSON, SSE framing, reading the engine's batches. `ondo bench serve` runs in a third
process and sends streaming requests, all at once; each configuration serves a warm-up
round, then the measured rounds.

    python3 bench/server_stream_cost.py --config asyncio/h11 uvloop/httptools
    python3 bench/server_stream_cost.py --config asyncio/h11 --model-shape tiny-llama \
        --num-prompts 256 --output-len 128 --token-id-vocab 4096
    python3 bench/server_stream_cost.py --config asyncio/h11 --model-shape tiny-llama \
        --output-len 1 --profile 40 --profile-sort cumulative     # a request's intake
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import uvicorn
from prometheus_client import CollectorRegistry

from ondo.bench.shapes import SHAPES, shape_folder
from ondo.engine.async_llm import AsyncLLM
from ondo.engine.config import EngineArgs
from ondo.server.app import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_cpu_s() -> float:
    """CPU time of this process's finished children (the client rounds)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def client_round(url: str, args: argparse.Namespace, seed: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "ondo", "bench", "serve", "--base-url", url,
                        "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                        "--output-len", str(args.output_len), "--range-ratio", "0", "--seed", str(seed),
                        "--result-file", f.name]
                       + (["--token-id-vocab", str(args.token_id_vocab)] if args.token_id_vocab else []),
                       check=True, stdout=subprocess.DEVNULL)
        return json.load(open(f.name))


def measure(config: str, args: argparse.Namespace) -> dict:
    loop, http = config.split("/")
    model = {"model": shape_folder(args.model_shape), "load_format": "dummy"} if args.model_shape else {}
    llm = AsyncLLM.from_engine_args(EngineArgs(device="cpu", max_model_len=1024, num_kv_blocks=1024, **model),
                                    max_waiting_requests=4 * args.num_prompts, engine_process=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(llm, "default", registry=CollectorRegistry()),
                                           host="127.0.0.1", port=port, loop=loop, http=http,
                                           log_level="warning"))
    profile = cProfile.Profile() if args.profile else None

    def run() -> None:
        if profile is None:
            server.run()
            return
        profile.enable()
        try:
            server.run()
        finally:
            profile.disable()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        client_round(url, args, seed=100)  # warm-up
        cpu_s, client_cpu_s, tokens, wall_s = 0.0, 0.0, 0, 0.0
        for seed in range(args.rounds):
            cpu0, wall0, client0 = time.process_time(), time.perf_counter(), children_cpu_s()
            summary = client_round(url, args, seed)
            cpu_s += time.process_time() - cpu0
            client_cpu_s += children_cpu_s() - client0
            wall_s += time.perf_counter() - wall0
            if summary["failed"]:
                raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors'][:3]}")
            tokens += summary["total_output_tokens"]
    finally:
        server.should_exit = True
        thread.join(30)
        llm.close()
    if profile is not None:
        pstats.Stats(profile, stream=sys.stderr).sort_stats(args.profile_sort).print_stats(args.profile)
    requests = args.rounds * args.num_prompts
    return {"config": config, "rounds": args.rounds, "requests": requests, "streamed_tokens": tokens,
            "server_cpu_s": cpu_s, "server_cpu_us_per_token": cpu_s / tokens * 1e6,
            "server_cpu_ms_per_request": cpu_s / requests * 1e3,
            "client_cpu_us_per_token": client_cpu_s / tokens * 1e6, "wall_s": wall_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", nargs="+", default=["asyncio/h11", "uvloop/httptools"],
                    help="event loop/HTTP parser pairs, as uvicorn names them")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--token-id-vocab", type=int, default=0,
                    help="send random token-id prompts below this id (0: text prompts)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default=None,
                    help="dummy weights of this shape instead of the embedded model: tiny-llama "
                         "steps fast enough on a CPU that the server, not the engine, sets the pace, "
                         "as on a GPU")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the server thread's N costliest functions (cProfile) to stderr")
    ap.add_argument("--profile-sort", choices=("tottime", "cumulative"), default="tottime",
                    help="rank --profile's functions by their own time or by time under them")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for config in args.config:
        print(json.dumps(measure(config, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
