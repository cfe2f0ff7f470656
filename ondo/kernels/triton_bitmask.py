"""Triton kernel that masks the logits a grammar forbids: one pass, stores only."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ondo.kernels.launch import launch

BLOCK_TOKENS = 4096


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    stride_logits_row,
    stride_bitmask_row,
    vocab_size,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (bitmask row, block of BLOCK tokens). Allowed tokens are left alone,
    # so the logits are never read: only the forbidden ones are written (-inf).
    mask_row = tl.program_id(0)
    block = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + mask_row).to(tl.int64)
    else:
        row = mask_row.to(tl.int64)
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    words = tl.load(bitmask_ptr + mask_row.to(tl.int64) * stride_bitmask_row + tokens // 32,
                    mask=in_vocab, other=-1)
    allowed = (words >> (tokens % 32)) & 1
    tl.store(logits_ptr + row * stride_logits_row + tokens, float("-inf"),
             mask=in_vocab & (allowed == 0))


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor,
                               rows: torch.Tensor | None) -> None:
    """Same contract as `apply_token_bitmask_ref`; logits' rows must be contiguous."""
    num_rows = bitmask.shape[0]
    vocab = logits.shape[1]
    if num_rows == 0 or vocab == 0:
        return
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("apply_token_bitmask_triton needs rows with contiguous columns")
    grid = (num_rows, triton.cdiv(vocab, BLOCK_TOKENS))
    launch(
        _apply_token_bitmask_kernel, grid,
        logits, bitmask, rows if rows is not None else bitmask,
        logits.stride(0), bitmask.stride(0), vocab,
        HAS_ROWS=rows is not None, BLOCK=BLOCK_TOKENS,
    )
