"""Paged attention in Triton: a flash-decoding kernel and a tiled prefill/extend kernel.

Both read K/V only through the block table, so a sequence's blocks may lie anywhere
in the cache. Both are GQA-aware: a program serves every query head that shares one
KV head, so each K/V tile is loaded once for the whole head group and the head group
becomes the M dimension of ``tl.dot``. Softmax runs online (flash attention) in fp32
in the log2 domain (``exp2``; in the prefill kernel ``scale * log2(e)`` goes into the
one multiply-add that also subtracts the running max).

Decode (every sequence brings one new token) is memory-bound: the work is reading
the context's K/V once. With few sequences there are too few (sequence, kv head)
programs to keep 132 SMs busy, so the context is cut into splits; each split writes
a partial (max, sum, normalised output), and a small kernel combines the splits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ondo.kernels.attention import (
    mixed_decode_beside,
    mixed_decode_overlap,
    prefill_decode_tile,
    prefill_longest_first,
    prefill_new_kv,
    splits_mixed_step,
)
from ondo.kernels.decode_splits import MAX_DECODE_SPLITS, decode_longest_first, decode_splits
from ondo.kernels.launch import device_sm_count, launch
from ondo.kernels.metadata import AttentionMetadata
from ondo.kernels.prefill_tiles import PrefillTiles, configured_prefill_tiles

LOG2E = 1.4426950408889634
# A finite "minus infinity" for running maxima: exp2(-inf - (-inf)) would be NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _load_kv_tile(
    cache_ptr,
    block_table_row_ptr,
    kv_head,
    n,  # [BLOCK_N] token positions in the sequence
    n_mask,
    d,
    d_mask,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every token of ``n`` is in the context
):
    """[BLOCK_N, BLOCK_D] tile of K or V for tokens ``n``, gathered through the table.

    BLOCK_N tokens may span several cache blocks (or part of one); each token looks up
    its own block id, so the tile size is independent of the cache's block size.
    """
    if MASKED:
        block_ids = tl.load(block_table_row_ptr + n // BLOCK_SIZE, mask=n_mask, other=0)
    else:
        block_ids = tl.load(block_table_row_ptr + n // BLOCK_SIZE)
    offsets = (
        block_ids.to(tl.int64)[:, None] * stride_cache_block
        + (n % BLOCK_SIZE)[:, None] * stride_cache_slot
        + kv_head * stride_cache_h
        + d[None, :]
    )
    if MASKED:
        return tl.load(cache_ptr + offsets, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    return tl.load(cache_ptr + offsets, mask=d_mask[None, :], other=0.0)


@triton.jit
def _decode_walk(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    scale_log2e,
    stride_q_t,
    stride_q_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    stride_bt,
    seq,
    q_start,
    kv_head,
    lo,  # the context tokens [lo, hi) this walk reads
    hi,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One decode row's query heads of `kv_head` over context tokens [lo, hi): the online
    softmax's running max and sum and the unnormalised output, with the rows' heads and
    masks (the decode kernels' shared walk)."""
    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_offsets = q_start.to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k = _load_kv_tile(
            k_cache_ptr, table_row, kv_head, n, n_mask, d, d_mask,
            stride_cache_block, stride_cache_slot, stride_cache_h, BLOCK_SIZE, True,
        )  # fmt: skip
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2e
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(
            v_cache_ptr, table_row, kv_head, n, n_mask, d, d_mask,
            stride_cache_block, stride_cache_slot, stride_cache_h, BLOCK_SIZE, True,
        )  # fmt: skip
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    return m_i, l_i, acc, heads, g_mask, d, d_mask


# The split count varies with the batch size (16 splits at batch 2, 5 at batch 8, 1 from
# 48 up, for a 4k context on 132 SMs): left unspecialized, the decode graphs' ladder
# compiles one kernel per value of SPLIT instead of one per kind of value (1, a multiple
# of 16, other), and the reduction one kernel instead of one per SPLITS_PAD.
@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,  # [T, Hq, D]: written directly when not SPLIT
    part_out_ptr,  # [B, Hq, num_splits, BLOCK_D] fp32, normalised per split
    part_max_ptr,  # [B, Hq, num_splits] fp32, log2 domain
    part_sum_ptr,  # [B, Hq, num_splits] fp32
    scale_log2e,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    stride_bt,
    split_tokens,  # context tokens per split, a multiple of BLOCK_N
    num_splits,  # a runtime value, so that batch sizes do not each compile a kernel
    split_tokens_ptr,  # [1] int32, read when SPLIT_TOKENS_FROM_PTR: split_tokens set at replay
    split_flag_ptr,  # [1] int32, read when READ_FLAG: zero means the prefill kernel has them
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot's minimum M)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for the reduce kernel
    SPLIT_TOKENS_FROM_PTR: tl.constexpr,
    READ_FLAG: tl.constexpr,
    HEADS_INNER: tl.constexpr,  # grid (kv heads, rows, splits): a row's programs start together
    DOT_PRECISION: tl.constexpr,
):
    if READ_FLAG:
        if tl.load(split_flag_ptr) == 0:
            return
    if HEADS_INNER:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx_len = tl.load(context_lens_ptr + seq)
    if SPLIT_TOKENS_FROM_PTR:
        split_tokens = tl.load(split_tokens_ptr)
    lo = split * split_tokens
    # Not a single new token (none, or a prefill row the prefill kernel owns), or a split
    # past the context's end.
    if (q_len != 1) | (lo >= ctx_len):
        return
    hi = tl.minimum(lo + split_tokens, ctx_len)

    m_i, l_i, acc, heads, g_mask, d, d_mask = _decode_walk(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, scale_log2e, stride_q_t, stride_q_h,
        stride_cache_block, stride_cache_slot, stride_cache_h, stride_bt, seq, q_start, kv_head, lo, hi,
        GROUP, GROUP_PAD, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc = acc / l_i[:, None]  # every live split saw >= 1 key, so l_i > 0
    if not SPLIT:
        o_offsets = q_start.to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + d[None, :]
        tl.store(
            out_ptr + o_offsets,
            acc.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        row = (seq * NUM_Q_HEADS + heads).to(tl.int64) * num_splits + split  # [GROUP_PAD]
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_persistent_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,  # [T, Hq, D]
    scale_log2e,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    stride_bt,
    num_seqs,
    split_flag_ptr,  # [1] int32, read when READ_FLAG: zero means the prefill kernel has them
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    READ_FLAG: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The decode rows of a step with a prefill, beside the prefill kernel
    (ONDO_MIXED_DECODE_BESIDE): a fixed number of programs, each walking (sequence, kv head)
    pairs in turn, its whole context in one pass (the decode kernel's walk with one split,
    so the same sums in the same order). Sequences without exactly one new token are the
    prefill kernel's."""
    if READ_FLAG:
        if tl.load(split_flag_ptr) == 0:
            return
    for item in range(tl.program_id(0), num_seqs * NUM_KV_HEADS, tl.num_programs(0)):
        seq = item // NUM_KV_HEADS
        kv_head = item % NUM_KV_HEADS
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if q_len == 1:
            ctx_len = tl.load(context_lens_ptr + seq)
            m_i, l_i, acc, heads, g_mask, d, d_mask = _decode_walk(
                q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, scale_log2e, stride_q_t, stride_q_h,
                stride_cache_block, stride_cache_slot, stride_cache_h, stride_bt, seq, q_start, kv_head, 0,
                ctx_len, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
            acc = acc / l_i[:, None]
            o_offsets = q_start.to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + d[None, :]
            tl.store(out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_o_t,
    stride_o_h,
    split_tokens,
    num_splits,
    split_tokens_ptr,  # [1] int32, read when SPLIT_TOKENS_FROM_PTR
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLIT_TOKENS_FROM_PTR: tl.constexpr,
):
    """Combine one (sequence, query head)'s split partials into the final output row."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len != 1:  # the split kernel wrote nothing for this sequence
        return
    ctx_len = tl.load(context_lens_ptr + seq)
    if SPLIT_TOKENS_FROM_PTR:
        split_tokens = tl.load(split_tokens_ptr)
    live_splits = tl.cdiv(ctx_len, split_tokens)  # later splits returned without writing

    s = tl.arange(0, SPLITS_PAD)
    s_mask = s < live_splits
    row = (seq * NUM_Q_HEADS + head).to(tl.int64) * num_splits + s
    m = tl.load(part_max_ptr + row, mask=s_mask, other=NEG_BIG)
    l_s = tl.load(part_sum_ptr + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(s_mask, tl.exp2(m - m_max) * l_s, 0.0)
    d = tl.arange(0, BLOCK_D)
    o = tl.load(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    result = tl.sum(o * weight[:, None], 0) / tl.sum(weight, 0)
    o_offsets = q_start.to(tl.int64) * stride_o_t + head * stride_o_h + d
    tl.store(out_ptr + o_offsets, result.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_tile(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    kv_head,
    start,
    kv_end,
    q_pos,  # [BLOCK_M] each row's position in the sequence
    d,
    d_mask,
    scale_log2e,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # False: keys start.. are in the context and visible to every row
    DOT_PRECISION: tl.constexpr,
):
    """One K/V tile of the online softmax: the updated (running max, running sum, output)."""
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < kv_end
    k = _load_kv_tile(
        k_cache_ptr, table_row, kv_head, n, n_mask, d, d_mask,
        stride_cache_block, stride_cache_slot, stride_cache_h, BLOCK_SIZE, MASKED,
    )  # fmt: skip
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if MASKED:
        visible = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2e)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2e - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv_tile(
        v_cache_ptr, table_row, kv_head, n, n_mask, d, d_mask,
        stride_cache_block, stride_cache_slot, stride_cache_h, BLOCK_SIZE, MASKED,
    )  # fmt: skip
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def program_tile(query_start_loc_ptr, num_seqs, program, TOKENS_PER_TILE: tl.constexpr):
    """(sequence, its first new token, its new tokens, the query tile) of a flat grid's
    `program`, where sequence s owns programs from query_start_loc[s] // TOKENS_PER_TILE + s
    on: the last sequence whose first program is at or before this one (binary search)."""
    lo = tl.full([], 0, tl.int32)
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // TOKENS_PER_TILE + mid
        is_before = first <= program
        lo = tl.where(is_before, mid, lo)
        hi = tl.where(is_before, hi, mid)
    q_start = tl.load(query_start_loc_ptr + lo)
    q_len = tl.load(query_start_loc_ptr + lo + 1) - q_start
    return lo, q_start, q_len, program - (q_start // TOKENS_PER_TILE + lo)


@triton.jit
def _new_kv_tile(
    q,
    m_i,
    l_i,
    acc,
    k_new_ptr,
    v_new_ptr,
    desc_k,
    desc_v,
    row0,  # the sequence's first new token in the step
    kv_head,
    start,  # the tile's first key, counted from the sequence's first new token
    kv_end,
    q_tok,  # [BLOCK_M] each row's new token, counted the same way
    d,
    d_mask,
    scale_log2e,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # False: keys start.. are this step's and visible to every row
    TMA: tl.constexpr,  # load by tensor descriptors (Hopper's TMA) rather than by pointers
    DOT_PRECISION: tl.constexpr,
):
    """One K/V tile of the online softmax, read from the step's own projections: rows
    `row0 + start ..` of K and V, contiguous, with no block table to look up."""
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < kv_end
    if TMA:
        k = desc_k.load([row0 + start, kv_head * HEAD_DIM])
    else:
        k_offsets = (row0 + n).to(tl.int64)[:, None] * stride_k_t + kv_head * stride_k_h + d[None, :]
        if MASKED:
            k = tl.load(k_new_ptr + k_offsets, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_new_ptr + k_offsets, mask=d_mask[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if MASKED:
        visible = n_mask[None, :] & (n[None, :] <= q_tok[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2e)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2e - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = desc_v.load([row0 + start, kv_head * HEAD_DIM])
        if MASKED:  # rows past the sequence are another's (or padding): never let them in
            v = tl.where(n_mask[:, None], v, 0.0)
    else:
        v_offsets = (row0 + n).to(tl.int64)[:, None] * stride_v_t + kv_head * stride_v_h + d[None, :]
        if MASKED:
            v = tl.load(v_new_ptr + v_offsets, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            v = tl.load(v_new_ptr + v_offsets, mask=d_mask[None, :], other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_tile(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    scale_log2e,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    stride_bt,
    k_new_ptr,
    v_new_ptr,
    desc_k,
    desc_v,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    seq,
    q_start,
    q_len,
    tok0,  # the tile's first new token
    kv_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEW_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query tile of `_prefill_kernel`: BLOCK_M rows of (token, head-in-group) pairs
    from the sequence's new token `tok0` on, over its whole visible context."""
    TOKENS_PER_TILE: tl.constexpr = BLOCK_M // GROUP_PAD
    ctx_len = tl.load(context_lens_ptr + seq)
    prefix_len = ctx_len - q_len  # tokens already cached before this step

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_mask = (tok < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    token_index = (q_start + tok).to(tl.int64)
    q_offsets = token_index[:, None] * stride_q_t + heads[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    # Query token r sits at position prefix_len + r and sees keys 0..prefix_len + r.
    q_pos = prefix_len + tok

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys past the tile's last token are masked for every row: stop there.
    kv_end = tl.minimum(ctx_len, prefix_len + tok0 + TOKENS_PER_TILE)

    if NEW_KV == 0:
        # Every key through the block table. Keys up to the tile's first query position are
        # visible to every row: whole K/V tiles below it need neither the causal mask nor
        # the context bound.
        cache_end = kv_end
        cache_full = (prefix_len + tok0 + 1) // BLOCK_N * BLOCK_N
    else:
        # Only the cached prefix, visible to every row: whole tiles, then what is left of one.
        cache_end = prefix_len
        cache_full = prefix_len // BLOCK_N * BLOCK_N
    # A fresh prompt's tiles have no cached prefix: skipping the block-table loops as a whole
    # (not only their iterations) saves their pipelines' set-up, 6 % of W3's prompts on an H100.
    if cache_end > 0:
        for start in range(0, cache_full, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, start, cache_end, q_pos,
                d, d_mask, scale_log2e, stride_cache_block, stride_cache_slot, stride_cache_h,
                BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
            )  # fmt: skip
        for start in range(cache_full, cache_end, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, start, cache_end, q_pos,
                d, d_mask, scale_log2e, stride_cache_block, stride_cache_slot, stride_cache_h,
                BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
            )  # fmt: skip
    if NEW_KV != 0:
        # This step's keys from its own K/V, counted from the sequence's first new token:
        # whole tiles up to the tile's first query token unmasked, then the diagonal.
        new_end = kv_end - prefix_len
        new_full = (tok0 + 1) // BLOCK_N * BLOCK_N
        for start in range(0, new_full, BLOCK_N):
            m_i, l_i, acc = _new_kv_tile(
                q, m_i, l_i, acc, k_new_ptr, v_new_ptr, desc_k, desc_v, q_start, kv_head, start, new_end,
                tok, d, d_mask, scale_log2e, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                HEAD_DIM, BLOCK_N, False, NEW_KV == 2, DOT_PRECISION,
            )  # fmt: skip
        for start in range(new_full, new_end, BLOCK_N):
            m_i, l_i, acc = _new_kv_tile(
                q, m_i, l_i, acc, k_new_ptr, v_new_ptr, desc_k, desc_v, q_start, kv_head, start, new_end,
                tok, d, d_mask, scale_log2e, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                HEAD_DIM, BLOCK_N, True, NEW_KV == 2, DOT_PRECISION,
            )  # fmt: skip

    # Every live row sees key 0, so l_i > 0 there; padded rows are not stored.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offsets = token_index[:, None] * stride_o_t + heads[:, None] * stride_o_h + d[None, :]
    tl.store(
        out_ptr + o_offsets,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    scale_log2e,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    stride_bt,
    num_seqs,
    split_flag_ptr,  # [1] int32, read when SKIP_SINGLE == 2
    k_new_ptr,  # [T, Hkv, D]: the step's new K, read when NEW_KV (also in the cache by now)
    v_new_ptr,
    desc_k,  # tensor descriptors of k_new / v_new as [T, Hkv * D], read when NEW_KV == 2
    desc_v,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile = query tokens per tile * GROUP_PAD
    BLOCK_N: tl.constexpr,
    # Sequences with one new token are the decode kernel's: 0 never, 1 always, 2 where
    # split_flag_ptr holds a nonzero value (a CUDA graph, decided per replay).
    SKIP_SINGLE: tl.constexpr,
    LONGEST_FIRST: tl.constexpr,  # programs taken from the grid's end: each sequence's last tiles first
    # Where the step's own keys are read: 0 through the block table like the cached ones,
    # 1 from k_new / v_new by pointers, 2 from them by tensor descriptors.
    NEW_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # 0: a sequence with one new token (a decode row) takes a tile of BLOCK_M rows like any
    # other, GROUP of them live; > 0: a tile of DECODE_M rows (ONDO_PREFILL_DECODE_TILE).
    DECODE_M: tl.constexpr,
):
    """Causal attention of a tile of one sequence's new tokens over its whole context.

    A tile's rows are (token, head-in-group) pairs, so the kv head's K/V tile is
    loaded once for all its query heads. With SKIP_SINGLE, sequences bringing one new
    token (decode rows beside a prefill) are left to the decode kernel: here each fills
    GROUP of a tile's BLOCK_M rows (of DECODE_M with DECODE_M > 0, so that its walk over
    its whole context does a fraction of the matrix work) and still walks its context.

    The grid's first axis runs over the batch's query tiles, flat: sequence s owns
    programs from query_start_loc[s] // TOKENS_PER_TILE + s on, at least as many as it
    has tiles. So the grid needs only the token and sequence counts, never the longest
    query, and a CUDA graph captured for T tokens and B sequences serves every batch
    that fits (trailing sequences with no new tokens, tokens of no sequence).

    A causal tile's work grows with its position: the last tile of a 2,048-token prompt
    reads 2,048 keys, the first one 32. The GPU starts programs in grid order, so in
    grid order the longest tiles start last and the kernel ends on a few of them running
    alone. LONGEST_FIRST walks the grid from its end instead: within each sequence the
    longest tiles start first and the kernel ends on short ones, spread over the SMs.
    """
    TOKENS_PER_TILE: tl.constexpr = BLOCK_M // GROUP_PAD
    program = tl.program_id(0)
    if LONGEST_FIRST:
        program = tl.num_programs(0) - 1 - program
    kv_head = tl.program_id(1)
    seq, q_start, q_len, tile = program_tile(query_start_loc_ptr, num_seqs, program, TOKENS_PER_TILE)
    tok0 = tile * TOKENS_PER_TILE
    done = tok0 >= q_len  # this sequence has fewer tiles (or no new tokens at all)
    if SKIP_SINGLE == 1:
        done = done | (q_len == 1)
    elif SKIP_SINGLE == 2:
        done = done | ((q_len == 1) & (tl.load(split_flag_ptr) != 0))
    if done:
        return
    if DECODE_M > 0 and q_len == 1:
        # A decode row beside prompts: its GROUP rows in a tile of DECODE_M, not BLOCK_M.
        _attend_tile(
            q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale_log2e,
            stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_cache_block, stride_cache_slot,
            stride_cache_h, stride_bt, k_new_ptr, v_new_ptr, desc_k, desc_v, stride_k_t, stride_k_h,
            stride_v_t, stride_v_h, seq, q_start, q_len, tok0, kv_head, GROUP, GROUP_PAD, HEAD_DIM,
            BLOCK_D, BLOCK_SIZE,
            DECODE_M, BLOCK_N, NEW_KV, DOT_PRECISION,
        )  # fmt: skip
    else:
        _attend_tile(
            q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale_log2e,
            stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_cache_block, stride_cache_slot,
            stride_cache_h, stride_bt, k_new_ptr, v_new_ptr, desc_k, desc_v, stride_k_t, stride_k_h,
            stride_v_t, stride_v_h, seq, q_start, q_len, tok0, kv_head, GROUP, GROUP_PAD, HEAD_DIM,
            BLOCK_D, BLOCK_SIZE,
            BLOCK_M, BLOCK_N, NEW_KV, DOT_PRECISION,
        )  # fmt: skip


# ---------------------------------------------------------------- launch configuration


def _sm_count(t: torch.Tensor) -> int:
    # The interpreter (CPU tensors) has no SMs; pretend to be an H100 so the split
    # heuristic picks what the GPU would.
    return device_sm_count(t.device.index or 0) if t.is_cuda else 132


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently drop to tf32 (10-bit mantissa) on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _kv_tile_tokens(t: torch.Tensor, block_d: int) -> tuple[int, int]:
    """(BLOCK_N, num_stages) keeping the pipelined K and V tiles within shared memory.

    64 tokens of a 128-wide bf16 head is 16 KiB per tile: several cache blocks per
    iteration, so the loads are long enough to run at full bandwidth.
    """
    if not t.is_cuda:
        return 32, 1  # interpreter: smaller tiles still exercise multi-tile loops
    block_n, stages = 64, 3
    budget = 160 * 1024
    while 2 * block_n * block_d * t.element_size() * stages > budget:
        if stages > 2:
            stages -= 1
        else:
            block_n //= 2
    return block_n, stages


def decode_tile_tokens(k_cache: torch.Tensor) -> int:
    """BLOCK_N of the decode kernel on this cache: the unit a split's tokens come in."""
    return _kv_tile_tokens(k_cache, triton.next_power_of_2(k_cache.shape[3]))[0]


def reduce_splits_pad(num_splits: int) -> int:
    """The reduction's split lanes: one width for every split count the heuristic makes, so
    that one kernel serves them all."""
    return max(MAX_DECODE_SPLITS, triton.next_power_of_2(num_splits))


def _check_inputs(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert query.dim() == 3 and k_cache.dim() == 4
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert query.shape[2] == k_cache.shape[3]
    assert query.shape[1] % k_cache.shape[2] == 0, "query heads must be a multiple of kv heads"
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1


def paged_decode_attention_triton(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    split_tokens: int | None = None,  # override the split heuristic (tests force splits)
    heads_inner: bool | None = None,  # a row's kv heads side by side in the grid (default: the switch)
) -> torch.Tensor:
    """Attention for batches whose sequences bring at most one new token each."""
    _check_inputs(query, k_cache, v_cache)
    out = torch.empty_like(query)
    if query.shape[0] == 0 or meta.num_seqs == 0:
        return out
    _decode_into(out, query, k_cache, v_cache, meta, scale, meta.num_seqs, split_tokens,
                 heads_inner=heads_inner)
    return out


def _decode_into(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_rows: int,  # sequences with one new token: they alone need programs
    split_tokens: int | None = None,
    split_flag: torch.Tensor | None = None,  # [1] int32: write nothing where it holds 0
    heads_inner: bool | None = None,
) -> None:
    """Write the output rows of the sequences that bring exactly one new token. With
    `heads_inner` (by default `decode_longest_first()`) the grid puts a row's kv heads side
    by side, so that the GPU starts the programs in row order, a row at a time."""
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_seqs = meta.num_seqs
    block_d = triton.next_power_of_2(head_dim)
    block_n, stages = _kv_tile_tokens(k_cache, block_d)
    # A CUDA graph's capture sizes the grid for the longest context allowed; each replay
    # then sets the split's tokens from its own longest context (`graph_split_tokens`).
    from_ptr = split_tokens is None and meta.decode_split_tokens is not None
    split_tokens, num_splits = decode_splits(num_rows, num_kv_heads, meta.max_context_len, block_n,
                                             _sm_count(query), split_tokens)
    from_ptr = from_ptr and num_splits > 1
    split_tokens_ptr = meta.decode_split_tokens if from_ptr else meta.context_lens  # any int32 pointer

    if num_splits > 1:
        part_out = torch.empty(
            num_seqs, num_q_heads, num_splits, block_d, dtype=torch.float32, device=query.device
        )
        part_max = torch.empty(
            num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=query.device
        )
        part_sum = torch.empty_like(part_max)
    else:  # unused by the kernel; any fp32 tensor satisfies the signature
        part_out = part_max = part_sum = out.new_empty(1, dtype=torch.float32)

    if heads_inner is None:
        heads_inner = decode_longest_first()
    launch(
        _decode_split_kernel,
        (num_kv_heads, num_seqs, num_splits) if heads_inner else (num_seqs, num_kv_heads, num_splits),
        query,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        meta.query_start_loc,
        out,
        part_out,
        part_max,
        part_sum,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        split_tokens,
        num_splits,
        split_tokens_ptr,
        meta.context_lens if split_flag is None else split_flag,  # any int32 pointer when unread
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        SPLIT_TOKENS_FROM_PTR=from_ptr,
        READ_FLAG=split_flag is not None,
        HEADS_INNER=heads_inner,
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=4,
        num_stages=stages,
    )
    if num_splits > 1:
        launch(
            _decode_reduce_kernel,
            (num_seqs, num_q_heads),
            meta.context_lens,
            meta.query_start_loc,
            out,
            part_out,
            part_max,
            part_sum,
            out.stride(0),
            out.stride(1),
            split_tokens,
            num_splits,
            split_tokens_ptr,
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            SPLITS_PAD=reduce_splits_pad(num_splits),
            SPLIT_TOKENS_FROM_PTR=from_ptr,
            num_warps=4 if block_d >= 128 else 2,
        )


def _step_args(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    out: torch.Tensor,
    scale: float,
    split_flag: torch.Tensor | None,
) -> tuple:
    """The leading arguments that `_prefill_kernel` and `_decode_persistent_kernel` share,
    in their order: tensors, the scale, strides, the sequence count and the split flag."""
    return (query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, out,
            scale * LOG2E, query.stride(0), query.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0), meta.num_seqs,
            meta.context_lens if split_flag is None else split_flag)  # any int32 pointer when unread


BESIDE_PROGRAMS_PER_SM = 2  # the persistent decode kernel's programs an SM


def _decode_beside(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_single: int | None,  # the step's decode rows where the host knows them (not in a capture)
    split_flag: torch.Tensor | None,  # [1] int32: write nothing where it holds 0
) -> None:
    """The decode rows of a step with a prefill by `_decode_persistent_kernel`: two programs
    an SM at most (fewer where the step has fewer (row, kv head) pairs), on the decode
    kernel's K/V tiles in two pipeline stages (compiled for sm_90: 118 registers, 38 KiB of
    shared memory). Started first, they take two programs' room on every SM and leave room
    for one of the prefill kernel's. (One program an SM on 32-token tiles, beside a
    two-stage prefill kernel, made W3 10 % slower on an H100: docs/benchmarks.md.)"""
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_n, stages = _kv_tile_tokens(k_cache, block_d)
    stages = min(stages, 2)
    pairs = (meta.num_seqs if num_single is None else num_single) * num_kv_heads
    launch(
        _decode_persistent_kernel,
        (max(1, min(BESIDE_PROGRAMS_PER_SM * _sm_count(query), pairs)),),
        *_step_args(query, k_cache, v_cache, meta, out, scale, split_flag),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        READ_FLAG=split_flag is not None,
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=4,
        num_stages=stages,
    )


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether these [T, H, D] tensors can be read by tensor descriptors as [T, H * D]:
    a GPU with TMA (Hopper on), a power-of-two head dim, rows a view of 16-byte aligned
    memory."""
    t = tensors[0]
    if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    d = t.shape[2]
    return d == triton.next_power_of_2(d) and all(
        x.stride(2) == 1 and x.stride(1) == d and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0 for x in tensors)


def new_kv_mode(key: torch.Tensor | None, value: torch.Tensor | None, new_kv: int | None = None) -> int:
    """The prefill kernel's NEW_KV: 0 the step's keys read back from the cache, 1 from
    `key` / `value` by pointers, 2 from them by tensor descriptors. `new_kv` forces a
    mode (tests, benchmarks); by default the switch, with descriptors where they work."""
    if key is None or value is None:
        return 0
    if new_kv is not None:
        return new_kv
    if not prefill_new_kv():
        return 0
    return 2 if _tma_ready(key, value) else 1


def _kv_descriptors(key: torch.Tensor, value: torch.Tensor, block_n: int) -> tuple[object, object]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    t, h, d = key.shape
    return tuple(
        TensorDescriptor(x, [t, h * d], [x.stride(0), 1], [block_n, d]) for x in (key, value)
    )  # type: ignore[return-value]


def prefill_tiles(query: torch.Tensor, k_cache: torch.Tensor) -> PrefillTiles:
    """The configuration for these heads and dtypes: ONDO_PREFILL_TILES's for bf16 and fp16
    on a GPU where it is set, else the default."""
    block_d = triton.next_power_of_2(query.shape[2])
    block_n, stages = _kv_tile_tokens(k_cache, block_d)
    longest_first = prefill_longest_first()
    if not query.is_cuda:
        return PrefillTiles(16, block_n, 4, stages, longest_first)
    if query.dtype == torch.float32:
        # fp32 dots run on the CUDA cores ("ieee"), unrolled: with 64 x 64 tiles each fp32
        # prefill GPU test took 35-93 s on an H100 (2026-12-06), the bf16 ones 2-8 s. fp32
        # is served for exactness, not speed; a 32 x 32 tile is a quarter of the code.
        return PrefillTiles(32, min(block_n, 32), 4, stages, longest_first)
    configured = configured_prefill_tiles()
    if configured is not None:
        return configured._replace(longest_first=longest_first)
    # 64 rows on 4 warps: on an H200 the fastest on both W3 shapes and on chunks over a
    # context (bench/prefill_tiles.py: 7 %, 4 % and 12 % under 128 rows on 8 warps), and
    # a single-token row that stays in this kernel wastes half as many tile rows.
    return PrefillTiles(64, block_n, 4, stages, longest_first)


def decode_tile_rows(group_pad: int, block_m: int) -> int:
    """The prefill kernel's DECODE_M: unless ONDO_PREFILL_DECODE_TILE=0, the rows of a decode
    row's tile (its query heads, at least the 16 rows of a tensor-core tile), where that is
    fewer than a prompt tile's; otherwise 0 (a decode row takes a prompt tile)."""
    rows = max(16, group_pad)
    return rows if prefill_decode_tile() and rows < block_m else 0


def paged_prefill_attention_triton(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    split_decode_rows: bool | None = None,
    tiles: PrefillTiles | None = None,  # override the launch configuration (benchmarks)
    key: torch.Tensor | None = None,  # [T, Hkv, D]: the step's new K/V, already in the cache
    value: torch.Tensor | None = None,
    new_kv: int | None = None,  # force `new_kv_mode` (tests, benchmarks)
) -> torch.Tensor:
    """Causal attention for any batch: prefill, chunked prefill, decode rows, empty rows.

    Given the step's own `key` and `value` (unless ONDO_PREFILL_NEW_KV=0), the new tokens'
    keys are read from them, contiguous, and only the cached prefix through the block
    table (`new_kv_mode`); the result is the same up to the order of its sums (the same
    bits on fresh prompts, whose K/V tiles do not change).

    Sequences that bring one new token may go to the decode kernel, which reads each
    one's context once per kv head with no empty tile rows: where there are enough of
    them to fill the GPU (`ondo.kernels.attention.splits_decode_rows`), or as
    ``split_decode_rows`` says. Where the host does not know the query lengths (a CUDA
    graph's capture), the choice is read on the device from ``meta.split_decode_rows``:
    both kernels are launched and each skips the other's sequences; without that tensor
    the prefill kernel takes all.
    """
    _check_inputs(query, k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_tokens == 0 or meta.num_seqs == 0 or meta.max_query_len == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(head_dim)
    tiles = tiles or prefill_tiles(query, k_cache)
    block_m, block_n, longest_first = tiles.block_m, tiles.block_n, tiles.longest_first
    block_m = max(block_m, group_pad)
    tokens_per_tile = block_m // group_pad
    decode_m = decode_tile_rows(group_pad, block_m)
    # Enough programs for every sequence's tiles (see _prefill_kernel), from host sizes only.
    num_programs = num_tokens // tokens_per_tile + meta.num_seqs
    split_flag = None
    if meta.query_lens_cpu is not None:
        num_single = meta.num_single_token_seqs
        if split_decode_rows is None:
            split_decode_rows = splits_mixed_step(meta, num_kv_heads, _sm_count(query))
        skip_single = int(split_decode_rows and num_single > 0)
    else:  # every sequence may bring one token
        num_single = meta.num_seqs
        if meta.split_decode_rows is not None and split_decode_rows is None:
            split_flag, skip_single = meta.split_decode_rows, 2
        else:
            skip_single = int(bool(split_decode_rows))

    # The decode rows take one split each, whatever the batch: a step replayed from a CUDA
    # graph (which sees only the captured sizes) then sums in the order of the same step
    # run eagerly.
    decode_rows, overlap = None, False
    if skip_single and mixed_decode_beside():
        decode_rows, overlap = functools.partial(
            _decode_beside, out, query, k_cache, v_cache, meta, scale,
            num_single if meta.query_lens_cpu is not None else None, split_flag), True
    elif skip_single:
        decode_rows = functools.partial(_decode_into, out, query, k_cache, v_cache, meta, scale, num_single,
                                        split_tokens=max(meta.max_context_len, 1), split_flag=split_flag)
        overlap = query.is_cuda and mixed_decode_overlap()
    side = _side_stream(query.device) if overlap and query.is_cuda else None
    if side is not None:
        # The decode rows read their contexts while the prompts' tiles keep the tensor cores
        # busy: the decode kernel goes first, on a stream of its own that forks from this
        # one (a CUDA graph captures the fork and the join as two branches).
        main = torch.cuda.current_stream(query.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            decode_rows()

    mode = new_kv_mode(key, value, new_kv)
    if mode == 0:
        key = value = query  # any pointer, unread
    desc_k, desc_v = _kv_descriptors(key, value, block_n) if mode == 2 else (key, value)
    launch(
        _prefill_kernel,
        (num_programs, num_kv_heads),
        *_step_args(query, k_cache, v_cache, meta, out, scale, split_flag),
        key,
        value,
        desc_k,
        desc_v,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SKIP_SINGLE=skip_single,
        LONGEST_FIRST=longest_first,
        NEW_KV=mode,
        DOT_PRECISION=_dot_precision(query.dtype),
        DECODE_M=decode_m,
        **tiles.launch_options(),
    )
    if side is not None:
        main.wait_stream(side)
    elif decode_rows is not None:
        decode_rows()
    return out


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of `device` that a step with a prefill runs its decode rows on
    (ONDO_MIXED_DECODE_OVERLAP=1): high priority, so the GPU starts the decode programs
    before the prompts' tiles queued beside them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(index, priority=-1)
    return stream


def paged_attention_triton(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    key: torch.Tensor | None = None,  # [T, Hkv, D]: the step's new K/V, already in the cache
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``paged_attention_ref``: out [T, Hq, D] in query's dtype."""
    if meta.max_query_len <= 1:
        return paged_decode_attention_triton(query, k_cache, v_cache, meta, scale)
    return paged_prefill_attention_triton(query, k_cache, v_cache, meta, scale, key=key, value=value)
