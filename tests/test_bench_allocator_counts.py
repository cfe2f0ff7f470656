"""ondo.bench.allocator_counts: counter increases over a run, nothing without CUDA."""

from __future__ import annotations

import torch

from ondo.bench.allocator_counts import DEVICE_COUNTERS, allocator_counts, counts_between


def test_increases_are_per_counter_and_missing_counts_give_none():
    before = {"num_alloc_retries": 2, "num_device_alloc": 10, "num_host_alloc": 4}
    after = {"num_alloc_retries": 5, "num_device_alloc": 10, "num_host_alloc": 7, "num_device_free": 1}
    assert counts_between(before, after) == {"num_alloc_retries": 3, "num_device_alloc": 0,
                                             "num_host_alloc": 3, "num_device_free": 1}
    assert counts_between(None, after) is None and counts_between(before, None) is None


def test_counts_exist_only_where_cuda_does():
    counts = allocator_counts()
    if not torch.cuda.is_available():
        assert counts is None
    else:
        assert set(DEVICE_COUNTERS) <= set(counts)
        torch.empty(1 << 20, device="cuda")  # may come from the cache: the counts never fall
        assert all(v >= 0 for v in counts_between(counts, allocator_counts()).values())
