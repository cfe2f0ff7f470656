"""Pure-PyTorch paged attention: the reference every Triton kernel is checked against.

It is also the CPU path of the engine. K/V are read through block tables, so a
sequence's blocks may lie anywhere in the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ondo.kernels.metadata import AttentionMetadata


def write_kv_cache_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; a negative slot means "do not store"
) -> None:
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_flat = k_cache.view(num_slots, *k_cache.shape[2:])
    v_flat = v_cache.view(num_slots, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    if bool(keep.all()):
        k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
        v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))
    else:
        k_flat.index_copy_(0, slot_mapping[keep], key[keep].to(k_cache.dtype))
        v_flat.index_copy_(0, slot_mapping[keep], value[keep].to(v_cache.dtype))


def gather_kv_ref(
    cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_table: torch.Tensor,  # [max_blocks]
    context_len: int,
) -> torch.Tensor:
    """One sequence's K or V, contiguous: [context_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:context_len]


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's cached context."""
    num_heads = query.shape[1]
    num_kv_heads = k_cache.shape[2]
    query_lens = meta.query_lens_cpu
    context_lens = meta.context_lens_cpu
    if query_lens is None:
        qsl = meta.query_start_loc.tolist()
        query_lens = [b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)]
    if context_lens is None:
        context_lens = meta.context_lens.tolist()
    out = torch.empty_like(query)
    gqa = num_heads != num_kv_heads

    decode_rows = [i for i, q in enumerate(query_lens) if q == 1]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)

    if decode_rows:
        # All single-token queries in one padded SDPA call.
        rows = torch.tensor(decode_rows, dtype=torch.long, device=query.device)
        tok = torch.tensor([starts[i] for i in decode_rows], dtype=torch.long, device=query.device)
        max_ctx = max(context_lens[i] for i in decode_rows)
        block_size = k_cache.shape[1]
        max_blocks = (max_ctx + block_size - 1) // block_size
        tables = meta.block_tables.index_select(0, rows)[:, :max_blocks].long()
        k = k_cache[tables].flatten(1, 2)[:, :max_ctx]  # [n, max_ctx, Hkv, D]
        v = v_cache[tables].flatten(1, 2)[:, :max_ctx]
        ctx = torch.tensor([context_lens[i] for i in decode_rows], device=query.device)
        mask = torch.arange(max_ctx, device=query.device)[None, :] < ctx[:, None]
        q = query.index_select(0, tok).unsqueeze(2)  # [n, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            q,
            k.transpose(1, 2).to(query.dtype),
            v.transpose(1, 2).to(query.dtype),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=gqa,
        )
        out.index_copy_(0, tok, o.squeeze(2))

    for i, q_len in enumerate(query_lens):
        if q_len == 1 or q_len == 0:
            continue
        ctx_len = context_lens[i]
        k = gather_kv_ref(k_cache, meta.block_tables[i], ctx_len).to(query.dtype)
        v = gather_kv_ref(v_cache, meta.block_tables[i], ctx_len).to(query.dtype)
        q = query[starts[i] : starts[i] + q_len]
        # Query row r sits at position ctx_len - q_len + r and sees keys up to it.
        pos_q = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
        mask = torch.arange(ctx_len, device=query.device)[None, :] <= pos_q[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask[None, None],
            scale=scale,
            enable_gqa=gqa,
        )
        out[starts[i] : starts[i] + q_len] = o.squeeze(0).transpose(0, 1)
    return out


def copy_blocks_ref(
    src: torch.Tensor,  # [num_blocks_src, ...]
    dst: torch.Tensor,  # [num_blocks_dst, ...]
    mapping: list[tuple[int, int]],
) -> None:
    """Copy whole blocks src[a] -> dst[b]; the swap path between GPU cache and CPU pool."""
    if not mapping:
        return
    src_idx = torch.tensor([a for a, _ in mapping], dtype=torch.long, device=src.device)
    dst_idx = torch.tensor([b for _, b in mapping], dtype=torch.long, device=dst.device)
    dst.index_copy_(0, dst_idx, src.index_select(0, src_idx).to(dst.device))
