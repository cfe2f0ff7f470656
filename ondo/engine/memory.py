"""Sizing the KV cache: bytes per block, and the start-up memory plan that is logged."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    weights_bytes: int
    activations_peak_bytes: int  # peak during the profiling pass, beyond the weights
    kv_budget_bytes: int
    kv_bytes_per_block: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    block_size: int
    source: str  # "profiled", "kv_cache_memory", "num_kv_blocks"

    @property
    def max_concurrent_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"KV cache on {self.device} ({self.source}): weights {self.weights_bytes / gib:.2f} GiB, "
            f"activations peak {self.activations_peak_bytes / gib:.2f} GiB, "
            f"KV {self.kv_bytes_per_block / 1024:.1f} KiB per block of {self.block_size} tokens, "
            f"{self.num_gpu_blocks} blocks = {self.max_concurrent_tokens} tokens at once "
            f"({self.num_gpu_blocks * self.kv_bytes_per_block / gib:.2f} GiB), "
            f"{self.num_cpu_blocks} CPU swap blocks"
        )
