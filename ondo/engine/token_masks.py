"""Each step's allowed-token masks for the rows that have a grammar, filled off the engine's
thread and handed to the device without waiting for it.

`MaskFiller.submit` starts a step's fill as soon as its matchers' states are known: the
library fills every row at once on its own threads (the interpreter lock released) into a
pinned host buffer, driven from one worker thread so that the engine's thread goes on
(preparing and launching the next forward pass, making the previous step's outputs)
meanwhile. `MaskFiller.result` is called where the step is sampled: it waits for the fill
if it is not done, queues a non-blocking copy to a device buffer and returns the
`TokenMask` the sampler applies in one kernel. No mask buffer is allocated per step: two pinned
buffers take turns (a buffer is written again only once its last copy has completed) and
one device buffer is reused (copies and the kernels reading it are ordered on the stream).

The fill threads: half the cores the process may run on, at most 8 (the engine's own
thread, the server and the device driver need the rest), or `ONDO_GRAMMAR_THREADS`.
Each thread gets rows of one grammar shard (see `CompiledGrammar`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ondo.engine.grammar import SequenceGrammar
from ondo.engine.sampler import TokenMask, to_device

ENV_THREADS = "ONDO_GRAMMAR_THREADS"
MAX_FILL_THREADS = 8
PARALLEL_CATCH_UP_ROWS = 32  # fewer rows catch up on the engine's thread


def fill_threads_for(num_cpus: int) -> int:
    """Fill threads on a host whose process may run on `num_cpus` cores."""
    return max(1, min(MAX_FILL_THREADS, num_cpus // 2))


def default_fill_threads(environ: Mapping[str, str] = os.environ) -> int:
    value = environ.get(ENV_THREADS)
    if value is None:
        return fill_threads_for(len(os.sched_getaffinity(0)))
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{ENV_THREADS}={value!r}: give the number of mask fill threads, "
                         "a whole number of at least 1")
    return threads


@dataclass
class MaskTiming:
    """Where the masks' time went, summed over steps (seconds)."""

    num_steps: int = 0
    num_rows: int = 0
    sync_s: float = 0.0  # engine thread: matchers catching up with their sequences' tokens
    fill_s: float = 0.0  # worker thread: the library filling the rows
    wait_s: float = 0.0  # engine thread held up by fills (waiting, or filling inline): not hidden
    copy_s: float = 0.0  # engine thread: queuing the copy to the device

    @property
    def hidden_s(self) -> float:
        """Fill time spent while the engine's thread did other work."""
        return max(self.fill_s - self.wait_s, 0.0)


@dataclass
class PendingMask:
    """A step's masks being filled: `MaskFiller.result` turns it into a `TokenMask`."""

    future: Future[None]
    slot: int  # which pinned buffer
    num_rows: int
    rows: torch.Tensor | None  # the logits rows of the bitmask rows (None: all, in order)


def _eos_only_word(eos_token_id: int) -> int:
    """The int32 word (as a Python int) whose one set bit is the EOS token's."""
    bit = 1 << (eos_token_id % 32)
    return bit - (1 << 32) if bit >= 1 << 31 else bit


class MaskFiller:
    def __init__(self, vocab_size: int, device: torch.device, eos_token_id: int,
                 max_rows: int = 256, num_threads: int | None = None) -> None:
        import llguidance

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.device = device
        self.eos_token_id = eos_token_id
        self.num_threads = num_threads or default_fill_threads()
        self._executor = llguidance.LLExecutor(self.num_threads)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ondo-masks")
        self._cuda = device.type == "cuda"
        self._host: list[torch.Tensor] = []
        self._device_buf: torch.Tensor | None = None
        # Recorded after each buffer's copy to the device (waiting on one never recorded
        # returns at once).
        self._copied = [torch.cuda.Event() for _ in range(2)] if self._cuda else []
        self._slot = 1
        self._reserve(max_rows)
        self.timing = MaskTiming()

    def _reserve(self, rows: int) -> None:
        """Buffers for `rows` rows: at start, and again only if a step has more."""
        if self._host and self._host[0].shape[0] >= rows:
            return
        for event in self._copied:
            event.synchronize()
        self._host = [torch.empty((rows, self.words), dtype=torch.int32, pin_memory=self._cuda)
                      for _ in range(2)]
        if self._cuda:
            self._device_buf = torch.empty((rows, self.words), dtype=torch.int32, device=self.device)

    def catch_up(self, items: list[tuple[SequenceGrammar, list[int], int, int | None]]) -> None:
        """`SequenceGrammar.sync(token_ids, start, pending)` for each item; the rows that take
        one token (nearly all, each step) consume it in one call of the library's, on its
        threads, where there are enough of them."""
        t0 = time.perf_counter()
        one: list[tuple[SequenceGrammar, int]] = []
        for g, token_ids, start, pending in items:
            token = g.next_token(token_ids, start, pending)
            if token is None:
                g.sync(token_ids, start, pending)
            else:
                one.append((g, token))
        if one:
            if self.num_threads > 1 and len(one) >= PARALLEL_CATCH_UP_ROWS:
                results = self._executor.consume_token_par([(g.matcher, token) for g, token in one])
            else:  # a token takes microseconds: not worth waking the library's threads
                results = [g.matcher.consume_token(token) for g, token in one]
            for (g, _), ok in zip(one, results):
                g.consumed(ok)
        self.timing.sync_s += time.perf_counter() - t0

    def submit(self, grammars: list[SequenceGrammar], rows: list[int] | None,
               on_thread: bool = True) -> PendingMask:
        """Start filling the masks of `grammars` (bitmask row i: `grammars[i]`, for logits row
        `rows[i]`; rows None: logits row i). The matchers must not be touched until
        `result` (their `is_complete` and `error` may be read). on_thread=False: fill now."""
        self._reserve(len(grammars))
        self._slot ^= 1
        slot = self._slot
        if self._cuda:  # this buffer's last copy to the device (long done, as a rule)
            self._copied[slot].synchronize()
        host = self._host[slot]
        # A broken matcher may only end its sequence; the others by shard, so that each of
        # the library's threads takes rows of one shard (it splits the list in runs).
        work = sorted(((g.matcher, i) for i, g in enumerate(grammars) if g.error is None),
                      key=lambda item: grammars[item[1]].shard)
        broken = [i for i, g in enumerate(grammars) if g.error is not None]
        n = len(grammars)

        started = threading.Event()

        def fill() -> None:
            started.set()
            t0 = time.perf_counter()
            if work:
                self._executor.unsafe_compute_mask_ptr(work, host.data_ptr(), self.words * 4, n)
            for i in broken:
                host[i].zero_()
                host[i, self.eos_token_id // 32] = _eos_only_word(self.eos_token_id)
            self.timing.fill_s += time.perf_counter() - t0

        if on_thread:
            future = self._worker.submit(fill)
            # The worker needs the interpreter lock to reach the library, which then lets go
            # of it; the engine's thread, busy with Python, would hold it for up to the
            # switch interval (5 ms) and the fill would start only when the engine waits
            # for it. So hand the lock over until the fill has begun.
            started.wait()
        else:  # the engine's thread fills: all of it is waited for
            future = Future()
            t0 = time.perf_counter()
            fill()
            self.timing.wait_s += time.perf_counter() - t0
            future.set_result(None)
        index = None if rows is None else to_device(rows, torch.int64, self.device)
        return PendingMask(future, slot, n, index)

    def result(self, pending: PendingMask) -> TokenMask:
        """The filled masks on the device (waiting for the fill if it is still running)."""
        t0 = time.perf_counter()
        pending.future.result()
        t1 = time.perf_counter()
        host = self._host[pending.slot][: pending.num_rows]
        if self._cuda:
            bitmask = self._device_buf[: pending.num_rows]
            bitmask.copy_(host, non_blocking=True)
            self._copied[pending.slot].record()
        else:
            bitmask = host  # applied at once, before the buffer's next turn
        timing = self.timing
        timing.wait_s += t1 - t0
        timing.copy_s += time.perf_counter() - t1
        timing.num_steps += 1
        timing.num_rows += pending.num_rows
        return TokenMask(bitmask, pending.rows)

    def fill(self, grammars: list[SequenceGrammar]) -> torch.Tensor:
        """[len(grammars), words] int32 bitmask on the device, filled now (for benchmarks)."""
        return self.result(self.submit(grammars, None, on_thread=False)).bitmask

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
