"""Test helper: a KV cache with shuffled blocks and hand-built AttentionMetadata for flat batches."""

from __future__ import annotations

import random

import torch

from ondo.kernels.metadata import AttentionMetadata
from ondo.model.config import ModelConfig


class PagedCache:
    """Per-layer K/V caches plus each sequence's (deliberately non-contiguous) block list."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, seed: int = 0,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.block_size = block_size
        self.device = device
        self.kv_caches = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.num_hidden_layers)
        ]
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_lists: list[list[int]] = []
        self.num_cached: list[int] = []

    def add_sequence(self, max_tokens: int) -> None:
        n = -(-max_tokens // self.block_size)
        self.block_lists.append([self.free_blocks.pop() for _ in range(n)])
        self.num_cached.append(0)

    def step(self, new_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata and positions for `new_lens[i]` new tokens of every sequence i."""
        slots, positions, context_lens = [], [], []
        for blocks, cached, new in zip(self.block_lists, self.num_cached, new_lens, strict=True):
            for pos in range(cached, cached + new):
                slots.append(
                    blocks[pos // self.block_size] * self.block_size + pos % self.block_size
                )
                positions.append(pos)
            context_lens.append(cached + new)
        width = max(len(b) for b in self.block_lists)
        tables = [b + [0] * (width - len(b)) for b in self.block_lists]
        starts = [0]
        for n in new_lens:
            starts.append(starts[-1] + n)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(new_lens),
            max_context_len=max(context_lens),
            block_size=self.block_size,
            query_lens_cpu=list(new_lens),
            context_lens_cpu=context_lens,
        )
        self.num_cached = context_lens
        return meta, torch.tensor(positions, dtype=torch.int64, device=dev)
