"""The grammar-mask kernel against the PyTorch reference (Triton's interpreter on CPU)."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Must be set before triton.jit decorates the kernel, i.e. before its import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ondo.kernels.bitmask import apply_token_bitmask_ref  # noqa: E402
from ondo.kernels.triton_bitmask import BLOCK_TOKENS, apply_token_bitmask_triton  # noqa: E402


def _case(num_logits_rows: int, num_mask_rows: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((num_logits_rows, vocab), generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (num_mask_rows, words), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0, :] = -1  # every bit set, bit 31 included: nothing masked
    bitmask[-1, :] = 0
    bitmask[-1, 0] = 1 << 5  # one token allowed
    return logits.to(DEVICE), bitmask.to(DEVICE)


@pytest.mark.parametrize("vocab", [37, BLOCK_TOKENS + 45])
def test_kernel_masks_exactly_the_forbidden_tokens_of_every_row(vocab):
    logits, bitmask = _case(3, 3, vocab, seed=vocab)
    want = logits.clone()
    apply_token_bitmask_ref(want, bitmask, None)
    apply_token_bitmask_triton(logits, bitmask, None)
    assert torch.equal(torch.isinf(logits), torch.isinf(want))
    assert torch.equal(logits, want)
    assert not torch.isinf(logits[0]).any()  # all bits set
    assert torch.isfinite(logits[2]).sum() == 1 and torch.isfinite(logits[2, 5])


def test_kernel_masks_only_the_rows_it_is_given():
    logits, bitmask = _case(5, 2, 100, seed=1)
    rows = torch.tensor([4, 1], device=DEVICE)
    want = logits.clone()
    apply_token_bitmask_ref(want, bitmask, rows)
    before = logits.clone()
    apply_token_bitmask_triton(logits, bitmask, rows)
    assert torch.equal(logits, want)
    for untouched in (0, 2, 3):
        assert torch.equal(logits[untouched], before[untouched])
    assert torch.isfinite(logits[1]).sum() == 1 and torch.isfinite(logits[1, 5])
