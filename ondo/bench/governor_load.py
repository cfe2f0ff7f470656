"""W1 load for the governor's GPU benchmark, driven from a process of its own.

The benchmark's own process plays the server: the engine's front end (`AsyncLLM`, the
engine in a process of its own), the NVML poller, the live twin and the governor, where
`ondo serve` keeps them. The load generator is a client elsewhere: a separate process that
keeps `concurrency` requests in flight (a finished one replaced at once; input and output
lengths uniform in [100, 1024], scaled by `scale_len`), so its prompt building and
bookkeeping never take the server's interpreter lock. In the GPU runs before this layout the
client shared that lock with the front end, the poller and the governor, and starved them.

Between the two, a Unix socket and one JSON line per message, as a minimal front end:

    client -> server   {"id": "g17", "prompt": [ids...], "max_tokens": 612}
    server -> client   {"id": "g17", "tokens": 612}         on completion
                       {"id": "g17", "error": "..."}        on failure

The server side (`RequestRelay`) streams each request from the engine as an HTTP handler
would (one async iteration per output) and counts the output tokens as they come, which is
what the benchmark's throughput is read from; it writes to the socket once per request,
where a streaming HTTP server would write per output (a server's own cost per token is
measured by bench/server_stream_cost.py).

    relay = RequestRelay(llm, socket_path); await relay.start()
    client = start_load_process(socket_path, concurrency=256, vocab=151936, seed=0)
    ... relay.tokens (a running count) ...
    await relay.close(); client.wait()

    python3 -m ondo.bench.governor_load --socket PATH --concurrency 256 --vocab 151936
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
from typing import Any


class RequestRelay:
    """The server's side: requests from the socket into the engine, completions back."""

    def __init__(self, llm: Any, socket_path: str, temperature: float = 0.6) -> None:
        self.llm = llm
        self.socket_path = socket_path
        self.temperature = temperature
        self.tokens = 0  # output tokens streamed so far, all requests
        self.completed = 0
        self.failed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, self.socket_path,
                                                       limit=1 << 22)

    async def close(self) -> None:
        """Stop taking requests, abort the ones in flight, close the connections."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        writers = list(self._writers)
        for w in writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                task = asyncio.create_task(self._relay(json.loads(line), writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)

    async def _relay(self, request: dict, writer: asyncio.StreamWriter) -> None:
        from ondo.engine.sampling_params import SamplingParams

        params = SamplingParams(temperature=self.temperature,
                                max_tokens=int(request["max_tokens"]), ignore_eos=True)
        n = 0
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async for out in self.llm.generate(request["id"], request["prompt"], params):
                k = sum(len(c.new_token_ids) for c in out.outputs)
                n += k
                self.tokens += k
            self.completed += 1
            reply: dict[str, Any] = {"id": request["id"], "tokens": n}
        except Exception as e:  # told to the client, which sends another
            self.failed += 1
            reply = {"id": request["id"], "error": f"{type(e).__name__}: {e}"}
        finally:
            self.in_flight -= 1
        if not writer.is_closing():
            writer.write(json.dumps(reply).encode() + b"\n")


class W1Requests:
    """W1-shaped requests: input and output lengths uniform in [100, 1024] times
    `scale_len`, random token ids in [100, vocab - 100)."""

    def __init__(self, vocab: int, scale_len: float = 1.0, seed: int = 0) -> None:
        self.vocab = vocab
        self.scale_len = scale_len
        self.rng = random.Random(seed)
        self.ids = itertools.count()

    def next(self) -> dict[str, Any]:
        n_in = max(1, int(self.rng.randint(100, 1024) * self.scale_len))
        n_out = max(1, int(self.rng.randint(100, 1024) * self.scale_len))
        hi = max(101, self.vocab - 100)
        prompt = [self.rng.randrange(100, hi) for _ in range(n_in)]
        return {"id": f"g{next(self.ids)}", "prompt": prompt, "max_tokens": n_out}


async def run_client(socket_path: str, concurrency: int, requests: W1Requests,
                     connect_timeout_s: float = 60.0) -> dict[str, int]:
    """Keep `concurrency` requests in flight until the server closes the socket."""
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 22)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    sent = done = failed = short = 0
    asked: dict[str, int] = {}  # id -> max_tokens, while in flight

    def send() -> None:
        nonlocal sent
        request = requests.next()
        asked[request["id"]] = request["max_tokens"]
        writer.write(json.dumps(request).encode() + b"\n")
        sent += 1

    for _ in range(concurrency):
        send()
    try:
        while line := await reader.readline():
            reply = json.loads(line)
            expected = asked.pop(reply["id"], None)
            if "error" in reply:
                failed += 1
            elif reply["tokens"] != expected:  # ignore_eos: exactly the tokens asked for
                short += 1
            done += 1
            send()
            if done % 64 == 0:
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return {"sent": sent, "completed": done - failed, "failed": failed, "short": short}


def start_load_process(socket_path: str, concurrency: int, vocab: int,
                       scale_len: float = 1.0, seed: int = 0) -> subprocess.Popen:
    """The client, in a process of its own (this module run as a script)."""
    cmd = [sys.executable, "-m", "ondo.bench.governor_load", "--socket", socket_path,
           "--concurrency", str(concurrency), "--vocab", str(vocab),
           "--scale-len", str(scale_len), "--seed", str(seed)]
    return subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="W1 load from a process of its own")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--scale-len", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.concurrency < 1:
        ap.error("--concurrency must be >= 1")
    if args.vocab < 2 or args.scale_len <= 0:
        ap.error("--vocab must be >= 2 and --scale-len > 0")
    counts = asyncio.run(run_client(args.socket, args.concurrency,
                                    W1Requests(args.vocab, args.scale_len, args.seed)))
    print(json.dumps({"governor_load": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
