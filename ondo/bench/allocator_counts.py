"""What PyTorch's CUDA caching allocators did over a measured run. A device allocation that
finds no cached block calls cudaMalloc; one that fails there frees the cache and retries
(`num_alloc_retries`: cudaFree, a device-wide synchronization); a pinned host block that
finds none cached is created by cudaHostAlloc. In asynchronous steps any of these makes the
host wait in the middle of a launch, where it should be a step ahead of the GPU.
"""

from __future__ import annotations

import torch

DEVICE_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")
HOST_COUNTERS = ("num_host_alloc", "num_host_free", "host_alloc_time.total", "host_free_time.total")


def allocator_counts() -> dict[str, float] | None:
    """The allocators' cumulative counters now (host times in µs); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.memory_stats()
    counts: dict[str, float] = {k: device.get(k, 0) for k in DEVICE_COUNTERS}
    host_stats = getattr(torch.cuda, "host_memory_stats", None)  # newer PyTorch only
    if host_stats is not None:
        host = host_stats()
        counts.update({k: host.get(k, 0) for k in HOST_COUNTERS})
    return counts


def counts_between(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Each counter's increase from `before` to `after`; None if either is missing."""
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0) for k, v in after.items()}
