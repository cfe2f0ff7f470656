"""`ondo serve --tensor-parallel-size 2` on the CPU: a worker killed while a request streams
fails that request with an error naming the rank and the signal, the engine process dies
with it and is restarted (with fresh workers) by the server's supervisor, the server serves
again, and a drained shutdown leaves no process behind."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.server_harness import wait_for
from tests.server_process import launch_server, server_log
from tests.test_engine_supervision import (
    LONG_BODY,
    _children,
    _engine_pid,
    _metric,
    stream_and_kill,
)
from tests.tokenizer_families import tiny_model_folder


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _workers(engine_pid: int) -> list[int]:
    pids = []
    for pid in _children(engine_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"resource_tracker" not in f.read():
                pids.append(pid)
    return pids


@pytest.mark.slow
def test_a_dead_worker_restarts_the_engine_process_and_the_server_serves_again(tmp_path):
    model = tiny_model_folder("byte_level_bpe", str(tmp_path / "tiny"))
    proc, base = launch_server(model, "--device", "cpu", "--max-model-len", "1024",
                               "--num-kv-blocks", "128", "--tensor-parallel-size", "2",
                               "--engine-restarts", "1", "--shutdown-timeout", "5")
    try:
        engine = _engine_pid(proc.pid)
        (worker,) = _workers(engine)
        body = LONG_BODY
        events, _ = stream_and_kill(base, lambda: worker)
        assert events[-1] == "[DONE]"
        message = json.loads(events[-2])["error"]["message"]
        assert "worker rank 1" in message and "SIGKILL" in message, message
        # The engine process ended (its workers with it) and a fresh one took over.
        assert wait_for(lambda: not _alive(engine), 30.0)
        assert wait_for(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 90.0)
        fresh = _engine_pid(proc.pid)
        assert fresh != engine and len(_workers(fresh)) == 1
        (fresh_worker,) = _workers(fresh)
        plain = httpx.post(base + "/v1/completions", json=body | {"max_tokens": 8}, timeout=60)
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 8
        assert _metric(base, "ondo:engine_restarts_total") == 1.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "worker rank 1" in log and "a fresh engine is ready" in log
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in (fresh, fresh_worker)):
            time.sleep(0.1)
        assert not any(_alive(p) for p in (engine, worker, fresh, fresh_worker))
    except BaseException:
        print("ondo serve's log:\n" + server_log(proc))  # in the failure's report
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
