"""Random paged batches for kernel tests and benchmarks (not used by the engine)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ondo.kernels.metadata import AttentionMetadata


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D]: the new tokens' K, not yet in the cache
    value: torch.Tensor  # [T, Hkv, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]; prefixes already cached
    v_cache: torch.Tensor
    meta: AttentionMetadata

    def cache_new_kv(self) -> None:
        """Store the new tokens' K/V into their slots, as the engine's KV write does
        before attention (by plain indexing, for benchmarks)."""
        heads, dim = self.key.shape[1:]
        self.k_cache.view(-1, heads, dim)[self.meta.slot_mapping] = self.key
        self.v_cache.view(-1, heads, dim)[self.meta.slot_mapping] = self.value


def make_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """A step's flat batch whose sequences own shuffled, non-contiguous cache blocks.

    Sequence ``i`` has ``context_lens[i] - query_lens[i]`` cached tokens and brings
    ``query_lens[i]`` new ones. Every cache slot (unused ones too) holds random data,
    so a kernel that reads past a context's end or through the wrong block is caught.
    Block 0 is never handed out: it is what padded table entries point to.
    """
    assert len(query_lens) == len(context_lens)
    assert all(0 <= q <= c for q, c in zip(query_lens, context_lens, strict=True))
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in context_lens]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max([*blocks_per_seq, 1])
    block_tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    for i, (n, q_len, ctx_len) in enumerate(
        zip(blocks_per_seq, query_lens, context_lens, strict=True)
    ):
        blocks, order = order[:n], order[n:]
        block_tables[i, :n] = torch.tensor(blocks, dtype=torch.int32)
        for pos in range(ctx_len - q_len, ctx_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)

    num_tokens = sum(query_lens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    query_start_loc = [0]
    for q_len in query_lens:
        query_start_loc.append(query_start_loc[-1] + q_len)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        max_query_len=max([*query_lens, 0]),
        max_context_len=max([*context_lens, 0]),
        block_size=block_size,
        query_lens_cpu=list(query_lens),
        context_lens_cpu=list(context_lens),
    )
    return PagedBatch(
        query=randn(num_tokens, num_q_heads, head_dim),
        key=randn(num_tokens, num_kv_heads, head_dim),
        value=randn(num_tokens, num_kv_heads, head_dim),
        k_cache=randn(*cache_shape),
        v_cache=randn(*cache_shape),
        meta=meta,
    )
