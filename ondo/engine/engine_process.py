"""The engine in a process of its own, so that its stepping never waits on the server's
Python (HTTP parsing, JSON, SSE framing for hundreds of streams) for the interpreter lock.

The server side (`EngineProcess`) starts the process with "spawn" (CUDA cannot follow a
fork), waits for its "ready" message, then writes commands to one pipe and reads
`Published` batches from another on a reader thread. The engine side runs the same
`EngineLoop` as the in-process thread does.

On the wire, an unfinished output after a request's first leaves out what the receiver
already has (the prompt's text and ids, unchanged metrics, the cumulative text, which is
the concatenation of the deltas) and travels as a plain tuple. `WireEncoder` strips,
`WireDecoder` restores, so the outputs that reach `AsyncLLM` are the ones the engine made.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

from ondo.engine.config import EngineArgs
from ondo.engine.engine_loop import AbortRequest, AddRequest, Command, EngineLoop, Published
from ondo.engine.gc_pauses import GcPauses, freeze_startup_heap, thaw_heap
from ondo.engine.outputs import CompletionOutput, RequestOutput, WireDelta
from ondo.engine.step_stats import StepStats
from ondo.engine.window_report import WindowReport

log = logging.getLogger(__name__)
T = TypeVar("T")

STARTUP_TIMEOUT_S = 900.0  # loading, profiling and compiling a large model on a cold cache
_STOP = "stop"
_SEND_STEP_STATS = "send step stats"  # from the first step listener on: each step costs its FLOPs estimate


@dataclass
class EngineInfo:
    """What the server needs to know about the engine, sent once it is ready."""

    max_model_len: int
    vocab_size: int
    stats: dict[str, float]
    startup_s: float
    startup_phases_s: dict[str, float]


class EngineStartError(RuntimeError):
    """The engine process could not build its engine; the message says why."""



class WireEncoder:
    """Engine side: a request's first output and its finished one go whole; the others
    go as `WireDelta` tuples (plain tuples pickle several times faster than the
    dataclasses they stand for), without the prompt and the cumulative text (the receiver
    has the first and rebuilds the second from the deltas). The engine makes the plainest
    ones itself (`LLMEngine.wire_deltas`); they pass through."""

    def __init__(self) -> None:
        self._metrics: dict[str, dict[str, float]] = {}  # last sent, by request id

    def encode(self, batch: Published) -> Published:
        batch.outputs = [self._encode(o) for o in batch.outputs]
        return batch

    def _encode(self, out: RequestOutput | WireDelta) -> RequestOutput | WireDelta:
        if isinstance(out, tuple):
            return out
        if out.finished:
            self._metrics.pop(out.request_id, None)
            return out
        last = self._metrics.get(out.request_id)
        if last is None:
            self._metrics[out.request_id] = out.metrics
            return out
        metrics = None
        if out.metrics != last:
            metrics = self._metrics[out.request_id] = out.metrics
        return (out.request_id, metrics,
                tuple((c.index, c.new_text, c.new_token_ids, c.new_logprobs, c.cumulative_logprob,
                       c.stop_reason, c.stop_token_hidden) for c in out.outputs))


class WireDecoder:
    """Server side: rebuilds the engine's outputs, prompt and cumulative text included."""

    def __init__(self) -> None:
        # by request id: prompt, prompt ids, metrics, text so far by completion index
        self._state: dict[str, tuple[str | None, list[int], dict[str, float], dict[int, str]]] = {}

    def decode(self, item: RequestOutput | WireDelta) -> RequestOutput:
        if isinstance(item, RequestOutput):
            if item.finished:
                self._state.pop(item.request_id, None)
            else:
                self._state[item.request_id] = (item.prompt, item.prompt_token_ids, item.metrics,
                                                {c.index: c.text for c in item.outputs})
            return item
        request_id, metrics, completions = item
        prompt, ids, last_metrics, texts = self._state[request_id]
        if metrics is None:
            metrics = last_metrics
        else:
            self._state[request_id] = (prompt, ids, metrics, texts)
        outputs = []
        for index, new_text, new_ids, new_lps, cumulative, stop_reason, hidden in completions:
            text = texts[index] = texts.get(index, "") + new_text
            outputs.append(CompletionOutput(index, text, [], None, stop_reason, None, cumulative,
                                            new_text, new_ids, new_lps, hidden))
        return RequestOutput(request_id, prompt, ids, outputs, False, metrics=metrics)


def merge(batches: list[Published]) -> Published:
    """Consecutive batches as one, in order: what a reader that fell behind gets."""
    if len(batches) == 1:
        return batches[0]
    return Published([o for b in batches for o in b.outputs], [r for b in batches for r in b.rejected],
                     sum(b.num_added for b in batches), batches[-1].stats,
                     [s for b in batches for s in b.step_stats])


class PipeWriter(Generic[T]):
    """One end of a pipe written by a thread of its own: `put` never blocks its caller,
    however full the pipe. What piles up while the reader is behind leaves as one message,
    `pack(items)`, so the reader pays per message, not per item. Both processes write
    this way: the engine must not stop stepping for a server busy with hundreds of
    streams, and the server's event loop must not stop for an engine in mid-step (a
    burst of requests overfills a pipe's 64 KiB long before the engine next reads)."""

    def __init__(self, conn: Connection, pack: Callable[[list[T]], Any], name: str) -> None:
        self._conn = conn
        self._pack = pack
        self._cond = threading.Condition()
        self._pending: list[T] = []
        self._closed = False
        self.broken = False  # the reader is gone
        self.num_items = 0
        self.num_messages = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        with self._cond:
            self._pending.append(item)
            self.num_items += 1
            self._cond.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is pending, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                items, self._pending = self._pending, []
            if self.broken:
                continue
            try:
                self._conn.send(self._pack(items))
                self.num_messages += 1
            except (BrokenPipeError, OSError):
                self.broken = True


class Publisher(PipeWriter[Published]):
    """Engine side of the results pipe: each step's batch, stripped for the wire
    (`WireEncoder`) on the engine's thread, in order; waiting batches are merged."""

    def __init__(self, results: Connection) -> None:
        super().__init__(results, merge, "ondo-engine-publisher")
        self._encoder = WireEncoder()

    def publish(self, batch: Published) -> None:
        self.put(self._encoder.encode(batch))


def run_engine(args: EngineArgs, commands: Connection, results: Connection, log_level: int) -> None:
    """The engine process's main: build the engine, say ready, loop until told to stop."""
    # The server process handles SIGINT/SIGTERM (drain, then stop this process); a signal
    # sent to the whole process group must not kill the engine under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    from ondo.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(args)
    except BaseException as e:
        log.exception("the engine could not start")
        results.send(("failed", f"{type(e).__name__}: {e}"))
        return
    engine.wire_deltas = True  # its outputs only cross the pipe
    frozen = freeze_startup_heap()
    log.info("%d objects alive after start-up are exempt from garbage collection", frozen)
    gc_pauses = GcPauses().start()
    results.send(("ready", EngineInfo(engine.max_model_len, engine.model_config.vocab_size,
                                      engine.stats(), engine.startup_s, engine.startup_phases_s)))
    step_stats: list[StepStats] = []
    listening = False
    publisher = Publisher(results)
    window = WindowReport(engine.step_timing_s, engine.device)

    def take(block: bool) -> list[Command] | None:
        nonlocal listening
        taken: list[Any] = []
        t0 = time.perf_counter()
        try:
            if block:
                taken += commands.recv()
                window.loop_time("idle", time.perf_counter() - t0)
                t0 = time.perf_counter()
            while commands.poll():
                taken += commands.recv()  # each message: the commands the server had queued
        except (EOFError, OSError):  # the server process is gone
            return None
        window.loop_time("take", time.perf_counter() - t0)
        if _STOP in taken:
            return None
        if _SEND_STEP_STATS in taken:
            taken = [c for c in taken if c != _SEND_STEP_STATS]
            if not listening:
                engine.add_step_listener(step_stats.append)
                listening = True
        return taken

    publish_s = 0.0

    def publish(batch: Published) -> None:
        nonlocal publish_s
        t0 = time.perf_counter()
        publisher.publish(batch)
        elapsed = time.perf_counter() - t0
        publish_s += elapsed
        window.loop_time("publish", elapsed)
        window.maybe_log()

    dead = EngineLoop(engine, take, publish, step_stats).run()
    engine.close()
    publisher.close()
    timing = engine.step_timing_s
    if timing["steps"]:
        log.info("engine host time per step, ms: %s over %d steps (%d scheduled ahead); "
                 "publishing %.3f ms per batch, %d batches in %d messages; garbage collector: %s",
                 {k: round(v / timing["steps"] * 1e3, 3) for k, v in timing.items() if k != "steps"},
                 timing["steps"], engine.num_steps_ahead, publish_s / max(publisher.num_items, 1) * 1e3,
                 publisher.num_items, publisher.num_messages, gc_pauses.summary())
    gc_pauses.stop()
    thaw_heap()
    try:
        results.send(("exit", dead))
    except (BrokenPipeError, OSError):
        pass
    if dead is not None:
        raise SystemExit(1)  # for whoever watches the exit code: this engine died


class EngineProcess:
    """Server side of the engine process; starts it at once, then `wait_ready()`.
    `on_published` and `on_exit` run on the reader thread; `on_exit(reason)` runs once,
    with None for a requested stop."""

    def __init__(self, args: EngineArgs, on_published: Callable[[Published], None],
                 on_exit: Callable[[str | None], None],
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        ctx = mp.get_context("spawn")
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        self._results, results_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=run_engine, name="ondo-engine",
                                    args=(args, cmd_recv, results_send, logging.getLogger().level),
                                    daemon=True)
        self._process.start()
        cmd_recv.close()
        results_send.close()
        # Commands go out through a thread: the event loop that calls send() never waits
        # for the engine to finish a step and read.
        self._commands: PipeWriter[Command | str] = PipeWriter(cmd_send, list, "ondo-engine-commands")
        self._on_published = on_published
        self._on_exit = on_exit
        self._startup_timeout_s = startup_timeout_s
        self._step_listeners: list[Callable[[StepStats], None]] = []
        self._settings: dict[type, Command] = {}  # the latest of each kind (see `settings`)
        self._reader = threading.Thread(target=self._read, name="ondo-engine-reader", daemon=True)

    def wait_ready(self) -> EngineInfo:
        """Block until the engine is up (the caller may do its own start-up meanwhile);
        raises EngineStartError with the engine's reason when it could not start."""
        self.info = self._ready(self._startup_timeout_s)
        return self.info

    def start_reading(self) -> None:
        """Start handing the engine's batches to `on_published` (once the receiver is set up)."""
        self._reader.start()

    def _ready(self, timeout_s: float) -> EngineInfo:
        if not self._results.poll(timeout_s):
            self._process.kill()
            raise EngineStartError(f"the engine process did not start within {timeout_s:.0f} s")
        try:
            msg = self._results.recv()
        except EOFError:
            self._process.join(5.0)
            raise EngineStartError(
                f"the engine process exited during start-up (exit code {self._process.exitcode})") from None
        if msg[0] == "failed":
            self._process.join(10.0)
            raise EngineStartError(msg[1])
        return msg[1]

    def send(self, command: Command) -> None:
        """Queue a command for the engine; never blocks. Commands arrive in the order sent
        (an abort cannot overtake its add). Where the process is gone, the reader sees it
        and fails its requests."""
        if not isinstance(command, (AddRequest, AbortRequest)):
            self._settings[type(command)] = command
        self._commands.put(command)

    @property
    def settings(self) -> list[Command]:
        """The latest command of each kind that sets the engine up rather than acting on one
        request (a governor's limits, ...): what a fresh engine process must be told again."""
        return list(self._settings.values())

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        if not self._step_listeners:
            self._commands.put(_SEND_STEP_STATS)
        self._step_listeners.append(listener)

    @property
    def step_listeners(self) -> list[Callable[[StepStats], None]]:
        return list(self._step_listeners)

    def is_alive(self) -> bool:
        return self._process.is_alive() and self._reader.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        self._commands.put(_STOP)
        self._commands.close(timeout_s)
        self._process.join(max(deadline - time.monotonic(), 0.0))
        if self._process.is_alive():
            log.warning("the engine process did not stop within %.0f s: killing it", timeout_s)
            self._process.kill()
            self._process.join(5.0)
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout_s)

    def _read(self) -> None:
        decoder = WireDecoder()
        reason: str | None = None
        try:
            while True:
                try:
                    msg = self._results.recv()
                except (EOFError, OSError):
                    self._process.join(5.0)
                    reason = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
                    break
                if isinstance(msg, Published):
                    msg.outputs = [decoder.decode(o) for o in msg.outputs]
                    self._on_published(msg)
                    for stats in msg.step_stats:
                        for listener in self._step_listeners:
                            try:
                                listener(stats)
                            except Exception:
                                log.exception("step listener failed")
                    continue
                reason = msg[1]  # ("exit", why or None)
                break
        except BaseException as e:  # a bug on this side: end the requests rather than hang them
            log.exception("engine reader died")
            reason = f"{type(e).__name__}: {e}"
        self._on_exit(reason)


def engine_process_default(device: str, tensor_parallel_size: int = 1) -> bool:
    """Where ondo runs the engine when not told: its own process on a GPU (the host work of
    a step there must not wait on the server's), a thread on the CPU (one less process
    where the cores are few and the model does all the work); its own process wherever it
    is tensor-parallel (a worker's death then ends the engine process, which is restarted)."""
    if device.startswith("cuda") or tensor_parallel_size > 1:
        return True
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()
