"""The server outlives its engine: a step that fails (as on a GPU out of memory) ends only
its own requests; an engine process that dies is restarted with backoff and the server
serves again; when restarts run out, the server exits non-zero. On the CPU, a tiny model
with the embedded model's tokenizer (an engine starts in seconds)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from ondo.engine.async_llm import AsyncLLM, EngineUnavailable
from ondo.engine.config import EngineArgs
from ondo.engine.fault_injection import ENV as FAULT_ENV
from ondo.engine.restart_policy import RestartBudget, RestartPolicy
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.structured_outputs import StructuredOutputsParams
from tests.server_harness import wait_for
from tests.server_process import launch_server
from tests.tokenizer_families import tiny_model_folder

ARGS = dict(max_model_len=256, num_kv_blocks=64, device="cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_model_folder("byte_level_bpe", str(tmp_path_factory.mktemp("tiny")))
LONG = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_the_restart_law_backs_off_gives_up_and_forgets_old_deaths():
    policy = RestartPolicy(max_restarts=3, backoff_initial_s=1.0, backoff_max_s=3.0,
                           stable_after_s=300.0)
    budget = RestartBudget(policy)
    decisions = [budget.on_death(uptime_s=5.0) for _ in range(4)]
    assert [(d.restart, d.attempt, d.delay_s) for d in decisions] == [
        (True, 1, 1.0), (True, 2, 2.0), (True, 3, 3.0), (False, 4, 0.0)]
    budget = RestartBudget(policy)
    assert budget.on_death(5.0).attempt == 1 and budget.on_death(0.0).attempt == 2
    # An engine that ran for longer than stable_after_s starts the count again.
    assert budget.on_death(301.0) == budget.on_death(0.0).__class__(True, 1, 1.0)
    assert not RestartBudget(RestartPolicy(max_restarts=0)).on_death(1000.0).restart
    with pytest.raises(ValueError, match="--engine-restarts"):
        RestartPolicy(max_restarts=-1)


async def _outputs(llm: AsyncLLM, request_id: str, params: SamplingParams = LONG):
    return [o async for o in llm.generate(request_id, "Once upon a time", params)]


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
def test_a_failed_step_ends_only_its_own_requests(monkeypatch, model, engine_process):
    monkeypatch.setenv(FAULT_ENV, "fault-")
    # One sequence per step: the request queued behind the failing one is not in its step.
    llm = AsyncLLM.from_engine_args(EngineArgs(model=model, max_num_seqs=1, **ARGS),
                                    engine_process=engine_process)
    pid = llm._core.pid if engine_process else None
    try:
        async def main():
            return await asyncio.gather(_outputs(llm, "fault-1"), _outputs(llm, "ok-1"))

        failed, ok = asyncio.run(main())
        f = failed[-1]
        assert f.finished and f.outputs[0].finish_reason == "error"
        assert "OutOfMemoryError" in f.error and "injected" in f.error
        o = ok[-1].outputs[0]
        assert o.finish_reason == "length" and len(o.token_ids) == 12
        # The engine goes on: the same one, healthy, nothing leaked.
        again = asyncio.run(_outputs(llm, "ok-2"))[-1].outputs[0]
        assert again.token_ids == o.token_ids
        assert llm.is_healthy and llm.stats()["num_engine_restarts"] == 0
        if engine_process:
            assert llm._core.pid == pid
        total = llm.stats()["num_total_blocks"]
        assert wait_for(lambda: llm.stats()["num_free_blocks"] == total, 30.0)
        stats = llm.stats()
        assert stats["num_requests_admitted"] == 3
        assert stats["num_requests_ended.error"] == 1 and stats["num_requests_ended.length"] == 2
    finally:
        llm.close()


def test_a_failed_step_scheduled_ahead_ends_the_requests_of_both_steps(monkeypatch, model):
    """Asynchronous scheduling: the failing step is scheduled while the one before it is in
    flight; the requests of both end with an error, the one waiting for a seat does not."""
    monkeypatch.setenv(FAULT_ENV, "fault-")
    llm = AsyncLLM.from_engine_args(EngineArgs(model=model, max_num_seqs=2, async_scheduling=True,
                                               **ARGS), engine_process=False)
    try:
        async def main():
            running = llm.generate("ok-running", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
            first = await anext(running)  # noqa: F821 (builtin since 3.10)
            assert not first.finished
            rest = asyncio.gather(_outputs(llm, "fault-1"), _outputs(llm, "ok-waiting"))
            outs = [first] + [o async for o in running]
            return outs, *(await rest)

        running, failed, waiting = asyncio.run(main())
        assert llm.engine.async_scheduling
        assert running[-1].outputs[0].finish_reason == "error" and "injected" in running[-1].error
        assert len(running[-1].outputs[0].token_ids) < 200
        assert failed[-1].outputs[0].finish_reason == "error"
        assert waiting[-1].outputs[0].finish_reason == "length"
        assert len(waiting[-1].outputs[0].token_ids) == 12
        total = llm.stats()["num_total_blocks"]
        assert wait_for(lambda: llm.stats()["num_free_blocks"] == total, 30.0)
    finally:
        llm.close()


NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
               "required": ["name"]}


def test_a_kernel_error_ends_its_step_s_forked_and_constrained_requests_only(monkeypatch, model):
    """A kernel error in the first step after a request with n=2 and a JSON schema forked:
    both its sequences end with the error, their blocks and grammars are freed, the request
    waiting for a seat then runs, and the engine still constrains outputs afterwards."""
    monkeypatch.setenv(FAULT_ENV, "fault-;kind=kernel;after=1")
    llm = AsyncLLM.from_engine_args(EngineArgs(model=model, max_num_seqs=2, **ARGS),
                                    engine_process=False)
    constrained = dict(n=2, temperature=1.0, seed=3, max_tokens=40,
                       structured_outputs=StructuredOutputsParams(json=NAME_SCHEMA))
    try:
        async def main():
            faulty = llm.generate("fault-n", "Once upon a time", SamplingParams(**constrained))
            first = await anext(faulty)  # noqa: F821 (builtin since 3.10)
            # Its two sequences hold both seats (or it is over already): this one waits.
            waiting = asyncio.ensure_future(_outputs(llm, "ok-waiting"))
            outs = [first] + [o async for o in faulty] if not first.finished else [first]
            return outs, await waiting

        failed, waiting = asyncio.run(main())
        f = failed[-1]
        assert f.finished and "injected" in f.error and "illegal instruction" in f.error
        assert [c.finish_reason for c in f.outputs] == ["error", "error"]
        assert all(len(c.token_ids) == 1 for c in f.outputs)  # failed in the step after the fork
        w = waiting[-1].outputs[0]
        assert w.finish_reason == "length" and len(w.token_ids) == 12
        engine = llm.engine
        total = llm.stats()["num_total_blocks"]
        assert wait_for(lambda: llm.stats()["num_free_blocks"] == total, 30.0)
        assert not engine._grammars and not engine._requests and llm.is_healthy
        # The same engine still runs constrained requests (its grammar cache, its masks).
        again = asyncio.run(_outputs(llm, "ok-json", SamplingParams(**constrained)))[-1]
        assert again.error is None and len(again.outputs) == 2
        for c in again.outputs:
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                assert isinstance(json.loads(c.text)["name"], str)
        assert engine.num_failed_steps_in_a_row == 0
    finally:
        llm.close()


def test_steps_failing_in_a_row_restart_the_engine_until_restarts_run_out(monkeypatch, model):
    monkeypatch.setenv(FAULT_ENV, "fault-")
    policy = RestartPolicy(max_restarts=1, backoff_initial_s=0.2)
    llm = AsyncLLM.from_engine_args(EngineArgs(model=model, max_num_seqs=1, **ARGS),
                                    engine_process=True, restart_policy=policy)
    lost: list[str] = []
    llm.on_engine_lost = lost.append
    first_pid = llm._core.pid

    async def three_faults(tag: str):
        return await asyncio.gather(*[_outputs(llm, f"fault-{tag}{i}") for i in range(3)])

    try:
        # Three failed steps in a row: the engine is broken, its process exits, a fresh
        # one takes over.
        for outs in asyncio.run(three_faults("a")):
            assert outs[-1].outputs[0].finish_reason == "error"
        assert wait_for(lambda: not llm.is_healthy or llm._core.pid != first_pid, 30.0)
        assert wait_for(lambda: llm.is_healthy, 120.0), llm.unhealthy_reason
        assert llm._core.pid != first_pid and llm.stats()["num_engine_restarts"] == 1
        ok = asyncio.run(_outputs(llm, "ok-after-restart"))[-1].outputs[0]
        assert ok.finish_reason == "length" and len(ok.token_ids) == 12
        # Again: that is two deaths in a row, one more than --engine-restarts=1 allows.
        asyncio.run(three_faults("b"))
        assert wait_for(lambda: bool(lost), 30.0)
        assert "2 times in a row" in lost[0] and "steps in a row failed" in lost[0]
        assert not llm.is_healthy and "has stopped" in llm.unhealthy_reason
        with pytest.raises(EngineUnavailable, match="stopped"):
            asyncio.run(_outputs(llm, "too-late"))
    finally:
        llm.close()


def _children(pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def _engine_pid(server_pid: int) -> int:
    """The engine process: the server's child running the engine (not multiprocessing's
    resource tracker, which is a child too)."""
    for pid in _children(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"resource_tracker" not in cmdline:
            return pid
    raise AssertionError("no engine process under the server")


# Long enough that the engine is still at it when it is killed after three chunks.
LONG_BODY = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def stream_and_kill(base: str, pid: Callable[[], int]) -> tuple[list[str], float]:
    """LONG_BODY streamed from `base`; after its third chunk the process `pid()` gets SIGKILL.
    The stream's data lines, and when the kill was sent (monotonic seconds)."""
    events: list[str] = []
    killed_s = float("nan")
    t0 = time.monotonic()
    try:
        with httpx.stream("POST", base + "/v1/completions", json=LONG_BODY | {"stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(pid(), signal.SIGKILL)
                    killed_s = time.monotonic()
    except httpx.ReadTimeout as e:  # say where the stream stalled
        raise AssertionError(f"the stream stalled {time.monotonic() - t0:.1f} s in, after {len(events)} "
                             f"events, the kill {'sent ' if killed_s == killed_s else 'not yet sent'}"
                             f"{f'{killed_s - t0:.1f} s in' if killed_s == killed_s else ''}: "
                             f"{events[-3:]}") from e
    return events, killed_s


def _metric_lines(base: str, name: str) -> dict[str, float]:
    """{the labels after model_name: value} of one metric family."""
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit(" ", 1)
            out[labels.rstrip("}").split(",", 1)[1] if "," in labels else ""] = float(value)
    return out


def _metric(base: str, name: str) -> float:
    lines = _metric_lines(base, name)
    assert len(lines) == 1, f"{name}: {lines}"
    return next(iter(lines.values()))


@pytest.mark.slow
def test_ondo_serve_restarts_a_killed_engine_and_serves_again(model):
    proc, base = launch_server(model, "--device", "cpu", "--max-model-len", "1024",
                               "--num-kv-blocks", "128", "--engine-process", "--engine-restarts", "2",
                               "--shutdown-timeout", "5")
    try:
        body = LONG_BODY
        events, killed_s = stream_and_kill(base, lambda: _engine_pid(proc.pid))
        # The stream in flight ended with an error event, then [DONE].
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "exit code -9" in error["message"]
        # While the fresh engine starts: not ready, and new requests get a clear 503.
        health = httpx.get(base + "/health", timeout=5)
        if health.status_code == 503:  # (unless it is back already)
            assert "restarting" in health.json()["error"]["message"]
            late = httpx.post(base + "/v1/completions", json=body | {"max_tokens": 2}, timeout=30)
            assert late.status_code in (200, 503)
            if late.status_code == 503:
                assert late.json()["error"]["code"] == "unavailable" and "Retry-After" in late.headers
        assert httpx.get(base + "/health/live", timeout=5).status_code == 200
        assert wait_for(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 60.0)
        back_s = time.monotonic() - killed_s
        assert back_s < 60.0
        plain = httpx.post(base + "/v1/completions", json=body | {"max_tokens": 8}, timeout=60)
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 8
        assert _metric(base, "ondo:engine_restarts_total") == 1.0
        # The ledger: each admitted request ended exactly once, the killed one with an error.
        ended = _metric_lines(base, "ondo:requests_ended_total")
        assert sum(ended.values()) == _metric(base, "ondo:requests_admitted_total") >= 2
        assert ended['outcome="error"'] == 1.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "exit code -9" in log and "a fresh engine is ready" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_ondo_serve_exits_non_zero_when_no_restart_is_left(model):
    proc, base = launch_server(model, "--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64",
                               "--engine-process", "--engine-restarts", "0")
    try:
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        log = proc.stdout.read()
        assert "the engine is gone" in log and "exit code -9" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
