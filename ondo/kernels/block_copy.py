"""Whole-block copies of the KV cache: swap between GPU and CPU, and copy-on-write.

A cache here is a sequence of tensors that all index blocks on dim 0, e.g. every
layer's ``k_cache`` and ``v_cache`` ([num_blocks, block_size, Hkv, D]) in one list.
A list, rather than one [num_layers, 2, num_blocks, ...] tensor, is what the
attention contract already hands each layer, and it lets a block id mean the same
slice in every tensor without reshaping. ``gpu_cache`` and ``cpu_pool`` must list
their tensors in the same order with the same per-block shape; only the number of
blocks may differ.

``mapping`` is a list of (source block, destination block) pairs, as for
``copy_blocks_ref``. On CUDA, swaps run on a dedicated stream so they overlap the
model's compute; they return a ``SwapHandle`` to order later work after them. The
CPU pool should be pinned (``pin_memory=True``); pageable memory makes the copy
synchronous for the host. On CPU everything falls back to the reference, at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ondo.kernels.reference import copy_blocks_ref

BlockMapping = list[tuple[int, int]]


@dataclass
class SwapHandle:
    """A swap in flight. ``event`` is None when the copy already finished (CPU path)."""

    event: torch.cuda.Event | None

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copy; the host
        does not block. Call before compute reads swapped-in blocks or reuses
        swapped-out ones."""
        if self.event is not None:
            (stream or torch.cuda.current_stream(self.event.device)).wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the copy is done (before it reads the CPU pool)."""
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.query()


_swap_streams: dict[int, torch.cuda.Stream] = {}


def _swap_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _swap_streams:
        _swap_streams[index] = torch.cuda.Stream(device=index)
    return _swap_streams[index]


def _contiguous_runs(mapping: BlockMapping) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs: consecutive blocks move in one memcpy."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in sorted(mapping):
        if runs and src == runs[-1][0] + runs[-1][2] and dst == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, dst, 1))
    return runs


def _check_pair(src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]) -> None:
    assert len(src) == len(dst), "caches must list the same number of tensors"
    for s, d in zip(src, dst, strict=True):
        assert s.shape[1:] == d.shape[1:] and s.dtype == d.dtype, "block shapes differ"


def _swap(
    src_cache: Sequence[torch.Tensor], dst_cache: Sequence[torch.Tensor], mapping: BlockMapping
) -> SwapHandle:
    _check_pair(src_cache, dst_cache)
    gpu_tensor = src_cache[0] if src_cache[0].is_cuda else dst_cache[0]
    if not mapping or not gpu_tensor.is_cuda:
        for src, dst in zip(src_cache, dst_cache, strict=True):
            copy_blocks_ref(src, dst, mapping)
        return SwapHandle(event=None)

    stream = _swap_stream(gpu_tensor.device)
    # Blocks being swapped out may still be written, and blocks being swapped in may
    # still be read, by work already queued on the compute stream.
    stream.wait_stream(torch.cuda.current_stream(gpu_tensor.device))
    runs = _contiguous_runs(mapping)
    with torch.cuda.stream(stream):
        for src, dst in zip(src_cache, dst_cache, strict=True):
            for src_start, dst_start, length in runs:
                dst[dst_start : dst_start + length].copy_(
                    src[src_start : src_start + length], non_blocking=True
                )
        event = torch.cuda.Event()
        event.record(stream)
    return SwapHandle(event=event)


def swap_out(
    gpu_cache: Sequence[torch.Tensor], cpu_pool: Sequence[torch.Tensor], mapping: BlockMapping
) -> SwapHandle:
    """Copy GPU blocks to CPU pool blocks: ``mapping`` is [(gpu_block, cpu_block)]."""
    return _swap(gpu_cache, cpu_pool, mapping)


def swap_in(
    cpu_pool: Sequence[torch.Tensor], gpu_cache: Sequence[torch.Tensor], mapping: BlockMapping
) -> SwapHandle:
    """Copy CPU pool blocks back to GPU blocks: ``mapping`` is [(cpu_block, gpu_block)]."""
    return _swap(cpu_pool, gpu_cache, mapping)


def copy_blocks(cache: Sequence[torch.Tensor], mapping: BlockMapping) -> None:
    """Copy-on-write within one cache: block ``src`` -> block ``dst`` in every tensor.

    Runs on the current stream, so the next kernel sees the copies. Sources are read
    before any destination is written, so a block may be both (as in the reference).
    """
    if not mapping:
        return
    device = cache[0].device
    if not cache[0].is_cuda:
        for layer in cache:
            copy_blocks_ref(layer, layer, mapping)
        return
    src_idx = torch.tensor([s for s, _ in mapping], dtype=torch.long).to(device, non_blocking=True)
    dst_idx = torch.tensor([d for _, d in mapping], dtype=torch.long).to(device, non_blocking=True)
    for layer in cache:
        layer.index_copy_(0, dst_idx, layer.index_select(0, src_idx))
