"""Start-up's Triton kernels compiled ahead, on threads (`ONDO_TRITON_PRECOMPILE=1`, off
by default: on an H200 it did not make start-up shorter, docs/benchmarks.md).

A cold start compiles each Triton kernel variant where it is first launched: the KV write
and the prefill kernel in the profiling pass, the sampler's kernel (for the model's logits
and for float32 ones) right after, the prefill kernel again and the decode kernel (as a
mixed step's graph launches them) at the first graph's warm-up, the decode kernel with and
without splits and the reduction at the decode graphs'. One after another on the engine's
thread, each a Python front end plus LLVM and ptxas. Here the kernels' own wrappers run on
tiny inputs shaped like the engine's (the same dtypes, head counts, block table widths,
sequence counts and vocabulary: the same cache keys) under `compile_only`, each variant on
a thread of its own, while the weights load; the engine waits for them before its
profiling pass (a launch that found its variant still compiling on a thread would compile
it a second time, and nothing may launch on another thread while a graph captures).
A variant that does not match what the engine later launches costs its compile and saves
nothing; a failure here is logged and leaves the kernel to compile at its launch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from ondo.kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)


def precompile_enabled() -> bool:
    return os.environ.get("ONDO_TRITON_PRECOMPILE", "0") == "1"


@dataclass(frozen=True)
class EngineKernelShapes:
    """What decides the variants an engine's start-up compiles."""

    num_q_heads: int  # this rank's
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    decode_graph_sizes: tuple[int, ...]  # empty: no decode graphs
    mixed_graphs: bool  # steps with a prefill replay graphs
    fused_sampling: bool


class Precompile:
    """Compiles running on threads; `wait()` ends them (the engine calls it before its
    profiling pass)."""

    def __init__(self, pool: ThreadPoolExecutor | None, futures: list[Future]) -> None:
        self._pool = pool
        self._futures = futures
        self.waited_s = 0.0
        self.failures = 0

    def wait(self) -> None:
        if self._pool is None:
            return
        t0 = time.perf_counter()
        wait(self._futures)
        self.waited_s = time.perf_counter() - t0
        for f in self._futures:
            if f.exception() is not None:
                self.failures += 1
                log.warning("a kernel was not compiled ahead (it compiles at its first launch): %r",
                            f.exception())
        self._pool.shutdown()
        self._pool = None
        log.info("Triton kernels compiled ahead: %d variants, %d failed; the engine waited %.2f s for them",
                 len(self._futures), self.failures, self.waited_s)

    @property
    def num_variants(self) -> int:
        return len(self._futures)


def start_precompile(shapes: EngineKernelShapes, max_workers: int | None = None) -> Precompile:
    """Submit every variant to a pool of threads and return at once. Inputs are made here,
    on the caller's thread; the threads only run the wrappers under `compile_only`."""
    if shapes.device.type != "cuda":
        return Precompile(None, [])
    tasks = _tasks(shapes)
    # "cuda" names the current device of this thread; a new thread's is the first one.
    index = shapes.device.index if shapes.device.index is not None else torch.cuda.current_device()
    _touch_device_caches(index)
    pool = ThreadPoolExecutor(max_workers or min(len(tasks), os.cpu_count() or 1),
                              thread_name_prefix="ondo-triton-precompile")
    return Precompile(pool, [pool.submit(_compiled, task, index) for task in tasks])


def _compiled(task: Callable[[], object], cuda_index: int | None = None) -> None:
    from ondo.kernels.launch import compile_only

    if cuda_index is not None:
        torch.cuda.set_device(cuda_index)
    with torch.inference_mode(), compile_only():
        task()


def _touch_device_caches(index: int) -> None:
    """Each kernel's per-device cache made once here, not by two threads at once (the
    second would drop what the first compiled into its own)."""
    from ondo.kernels import triton_attention as ta
    from ondo.kernels import triton_kv_write as kw
    from ondo.kernels import triton_sampling as ts

    for kernel in (ta._decode_split_kernel, ta._decode_reduce_kernel, ta._prefill_kernel, ta._decode_persistent_kernel,
                   kw._write_kv_cache_kernel, kw._write_kv_tokens_kernel, ts._gumbel_max_chunks_kernel):
        try:
            kernel.device_caches[index]
        except Exception:  # another Triton's layout: the threads make their own
            continue


def _tasks(s: EngineKernelShapes) -> list[Callable[[], object]]:
    """One callable per kernel variant start-up launches, as the engine launches it."""
    from ondo.kernels.attention import write_and_attend
    from ondo.kernels.triton_kv_write import KV_WRITE_TOKEN_PROGRAMS_FROM, write_kv_cache_triton

    dev, bs = s.device, s.block_size
    max_blocks = math.ceil(s.max_model_len / bs)
    scale = s.head_dim**-0.5

    def step(num_tokens: int) -> tuple[torch.Tensor, ...]:
        """q, and k and v as the model hands them over (k its own tensor, v a view of the
        fused projection), and a two-block cache."""
        q = torch.zeros(num_tokens, s.num_q_heads, s.head_dim, dtype=s.dtype, device=dev)
        qkv = torch.zeros(num_tokens, (s.num_q_heads + 2 * s.num_kv_heads) * s.head_dim, dtype=s.dtype,
                          device=dev)
        k = torch.zeros(num_tokens, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=dev)
        v = qkv[:, (s.num_q_heads + s.num_kv_heads) * s.head_dim:].view(num_tokens, s.num_kv_heads, s.head_dim)
        cache = torch.zeros(2, 2, bs, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=dev)
        return q, k, v, cache[0], cache[1]

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=dev)

    tasks: list[Callable[[], object]] = []

    # The profiling pass: sequences of at most max_model_len tokens filling the token budget.
    num_seqs = math.ceil(s.max_num_batched_tokens / s.max_model_len)
    width = math.ceil(min(s.max_num_batched_tokens, s.max_model_len) / bs)
    q, k, v, kc, vc = step(2 * num_seqs)
    profile_meta = AttentionMetadata(
        slot_mapping=torch.full((2 * num_seqs,), -1, dtype=torch.int64, device=dev),
        block_tables=torch.zeros(num_seqs, width, dtype=torch.int32, device=dev),
        context_lens=int32([2] * num_seqs), query_start_loc=int32(list(range(0, 2 * num_seqs + 1, 2))),
        max_query_len=2, max_context_len=2, block_size=bs,
        query_lens_cpu=[2] * num_seqs, context_lens_cpu=[2] * num_seqs)
    tasks.append(lambda a=(q, k, v, kc, vc, profile_meta): write_and_attend(*a, scale))

    if s.mixed_graphs:  # a step with a prefill, as its graphs are captured
        q, k, v, kc, vc = step(16)
        mixed_meta = AttentionMetadata(
            slot_mapping=torch.full((16,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(s.max_num_seqs, max_blocks, dtype=torch.int32, device=dev),
            context_lens=int32([0] * s.max_num_seqs), query_start_loc=int32([0] * (s.max_num_seqs + 1)),
            max_query_len=16, max_context_len=s.max_model_len, block_size=bs,
            split_decode_rows=int32([0]))
        tasks.append(lambda a=(q, k, v, kc, vc, mixed_meta): write_and_attend(*a, scale))

    # Decode graphs: their smallest and largest batch (with and without splits).
    for size in sorted({s.decode_graph_sizes[0], s.decode_graph_sizes[-1]} if s.decode_graph_sizes else ()):
        q, k, v, kc, vc = step(size)
        decode_meta = AttentionMetadata(
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(size, max_blocks, dtype=torch.int32, device=dev),
            context_lens=int32([1] * size), query_start_loc=int32(list(range(size + 1))),
            max_query_len=1, max_context_len=s.max_model_len, block_size=bs,
            decode_split_tokens=int32([s.max_model_len]))
        tasks.append(lambda a=(q, k, v, kc, vc, decode_meta): write_and_attend(*a, scale))

    # The KV write of steps of KV_WRITE_TOKEN_PROGRAMS_FROM tokens or more (the profiling
    # pass's full step, the largest prefill graphs'): one program per token.
    if s.max_num_batched_tokens >= KV_WRITE_TOKEN_PROGRAMS_FROM:
        q, k, v, kc, vc = step(KV_WRITE_TOKEN_PROGRAMS_FROM)
        slots = torch.full((KV_WRITE_TOKEN_PROGRAMS_FROM,), -1, dtype=torch.int64, device=dev)
        tasks.append(lambda a=(k, v, kc, vc, slots): write_kv_cache_triton(*a))

    if s.fused_sampling:  # the model's logits, and float32 ones (top-k, top-p, min-p)
        from ondo.kernels.triton_sampling import gumbel_max_sample

        rows = (torch.ones(1, dtype=torch.float32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev),
                torch.zeros(1, dtype=torch.int64, device=dev))
        for dtype in dict.fromkeys((s.dtype, torch.float32)):
            logits = torch.zeros(1, s.vocab_size, dtype=dtype, device=dev)
            tasks.append(lambda x=logits: gumbel_max_sample(x, *rows))
    return tasks
