"""Time spent in the forward pass's collectives, for benchmarks: off unless a timer is set on
the group (`TensorParallelGroup.timer`), so a serving engine pays nothing for it.

On CUDA each collective is bracketed by two events on the current stream, so a span is
what the stream waited: the transfer plus any wait for the slowest rank to arrive. Spans
inside a CUDA graph capture are skipped (a graph's replays cannot be timed from inside),
so only eagerly run steps are timed: run a timed leg with `enforce_eager`. On the CPU a
span is wall time around the (blocking) gloo call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class CollectiveTimer:
    _cuda: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    _host_s: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def span(self, kind: str, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self._host_s[kind] = self._host_s.get(kind, 0.0) + time.perf_counter() - t0
            self._counts[kind] = self._counts.get(kind, 0) + 1
            return
        if torch.cuda.is_current_stream_capturing():
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._cuda.append((kind, start, end))
        self._counts[kind] = self._counts.get(kind, 0) + 1

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        """(seconds, count) by kind since the last take, then starts again; waits for the
        device where events are still pending."""
        seconds = dict(self._host_s)
        for kind, start, end in self._cuda:
            end.synchronize()
            seconds[kind] = seconds.get(kind, 0.0) + start.elapsed_time(end) / 1e3
        counts = dict(self._counts)
        self._cuda.clear()
        self._host_s.clear()
        self._counts.clear()
        return seconds, counts
