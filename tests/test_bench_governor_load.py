"""The governor benchmark's load from a process of its own: a real client process keeps its
requests in flight against a real engine (tiny Llama on the CPU) through the relay, every
completion has the tokens it asked for, and the relay counts them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ondo.bench.governor_load import RequestRelay, W1Requests, start_load_process
from ondo.engine.async_llm import AsyncLLM
from ondo.engine.config import EngineArgs
from tests.test_governor_engine import tiny_path
from tests.tiny_checkpoints import TINY_SHAPE

ROOT = Path(__file__).resolve().parents[1]


def test_the_client_process_keeps_its_requests_in_flight_and_gets_every_token():
    llm = AsyncLLM.from_engine_args(EngineArgs(
        model=tiny_path(), block_size=4, max_model_len=96, num_kv_blocks=256, max_num_seqs=8,
        max_num_batched_tokens=64, device="cpu"), engine_process=False)
    path = os.path.join(tempfile.mkdtemp(prefix="ondo-load-test-"), "load.sock")
    relay = RequestRelay(llm, path)

    async def run() -> subprocess.Popen:
        await relay.start()
        client = start_load_process(path, concurrency=4, vocab=TINY_SHAPE["vocab_size"],
                                    scale_len=0.02, seed=3)
        deadline = time.monotonic() + 60.0
        while relay.completed < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await relay.close()
        await asyncio.to_thread(client.wait, 30)
        return client

    try:
        client = asyncio.run(run())
    finally:
        llm.close()
    out, err = client.communicate()
    assert client.returncode == 0, err[-2000:]
    counts = json.loads(out.strip().splitlines()[-1])["governor_load"]
    assert relay.completed >= 30 and relay.failed == 0
    assert relay.max_in_flight == 4  # the closed loop holds its concurrency, no more
    # Every completion the client read had exactly the tokens it asked for; those still on
    # their way when the relay closed were written to a closed socket.
    assert counts["short"] == 0 and counts["failed"] == 0
    assert relay.completed - 4 <= counts["completed"] <= relay.completed
    assert counts["sent"] == counts["completed"] + 4
    # W1's lengths, scaled: outputs of 2 to 20 tokens.
    assert 2 * relay.completed <= relay.tokens <= 20 * (relay.completed + 4)


def test_w1_requests_are_seeded_and_in_range():
    a, b = W1Requests(1000, 1.0, seed=5), W1Requests(1000, 1.0, seed=5)
    first = [a.next() for _ in range(50)]
    assert first == [b.next() for _ in range(50)]
    assert all(100 <= len(r["prompt"]) <= 1024 and 100 <= r["max_tokens"] <= 1024
               for r in first)
    assert all(100 <= t < 900 for r in first for t in r["prompt"])
    assert len({r["id"] for r in first}) == 50


def test_the_client_refuses_a_bad_flag_naming_it():
    proc = subprocess.run([sys.executable, "-m", "ondo.bench.governor_load", "--socket", "x",
                           "--vocab", "100", "--concurrency", "0"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--concurrency" in proc.stderr
