"""Sampling a batch's next tokens in one pass over its logits (Gumbel-max).

argmax_i(x_i / T + G_i), with G_i = -log(-log U_i) and U_i uniform, draws i with
probability softmax(x / T)_i: the same law as the exponential race argmax(p_i / E_i), but
with no softmax, no probabilities and no noise tensor in memory. The uniforms are made in
the kernel by SplitMix64 (Steele, Lea and Flood, 2014) over the row's seed plus the token
index times the golden-ratio increment: a row's draw depends on its seed and its logits
only (not on its batch or its place in it). Plain integer operations, so that Triton's
interpreter runs the kernel as the GPU does; the seeds come mixed from the host
(`mix_seed`).

Per row: `scale` multiplies the logits (1 / T; 1 where they are scaled already), and
`noisy` 0 makes the row greedy (argmax of the logits, the first of equal maxima, as
torch.argmax). The vocabulary is cut into chunks, one program each (a row alone still
fills the GPU); a second, tiny reduction picks the best chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ondo.kernels.launch import launch

CHUNK = 8192  # vocabulary entries per program
BLOCK = 1024  # per loop iteration
_MASK64 = (1 << 64) - 1


def mix_seed(seed: int) -> int:
    """SplitMix64's finalizer: a seed whose neighbours (a request's seed at the next output
    position) start far-apart streams. Returned as a signed 64-bit value (an int64 tensor
    holds it; the kernel reads its bits as unsigned)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


@triton.jit
def _uniform(seed, cols):
    """(0, 1) uniforms from SplitMix64 at positions `cols` of the stream `seed` (uint64)."""
    z = seed + (cols.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    # 23 bits: k + 0.5 is exact in float32 for k < 2**23 (at 24 bits the top value rounds
    # up to 2**24, a uniform of exactly 1 and an infinite Gumbel), so u lies in
    # [2**-24, 1 - 2**-24], never 0 or 1.
    return ((z >> 41).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _gumbel_max_chunks_kernel(
    logits_ptr,
    stride_row,
    scale_ptr,
    noisy_ptr,
    seed_ptr,
    best_val_ptr,
    best_idx_ptr,
    vocab,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    scale = tl.load(scale_ptr + row)
    noisy = tl.load(noisy_ptr + row) != 0
    seed = tl.load(seed_ptr + row).to(tl.uint64)
    lanes = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    start = chunk * CHUNK
    for off in range(0, CHUNK, BLOCK):
        cols = start + off + lanes
        inside = cols < vocab
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        gumbel = -tl.log(-tl.log(_uniform(seed, cols)))
        score = tl.where(noisy, x * scale + gumbel, x)
        score = tl.where(inside, score, float("-inf"))
        better = score > best_v  # strict: a lane keeps its first maximum
        best_v = tl.where(better, score, best_v)
        best_i = tl.where(better, cols, best_i)
    top = tl.max(best_v, axis=0)
    # The first index among the lanes at the maximum (a lane that never improved holds
    # index 0 and -inf: it only wins if everything is -inf, as torch.argmax returns 0).
    first = tl.min(tl.where(best_v == top, best_i, vocab), axis=0)
    first = tl.where(top == float("-inf"), start, first)
    tl.store(best_val_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, first)


def gumbel_max_sample(logits: torch.Tensor, scale: torch.Tensor, noisy: torch.Tensor,
                      seeds: torch.Tensor, chunk: int = CHUNK, block: int = BLOCK) -> torch.Tensor:
    """Next tokens [N] int64 for logits [N, vocab]; scale [N] float32, noisy [N] int32
    (0: greedy), seeds [N] int64 (one stream per row; `mix_seed`). `chunk` (a multiple of
    `block`) and `block` are powers of two."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab, chunk)
    best_val = torch.empty((n, num_chunks), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((n, num_chunks), dtype=torch.int32, device=logits.device)
    if n:
        launch(
            _gumbel_max_chunks_kernel, (n, num_chunks),
            logits, logits.stride(0), scale, noisy, seeds, best_val, best_idx,
            vocab, num_chunks, CHUNK=chunk, BLOCK=block)
    # argmax returns the first maximal chunk: the lowest index among equal maxima.
    pick = best_val.argmax(dim=1, keepdim=True)
    return best_idx.gather(1, pick).squeeze(1).to(torch.int64)
