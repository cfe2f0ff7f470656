"""How the flash-decoding kernel cuts contexts into splits (`ondo.kernels.triton_attention`):
plain arithmetic on sizes, with no Triton import, so that the engine can set a CUDA
graph's split at each replay."""

from __future__ import annotations

import math

from ondo.kernels.switches import on_off, whole_number

MAX_DECODE_SPLITS = 64  # the most `decode_split_tokens` cuts a context into
SPLIT_CAP_ENV = "ONDO_DECODE_SPLIT_MAX_TOKENS"


def split_cap_tokens() -> int:
    """The most context tokens one split may take (0: no cap, the default). With a cap,
    long contexts are cut however many programs a batch has already, so that the last
    programs the GPU starts are short ones: a batch of unequal contexts then ends with
    the SMs evenly loaded (`bench/decode_balance.py` measures it)."""
    return whole_number(SPLIT_CAP_ENV, "tokens", minimum=0) or 0


LONGEST_FIRST_ENV = "ONDO_DECODE_LONGEST_FIRST"


def decode_longest_first() -> bool:
    """Whether decode steps run their rows longest context first: the runner packs the
    rows by context (`ModelRunner.prepare`) and the decode kernel's grid puts a row's KV
    heads side by side, so that the GPU starts the programs row by row, longest first.
    On unless ONDO_DECODE_LONGEST_FIRST=0: on an H100, W1 on the 0.6B shape ran at 0.739 of
    its roofline with it against 0.711 without (docs/benchmarks.md, "Decode over unequal
    contexts")."""
    return on_off(LONGEST_FIRST_ENV, default=True)


def decode_split_tokens(
    num_seqs: int, num_kv_heads: int, max_context_len: int, block_n: int, num_sms: int
) -> int:
    """Context tokens per flash-decoding split (>= max_context_len means no split).

    Aim for about two waves of (sequence, kv head, split) programs over the SMs, but
    never cut a split below 256 tokens: each split costs a partial write and a share
    of the reduction, which only pays when it reads a fair amount of K/V. With
    `split_cap_tokens`, no split takes more than the cap (within MAX_DECODE_SPLITS).
    """
    programs = num_seqs * num_kv_heads
    target_programs = 2 * num_sms
    min_split_tokens = 256
    splits = min(
        math.ceil(target_programs / programs),
        math.ceil(max_context_len / min_split_tokens),
        MAX_DECODE_SPLITS,
    )
    cap = split_cap_tokens()
    if cap:
        splits = max(splits, min(math.ceil(max_context_len / max(cap, block_n)), MAX_DECODE_SPLITS))
    splits = max(splits, 1)
    split_tokens = math.ceil(max_context_len / splits)
    return max(block_n, math.ceil(split_tokens / block_n) * block_n)


def decode_splits(num_rows: int, num_kv_heads: int, max_context_len: int, block_n: int, num_sms: int,
                  split_tokens: int | None = None) -> tuple[int, int]:
    """(context tokens per split, splits) of a decode launch: `decode_split_tokens` unless
    given, in whole tiles."""
    max_context_len = max(max_context_len, 1)
    if split_tokens is None:
        split_tokens = decode_split_tokens(max(num_rows, 1), num_kv_heads, max_context_len, block_n, num_sms)
    split_tokens = math.ceil(split_tokens / block_n) * block_n
    return split_tokens, math.ceil(max_context_len / split_tokens)


def graph_split_tokens(num_rows: int, max_context_len: int, graph_rows: int, graph_context_len: int,
                       num_kv_heads: int, block_n: int, num_sms: int) -> int:
    """Context tokens per split for a replay of the decode graph captured at `graph_rows`
    rows and `graph_context_len` tokens: the heuristic's choice for the step's own rows and
    longest context, as an eager step of the same batch makes it, unless that needs more
    splits than the graph's grid holds; then the context spread over the grid's splits."""
    _, grid_splits = decode_splits(graph_rows, num_kv_heads, graph_context_len, block_n, num_sms)
    split, _ = decode_splits(num_rows, num_kv_heads, max_context_len, block_n, num_sms)
    spread = math.ceil(math.ceil(max(max_context_len, 1) / grid_splits) / block_n) * block_n
    return max(split, spread)
