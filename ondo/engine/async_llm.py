"""`AsyncLLM`: the engine stepping beside asyncio, fed and drained through per-request
async streams.

The engine is single-threaded and callers never touch it: `generate` and `abort` post
commands that the engine's loop (`EngineLoop`) applies before each step, and each step's
outputs come back as one `Published` batch that is handed to the requests' asyncio
queues with one `loop.call_soon_threadsafe` per event loop. The loop runs either on a
thread of this process or in an engine process of its own (`engine_process=True`, the
default on a GPU), where its stepping never competes with the server's Python for the
interpreter lock.

A stream that falls behind the engine gets the outputs waiting for it coalesced into
one (the deltas joined), so a slow reader costs fewer, larger chunks, not a backlog.

Admission control: at most `max_waiting_requests` requests may wait for their first
schedule (queued commands plus the scheduler's waiting queue); beyond that
`generate` raises `QueueFull` (the server answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ondo.engine.config import EngineArgs
from ondo.engine.engine_loop import (
    AbortRequest,
    AddRequest,
    Command,
    EngineLoop,
    Published,
    SetSchedulerLimits,
    final_output,
)
from ondo.engine.engine_process import EngineInfo, EngineProcess, engine_process_default
from ondo.engine.llm_engine import LLMEngine, tokenizer_for
from ondo.engine.outputs import RequestOutput, coalesce
from ondo.engine.restart_policy import RestartPolicy
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler_limits import SchedulerLimits
from ondo.engine.step_stats import StepStats
from ondo.engine.supervisor import EngineSupervisor
from ondo.model.detokenizer import IncrementalDetokenizer
from ondo.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Expected KV footprint of an average request (prompt + output tokens), for the default limit.
_AVERAGE_REQUEST_TOKENS = 512
MIN_DEFAULT_MAX_WAITING = 64
SHUTDOWN_REASON = "server shutting down"
ENDED_PREFIX = "num_requests_ended."  # stats() keys of the ledger, one per outcome


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
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    abort_reason: str | None = None  # set when the server (not the client) aborts it
    held: RequestOutput | BaseException | None = None  # taken from the queue, not yet given

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next(self) -> RequestOutput | BaseException:
        """The next output, joined with any that queued up behind it."""
        item, self.held = self.held, None
        if item is None:
            item = await self.queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self.queue.empty():
            later = self.queue.get_nowait()
            if not isinstance(later, RequestOutput):
                self.held = later
                break
            item = coalesce(item, later)
        return item


class _StreamText:
    """Text made on this side for an engine process's request: the engine sends token ids
    only, so its steps do not pay for decoding. The same detokenizer as the engine's own,
    fed the same ids in whatever groups they arrive (a stream that fell behind decodes its
    backlog in one go), so the text is the one the engine would have made and the final
    text is the concatenation of the streamed deltas."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}

    def fill(self, out: RequestOutput) -> None:
        for c in out.outputs:
            det = self._detokenizers.get(c.index)
            if det is None:
                det = self._detokenizers[c.index] = IncrementalDetokenizer(
                    self.tokenizer, out.prompt_token_ids, self.skip_special_tokens)
            ids = c.new_token_ids
            c.new_text = det.extend(ids[:-1] if c.stop_token_hidden and ids else ids)
            if c.finished:
                c.new_text += det.flush()
            c.text = det.output_text


def _deliver(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


class _EngineThread:
    """The engine's loop on a thread of this process."""

    def __init__(self, engine: LLMEngine, on_published: Callable[[Published], None],
                 on_exit: Callable[[str | None], None]) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[Command] = []
        self._stop = False
        self._on_exit = on_exit
        self._loop = EngineLoop(engine, self._take, on_published)
        self._thread = threading.Thread(target=self._run, name="ondo-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._on_exit(self._loop.run())

    def _take(self, block: bool) -> list[Command] | None:
        with self._cond:
            while block and not self._commands and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            commands, self._commands = self._commands, []
            return commands

    def send(self, command: Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self.engine.add_step_listener(listener)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        """The engine on a thread of this process (see `from_engine_args` for a process)."""
        self._setup(engine.stats(), max_waiting_requests)
        self.engine: LLMEngine | None = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self._core: _EngineThread | EngineProcess = _EngineThread(
            engine, self._on_published, self._on_exit)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_waiting_requests: int | None = None,
                         engine_process: bool | None = None,
                         restart_policy: RestartPolicy | None = None) -> AsyncLLM:
        """engine_process: run the engine in its own process (None: on a GPU, yes).
        restart_policy: restart that process when it dies (None: never; see
        `ondo.engine.supervisor`)."""
        if engine_process is None:
            engine_process = engine_process_default(args.device, args.tensor_parallel_size)
        if not engine_process:
            return cls(LLMEngine(args), max_waiting_requests)
        self = cls.__new__(cls)
        self.engine = None
        core = EngineProcess(args, self._on_published, self._on_exit)
        tokenizer_error: Exception | None = None
        try:  # while the engine loads in its process
            self.tokenizer = tokenizer_for(args)
        except Exception as e:
            tokenizer_error = e
        try:
            info = core.wait_ready()  # the engine's reason first, where both fail
        except BaseException:
            core.close(timeout_s=10.0)
            raise
        if tokenizer_error is not None:
            core.close(timeout_s=10.0)
            raise tokenizer_error
        self._setup(info.stats, max_waiting_requests)
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self._core = core
        if restart_policy is not None and restart_policy.max_restarts > 0:
            self._supervisor = EngineSupervisor(
                restart_policy, lambda: EngineProcess(args, self._on_published, self._on_exit),
                self._adopt, self._give_up)
        core.start_reading()
        log.info("engine process ready in %.1f s (phases %s)", info.startup_s,
                 {k: round(v, 1) for k, v in info.startup_phases_s.items()})
        return self

    def _setup(self, stats: dict[str, float], max_waiting_requests: int | None) -> None:
        self.max_waiting_requests = max_waiting_requests or default_max_waiting_requests(
            int(stats["num_total_blocks"]), int(stats["block_size"]))
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests={max_waiting_requests} must be >= 1")
        self._cond = threading.Condition()  # guards everything below
        self._streams: dict[str, _Stream] = {}
        self._num_queued_adds = 0
        self._num_waiting = 0  # the scheduler's waiting queue, as of the engine's last batch
        self._supervisor: EngineSupervisor | None = None
        self._restarting: str | None = None  # why the engine died, while a fresh one starts
        # Called once with the reason when the engine is gone for good (the server exits).
        self.on_engine_lost: Callable[[str], None] | None = None
        # The ledger: every admitted request ends exactly once, by outcome (a finish
        # reason, "rejected" by the engine, "error", or "client_left").
        self._num_admitted = 0
        self._num_ended: dict[str, int] = {}
        self._accepting = True
        self._dead_reason: str | None = None
        self._stats: dict[str, float] = dict(stats)
        self._request_listeners: list[Callable[[RequestOutput], None]] = []

    @property
    def engine_process(self) -> bool:
        return isinstance(self._core, EngineProcess)

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Called with each engine step's StepStats (on the engine thread, or on the thread
        that reads the engine process)."""
        self._core.add_step_listener(listener)

    def add_request_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Called with each request's final output as the engine publishes it (on the engine
        thread, or on the thread that reads the engine process); it must be quick."""
        self._request_listeners.append(listener)

    def set_scheduler_limits(self, limits: SchedulerLimits) -> None:
        """Tighten the scheduler's limits (a governor's actuators, thread-safe); the engine
        applies them before its next step."""
        self._core.send(SetSchedulerLimits(limits))

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
        prompt_text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        stream = _Stream(asyncio.get_running_loop())
        text = (_StreamText(self.tokenizer, params.skip_special_tokens)
                if self.engine is None and self.tokenizer is not None and not params.stop_list else None)
        with self._cond:
            self._check_admission()
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._num_queued_adds += 1
            self._num_admitted += 1
            # Sent under the lock, so that an abort of this id cannot overtake its add.
            self._core.send(AddRequest(request_id, prompt_text, ids, params, time.monotonic(),
                                       detokenize=text is None))
        finished = False
        outcome = "client_left"  # how it ended, counted once (see stats)
        try:
            while True:
                item = await stream.next()
                if isinstance(item, BaseException):
                    finished = True
                    outcome = "rejected" if isinstance(item, ValueError) else "error"
                    raise item
                if text is not None:
                    text.fill(item)
                if item.finished:
                    finished = True
                    reasons = [c.finish_reason for c in item.outputs]
                    outcome = ("error" if item.error or "error" in reasons
                               else "abort" if "abort" in reasons else reasons[0] or "error")
                    if stream.abort_reason:  # every completion it cut, not only the first
                        for c in item.outputs:
                            if c.finish_reason == "abort":
                                c.stop_reason = stream.abort_reason
                yield item
                if finished:
                    return
        finally:
            with self._cond:
                self._streams.pop(request_id, None)
                self._num_ended[outcome] = self._num_ended.get(outcome, 0) + 1
                if not finished:
                    self._core.send(AbortRequest(request_id))

    def abort(self, request_id: str, reason: str | None = None) -> None:
        """Abort a request (thread-safe). With a reason, its stream still gets the final
        output (finish_reason "abort", stop_reason = reason); without, the caller has left."""
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is not None and reason is not None:
                stream.abort_reason = reason
            elif stream is not None:
                self._streams.pop(request_id)
            self._core.send(AbortRequest(request_id))

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to timeout_s, abort the
        rest (their final output says why), then stop the engine."""
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
        """Stop the engine now; requests still in it are aborted."""
        with self._cond:
            self._accepting = False
        if self._supervisor is not None:
            self._supervisor.close()
        self._core.close()

    @property
    def num_in_flight(self) -> int:
        with self._cond:
            return len(self._streams)

    @property
    def is_healthy(self) -> bool:
        return (self._accepting and self._dead_reason is None and self._restarting is None
                and self._core.is_alive())

    @property
    def unhealthy_reason(self) -> str | None:
        """Why new requests are refused now, or None."""
        if self._dead_reason is not None:
            return f"the engine has stopped: {self._dead_reason}"
        if not self._accepting:
            return "the server is shutting down"
        if self._restarting is not None:
            return f"the engine is restarting after it died ({self._restarting})"
        if not self._core.is_alive():
            return "the engine has stopped"
        return None

    @property
    def is_accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, float]:
        """engine.stats() as of the engine's last published batch (after each step and
        after each batch of commands), plus the server-side figures: queued adds, engine
        restarts, and the request ledger (admitted, and ended by outcome)."""
        with self._cond:
            stats = dict(self._stats)
            stats["num_queued_adds"] = self._num_queued_adds
            stats["max_waiting_requests"] = self.max_waiting_requests
            stats["num_engine_restarts"] = (self._supervisor.num_restarts
                                            if self._supervisor is not None else 0)
            stats["num_requests_admitted"] = self._num_admitted
            for outcome, n in self._num_ended.items():
                stats[f"{ENDED_PREFIX}{outcome}"] = n
        return stats

    def _check_admission(self) -> None:
        if self._dead_reason is not None:
            raise EngineUnavailable(f"the engine has stopped: {self._dead_reason}")
        if not self._accepting:
            raise EngineUnavailable("the server is shutting down and takes no new requests")
        if self._restarting is not None:
            raise EngineUnavailable(f"the engine is restarting after it died ({self._restarting}); "
                                    "retry in a few seconds")
        num_waiting = self._num_waiting + self._num_queued_adds
        if num_waiting >= self.max_waiting_requests:
            raise QueueFull(num_waiting, self.max_waiting_requests)

    # -- called by the engine's side (its thread, or the engine process's reader) --------
    def _on_published(self, batch: Published) -> None:
        with self._cond:
            self._num_queued_adds -= batch.num_added
            self._num_waiting = int(batch.stats["num_waiting"])
            self._stats = batch.stats
            deliveries: list[tuple[_Stream | None, RequestOutput | BaseException]] = [
                (self._streams.get(o.request_id), o) for o in batch.outputs]
            deliveries += [(self._streams.get(r.request_id),
                            ValueError(r.message) if r.invalid else EngineError(r.message))
                           for r in batch.rejected]
        # One hand-off per event loop per batch, not one per request: each call_soon_threadsafe
        # wakes the loop, and hundreds a step starve both sides.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        for stream, item in deliveries:
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        for listener in self._request_listeners:
            for out in batch.outputs:
                if out.finished:
                    listener(out)

    def _on_exit(self, dead_reason: str | None) -> None:
        """The engine has stopped: every request still here gets its final output; a dead
        engine is restarted where a supervisor is set, else the server is told."""
        with self._cond:
            restart = dead_reason is not None and self._supervisor is not None and self._accepting
            if restart:
                self._restarting = dead_reason
            else:
                self._accepting = False
                if dead_reason is not None:
                    self._dead_reason = dead_reason
            streams = dict(self._streams)
        if dead_reason is not None:
            log.error("the engine stopped: %s", dead_reason)
        for request_id, stream in streams.items():
            if dead_reason is None:
                stream.put(final_output(request_id, "abort", stream.abort_reason or SHUTDOWN_REASON))
            else:
                stream.put(final_output(request_id, "error", f"engine stopped: {dead_reason}"))
        if restart:
            assert self._supervisor is not None
            self._supervisor.engine_died(dead_reason)  # type: ignore[arg-type]
        elif dead_reason is not None:
            self._lost(dead_reason)

    def _adopt(self, core: EngineProcess, info: EngineInfo) -> None:
        """A fresh engine process is ready (the supervisor's thread): serve with it, told
        first what the dead one had been told to run with (step listeners, settings)."""
        with self._cond:
            if not self._accepting:  # closed meanwhile
                core.close(timeout_s=10.0)
                return
            old = self._core
            for listener in old.step_listeners:
                core.add_step_listener(listener)
            for command in old.settings:
                core.send(command)
            self._core = core
            self._num_queued_adds = 0  # what the dead engine had queued died with it
            self._num_waiting = 0
            self._stats = dict(info.stats)
            self._restarting = None
        core.start_reading()
        old.close(timeout_s=5.0)

    def _give_up(self, reason: str) -> None:
        """The supervisor gave up restarting the engine."""
        with self._cond:
            self._accepting = False
            self._dead_reason = reason
            self._restarting = None
        self._lost(reason)

    def _lost(self, reason: str) -> None:
        if self.on_engine_lost is not None:
            try:
                self.on_engine_lost(reason)
            except Exception:
                log.exception("on_engine_lost failed")
