"""`AsyncLLM`: the engine stepping in its own thread, fed and drained from asyncio.

The engine is single-threaded. Callers never touch it: `generate` and `abort` post
commands to a queue that the engine thread applies before each step, and each
step's outputs are handed to per-request asyncio queues with
`loop.call_soon_threadsafe`. When nothing is queued or running the thread sleeps on
a condition variable.

Admission control: at most `max_waiting_requests` requests may wait for their first
schedule (queued commands plus the scheduler's waiting queue); beyond that
`generate` raises `QueueFull` (the server answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ondo.engine.config import EngineArgs
from ondo.engine.llm_engine import LLMEngine
from ondo.engine.outputs import CompletionOutput, RequestOutput
from ondo.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Expected KV footprint of an average request (prompt + output tokens), for the default limit.
_AVERAGE_REQUEST_TOKENS = 512
MIN_DEFAULT_MAX_WAITING = 64
SHUTDOWN_REASON = "server shutting down"


class QueueFull(Exception):
    """Too many requests are waiting; try again after `retry_after_s`."""

    def __init__(self, num_waiting: int, limit: int, retry_after_s: int = 1) -> None:
        super().__init__(
            f"the server is overloaded: {num_waiting} requests are waiting (limit {limit}); "
            f"retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class EngineUnavailable(Exception):
    """The engine is shutting down or has stopped; no new requests are taken."""


class EngineError(Exception):
    """A request failed inside the engine (not because of its input)."""


def default_max_waiting_requests(num_kv_blocks: int, block_size: int) -> int:
    return max(MIN_DEFAULT_MAX_WAITING, num_kv_blocks * block_size // _AVERAGE_REQUEST_TOKENS)


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    arrival_time_s: float


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    abort_reason: str | None = None  # set when the server (not the client) aborts it

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _deliver(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        bm = engine.block_manager
        self.max_waiting_requests = max_waiting_requests or default_max_waiting_requests(
            bm.num_total_blocks, bm.block_size)
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests={max_waiting_requests} must be >= 1")
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition()  # guards everything below
        self._commands: list[_Add | _Abort] = []
        self._streams: dict[str, _Stream] = {}
        self._num_queued_adds = 0
        self._num_waiting = 0  # the scheduler's waiting queue, as of the last engine-thread update
        self._accepting = True
        self._stop = False
        self._dead_reason: str | None = None
        self._stats: dict[str, float] = engine.stats()
        self._thread = threading.Thread(target=self._run, name="ondo-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_waiting_requests: int | None = None) -> AsyncLLM:
        return cls(LLMEngine(args), max_waiting_requests)

    # -- the asyncio side ------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine makes them; the last has `finished` set.

        Raises ValueError (bad input, from the engine), QueueFull, EngineUnavailable,
        or EngineError. Closing or cancelling the iterator early aborts the request.
        """
        params = params or SamplingParams()
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        stream = _Stream(asyncio.get_running_loop())
        with self._cond:
            self._check_admission()
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._num_queued_adds += 1
            self._commands.append(_Add(request_id, text, ids, params, time.monotonic()))
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                    if stream.abort_reason and item.outputs[0].finish_reason == "abort":
                        item.outputs[0].stop_reason = stream.abort_reason
                yield item
                if finished:
                    return
        finally:
            with self._cond:
                self._streams.pop(request_id, None)
            if not finished:
                self._post(_Abort(request_id))

    def abort(self, request_id: str, reason: str | None = None) -> None:
        """Abort a request (thread-safe). With a reason, its stream still gets the final
        output (finish_reason "abort", stop_reason = reason); without, the caller has left."""
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is not None and reason is not None:
                stream.abort_reason = reason
            elif stream is not None:
                self._streams.pop(request_id)
            self._commands.append(_Abort(request_id))
            self._cond.notify()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to timeout_s, abort the
        rest (their final output says why), then stop the engine thread."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._cond:
            left = list(self._streams)
        if left:
            log.warning("aborting %d request(s) still running at shutdown", len(left))
        for request_id in left:
            self.abort(request_id, SHUTDOWN_REASON)
        # Their final outputs arrive within a step; give the streams a moment to send them.
        grace = time.monotonic() + 5.0
        while self.num_in_flight and time.monotonic() < grace:
            await asyncio.sleep(0.02)
        self.close()

    def close(self) -> None:
        """Stop the engine thread now; requests still in it are aborted."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30.0)

    @property
    def num_in_flight(self) -> int:
        with self._cond:
            return len(self._streams)

    @property
    def is_healthy(self) -> bool:
        return self._accepting and self._dead_reason is None and self._thread.is_alive()

    @property
    def is_accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, float]:
        """engine.stats() as of the engine thread's last update (after each step and
        after each batch of commands), plus the server-side queue figures."""
        with self._cond:
            stats = dict(self._stats)
            stats["num_queued_adds"] = self._num_queued_adds
            stats["max_waiting_requests"] = self.max_waiting_requests
        return stats

    def _check_admission(self) -> None:
        if self._dead_reason is not None:
            raise EngineUnavailable(f"the engine has stopped: {self._dead_reason}")
        if not self._accepting:
            raise EngineUnavailable("the server is shutting down and takes no new requests")
        num_waiting = self._num_waiting + self._num_queued_adds
        if num_waiting >= self.max_waiting_requests:
            raise QueueFull(num_waiting, self.max_waiting_requests)

    def _post(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # -- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        busy = False
        try:
            while True:
                with self._cond:
                    while not self._commands and not busy and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    commands, self._commands = self._commands, []
                num_added = self._apply(commands)
                outputs: list[RequestOutput] = []
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as e:
                        log.exception("engine step failed")
                        self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                busy = engine.has_unfinished_requests()
                self._publish(outputs, num_added)
        except BaseException as e:  # a bug in this loop: fail everyone, loudly
            log.exception("engine thread died")
            self._dead_reason = f"{type(e).__name__}: {e}"
        self._drain_on_exit()

    def _apply(self, commands: list[_Add | _Abort]) -> int:
        num_added = 0
        for cmd in commands:
            if isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
                continue
            num_added += 1
            with self._cond:
                stream = self._streams.get(cmd.request_id)
            if stream is None:  # aborted before it reached the engine
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params,
                                        prompt_token_ids=cmd.prompt_token_ids,
                                        arrival_time_s=cmd.arrival_time_s)
            except ValueError as e:
                stream.put(ValueError(str(e)))
            except Exception as e:
                log.exception("add_request %s failed", cmd.request_id)
                stream.put(EngineError(f"the engine could not take the request: {e}"))
        return num_added

    def _publish(self, outputs: list[RequestOutput], num_added: int) -> None:
        stats = self.engine.stats()
        with self._cond:
            self._num_queued_adds -= num_added
            self._num_waiting = len(self.engine.scheduler.waiting)
            self._stats = stats
            deliveries = [(self._streams.get(o.request_id), o) for o in outputs]
        # One hand-off per event loop per step, not one per request: each call_soon_threadsafe
        # wakes the loop, and hundreds a step starve both threads.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for stream, out in deliveries:
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _fail_all(self, reason: str) -> None:
        """After a failed step the batch's state is unknown: end every request in the engine
        with finish_reason "error" and the reason, and free their blocks."""
        failed = self.engine.unfinished_request_ids()
        for request_id in failed:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort of %s after a failed step also failed", request_id)
        with self._cond:
            streams = [(rid, self._streams.get(rid)) for rid in failed]
        for request_id, stream in streams:
            if stream is not None:
                stream.put(_final_output(request_id, "error", reason))

    def _drain_on_exit(self) -> None:
        reason = SHUTDOWN_REASON if self._dead_reason is None else f"engine stopped: {self._dead_reason}"
        with self._cond:
            self._accepting = False
            streams = dict(self._streams)
            self._commands.clear()
        for request_id, stream in streams.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort of %s at engine exit failed", request_id)
            if self._dead_reason is None:
                stream.put(_final_output(request_id, "abort", stream.abort_reason or reason))
            else:
                stream.put(_final_output(request_id, "error", reason))
        with self._cond:
            self._stats = self.engine.stats()


def _final_output(request_id: str, finish_reason: str, reason: str) -> RequestOutput:
    """The last output of a request the engine could not finish itself; says why."""
    completion = CompletionOutput(0, "", [], finish_reason=finish_reason, stop_reason=reason)
    error = reason if finish_reason == "error" else None
    return RequestOutput(request_id, None, [], [completion], True, error=error)
