"""Kernel timing without launch costs: a callable captured `calls` times in one CUDA graph,
the graph replayed and timed with CUDA events (as the engine's graphs run kernels)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def graph_time_us(fn: Callable[[], object], cuda: bool, calls: int = 20, repeat: int = 15) -> float:
    """Median microseconds per call: replays of a CUDA graph of `calls` calls on CUDA (the
    callable runs three times first, on a side stream, to compile what it launches); the
    wall clock of single calls elsewhere (where the figure means little)."""
    if not cuda:
        fn()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)
