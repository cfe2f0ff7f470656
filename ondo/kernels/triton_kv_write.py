"""Triton kernels that store each new token's K and V into its paged-cache slot.

Two layouts of the work: one program per (token, kv head), a row of head_dim elements
(the default), or one program per few tokens with all their kv heads at once, whose
loads and stores are a token's whole contiguous [kv heads, head dim] slice
(`KVWriteTiles`; `bench/kv_write_bench.py` times both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ondo.kernels.launch import launch


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, kv head): a row of HEAD_DIM contiguous elements.
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token or a token whose K/V must not be stored
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM

    src = token.to(tl.int64) * stride_key_t + head * stride_key_h + d
    k = tl.load(key_ptr + src, mask=d_mask)
    src = token.to(tl.int64) * stride_value_t + head * stride_value_h + d
    v = tl.load(value_ptr + src, mask=d_mask)

    dst = block * stride_cache_block + offset * stride_cache_slot + head * stride_cache_h + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=d_mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _write_kv_tokens_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_h,
    num_tokens,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKENS: tl.constexpr,
):
    # One program per TOKENS tokens, each a [kv heads, head dim] tile.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    tile_mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    first = tl.program_id(0).to(tl.int64) * TOKENS
    for i in tl.static_range(TOKENS):
        token = first + i
        slot = tl.load(slot_mapping_ptr + tl.minimum(token, num_tokens - 1)).to(tl.int64)
        # Past the batch, a padding token, or one whose K/V must not be stored. (Made a
        # column before it meets the tile: Triton's interpreter takes no scalar there.)
        valid = ((h * 0 + slot) >= 0) & ((h * 0 + token) < num_tokens)
        mask = tile_mask & valid
        k = tl.load(key_ptr + token * stride_key_t + h * stride_key_h + d, mask=mask)
        v = tl.load(value_ptr + token * stride_value_t + h * stride_value_h + d, mask=mask)
        dst = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_slot
        dst += h * stride_cache_h + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


class KVWriteTiles(NamedTuple):
    """The KV write's launch configuration."""

    tokens: int  # tokens per program, all kv heads at once; 0: one program per (token, kv head)
    num_warps: int


# From this many tokens a step's write runs one program per token, all kv heads at once:
# on an H200 an 8,192-token step's write took 23 us that way against 44 us with one program
# per (token, kv head) on both model shapes; at 256 tokens the two were within 0.5 us
# (bench/kv_write_bench.py, docs/benchmarks.md).
KV_WRITE_TOKEN_PROGRAMS_FROM = 1024


def kv_write_tiles(head_dim: int, num_tokens: int) -> KVWriteTiles:
    """The default launch configuration for a step of `num_tokens` tokens."""
    if num_tokens >= KV_WRITE_TOKEN_PROGRAMS_FROM:
        return KVWriteTiles(1, 4)
    return KVWriteTiles(0, 1 if head_dim <= 128 else 2)


def write_kv_cache_triton(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; a negative slot means "do not store"
    tiles: KVWriteTiles | None = None,  # override the launch configuration (benchmarks)
) -> None:
    """Same contract as ``write_kv_cache_ref``; key/value may be strided views (e.g. of a
    fused QKV projection) as long as their last dimension is contiguous."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert value.shape == key.shape
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1
    tokens, num_warps = tiles or kv_write_tiles(head_dim, num_tokens)
    args = (key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    block_d = triton.next_power_of_2(head_dim)
    if tokens > 0:
        launch(
            _write_kv_tokens_kernel,
            (triton.cdiv(num_tokens, tokens),),
            *args,
            num_tokens,
            BLOCK_SIZE=k_cache.shape[1],
            NUM_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=block_d,
            TOKENS=tokens,
            num_warps=num_warps,
        )
    else:
        launch(
            _write_kv_cache_kernel, (num_tokens, num_kv_heads),
            *args, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=num_warps
        )
