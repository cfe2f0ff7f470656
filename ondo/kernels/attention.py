"""The one entry point the model calls for attention; picks Triton or the reference."""

from __future__ import annotations

import os

import torch

from ondo.kernels.metadata import AttentionMetadata
from ondo.kernels.reference import paged_attention_ref, write_kv_cache_ref


def _use_triton(t: torch.Tensor) -> bool:
    if os.environ.get("ONDO_ATTENTION", "") == "reference":
        return False
    return t.is_cuda


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if _use_triton(key):
        from ondo.kernels.triton_kv_write import write_kv_cache_triton

        write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if _use_triton(query):
        from ondo.kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(query, k_cache, v_cache, meta, scale)
    return paged_attention_ref(query, k_cache, v_cache, meta, scale)
