"""Qwen3's per-head q/k RMSNorm and the rotary embedding in one pass over the QKV
projection's output: each (token, q or k head) row is read once and written once.

Inside a compiled region Inductor makes two reduction kernels of it (q's heads, then
k's), which on an H100 at 8,192 tokens took 62 µs a layer for ~100 MB of traffic
(about half the copy rate; docs/benchmarks.md). Here a program takes a block of tokens
of one head, both halves of each row side by side, so that the rotation (neox
"rotate_half": the first half against the second) needs no second read.

The rounding follows transformers' eager forward: the norm's statistics in float32, the
normalized row cast to the model's dtype and multiplied by the weight there, cos and sin
cast to that dtype, each product and the sum rounded in it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ondo.kernels.launch import launch

BLOCK_T = 16  # tokens per program


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,  # [T, (Hq + 2 * Hkv) * D]: q heads, then k heads, then v heads
    q_out_ptr,  # [T, Hq, D]
    k_out_ptr,  # [T, Hkv, D]
    q_weight_ptr,  # [D]
    k_weight_ptr,  # [D]
    cos_ptr,  # [T, D] float32
    sin_ptr,
    num_tokens,
    stride_qkv_t,
    stride_cos_t,
    stride_sin_t,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,  # HEAD_DIM // 2 padded to a power of two
    BLOCK_T: tl.constexpr,
):
    head = tl.program_id(1)  # q heads first, then k heads: the projection's column order
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, HALF_PAD)
    half = HEAD_DIM // 2
    mask = (t < num_tokens)[:, None] & (j < half)[None, :]
    t64 = t.to(tl.int64)[:, None]

    x_ptrs = qkv_ptr + t64 * stride_qkv_t + head * HEAD_DIM + j[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0)
    dtype = q_out_ptr.dtype.element_ty

    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)[:, None]
    if head < NUM_Q_HEADS:
        w_ptr = q_weight_ptr
        out_ptrs = q_out_ptr + t64 * (NUM_Q_HEADS * HEAD_DIM) + head * HEAD_DIM + j[None, :]
    else:
        w_ptr = k_weight_ptr
        out_ptrs = k_out_ptr + t64 * (NUM_KV_HEADS * HEAD_DIM) + (head - NUM_Q_HEADS) * HEAD_DIM + j[None, :]
    # In float32, each result rounded to the model's dtype where eager rounds it (a product
    # of two such values is exact in float32, so rounding it once gives the dtype's product).
    w1 = tl.load(w_ptr + j, mask=j < half, other=0.0).to(dtype).to(tl.float32)
    w2 = tl.load(w_ptr + half + j, mask=j < half, other=0.0).to(dtype).to(tl.float32)
    n1 = _rounded(w1[None, :] * _rounded(a * inv_rms, dtype), dtype)
    n2 = _rounded(w2[None, :] * _rounded(b * inv_rms, dtype), dtype)

    c_ptrs = cos_ptr + t64 * stride_cos_t + j[None, :]
    s_ptrs = sin_ptr + t64 * stride_sin_t + j[None, :]
    c1 = _rounded(tl.load(c_ptrs, mask=mask, other=0.0), dtype)
    c2 = _rounded(tl.load(c_ptrs + half, mask=mask, other=0.0), dtype)
    s1 = _rounded(tl.load(s_ptrs, mask=mask, other=0.0), dtype)
    s2 = _rounded(tl.load(s_ptrs + half, mask=mask, other=0.0), dtype)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
    out1 = _rounded(n1 * c1, dtype) - _rounded(n2 * s1, dtype)
    out2 = _rounded(n2 * c2, dtype) + _rounded(n1 * s2, dtype)
    tl.store(out_ptrs, out1.to(dtype), mask=mask)
    tl.store(out_ptrs + half, out2.to(dtype), mask=mask)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) rounded to `dtype` and back."""
    return x.to(dtype).to(tl.float32)

def qk_norm_rope_triton(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hkv, D], normed per head and rotated, from `qkv`."""
    num_tokens = qkv.shape[0]
    if head_dim % 2 or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} (strides {qkv.stride()}) is not [T, (Hq + 2 * Hkv) * D] "
                         f"rows for Hq={num_q_heads}, Hkv={num_kv_heads}, D={head_dim}")
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [T, D] rows, T={num_tokens}")
    q = qkv.new_empty((num_tokens, num_q_heads, head_dim))
    k = qkv.new_empty((num_tokens, num_kv_heads, head_dim))
    if num_tokens == 0:
        return q, k
    launch(
        _qk_norm_rope_kernel,
        (triton.cdiv(num_tokens, BLOCK_T), num_q_heads + num_kv_heads),
        qkv, q, k, q_weight, k_weight, cos, sin,
        num_tokens, qkv.stride(0), cos.stride(0), sin.stride(0), eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        BLOCK_T=BLOCK_T,
        num_warps=4,
    )  # fmt: skip
    return q, k
