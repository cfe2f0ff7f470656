"""Qwen3's q/k norm and rotary embedding as one operator of the compiled regions
(`ondo::qk_norm_rope`), run by `triton_qk_norm_rope` on a GPU. On by default since it was
measured (docs/benchmarks.md; ONDO_FUSED_QK_NORM_ROPE=0 turns it off): a CUDA model with
q/k norms calls it in place of the norms and rotations Inductor would generate.

A custom operator, opaque to Inductor: it sees a call of known output shapes (the fake
implementation), launches nothing of its own around it, and a CUDA graph captures the
kernel like any other. No module-level `from __future__ import annotations` here: the
operator's schema is read from its annotations.
"""

import torch

from ondo.kernels.switches import on_off

FUSED_QK_NORM_ROPE_ENV = "ONDO_FUSED_QK_NORM_ROPE"


def fused_qk_norm_rope() -> bool:
    """Whether CUDA models with q/k norms use `qk_norm_rope`: on unless
    ONDO_FUSED_QK_NORM_ROPE=0; anything but 0 or 1 is refused."""
    return on_off(FUSED_QK_NORM_ROPE_ENV, default=True)


@torch.library.custom_op("ondo::qk_norm_rope", mutates_args=())
def qk_norm_rope(
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
    """q [T, Hq, D] and k [T, Hkv, D] from the QKV projection's rows [T, (Hq + 2 Hkv) D]:
    each head RMS-normed with its weight, then rotated by cos and sin [T, D]."""
    from ondo.kernels.triton_qk_norm_rope import qk_norm_rope_triton  # Triton where it runs

    return qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, num_q_heads, num_kv_heads, head_dim, eps)


@qk_norm_rope.register_fake
def _(qkv, q_weight, k_weight, cos, sin, num_q_heads, num_kv_heads, head_dim, eps):
    num_tokens = qkv.shape[0]
    return (qkv.new_empty((num_tokens, num_q_heads, head_dim)),
            qkv.new_empty((num_tokens, num_kv_heads, head_dim)))
