"""The one entry point the model calls for a layer's KV write and attention
(`write_and_attend`); picks Triton or the reference, and which kernel a mixed step's decode
rows take."""

from __future__ import annotations

import os

import torch

from ondo.kernels.metadata import AttentionMetadata
from ondo.kernels.prefill_tiles import configured_prefill_tiles
from ondo.kernels.reference import paged_attention_ref, write_kv_cache_ref
from ondo.kernels.switches import on_off, whole_number

MIXED_SPLIT_MIN_ROWS_ENV = "ONDO_MIXED_SPLIT_MIN_ROWS"


def mixed_split_min_rows() -> int | None:
    """The fewest decode rows a step with a prefill hands to the decode kernel, from
    ONDO_MIXED_SPLIT_MIN_ROWS (a whole number of rows, 1 or more); None when unset: the
    default rule of `splits_decode_rows`."""
    return whole_number(MIXED_SPLIT_MIN_ROWS_ENV, "rows", minimum=1)


MIXED_SPLIT_BY_WORK_ENV = "ONDO_MIXED_SPLIT_BY_WORK"


def mixed_split_by_work() -> bool:
    """Whether `splits_decode_rows` weighs a step's two kinds of attention work (on unless
    ONDO_MIXED_SPLIT_BY_WORK=0, which restores the SM-waves rule; see `splits_decode_rows`)."""
    return on_off(MIXED_SPLIT_BY_WORK_ENV, default=True)


MIXED_DECODE_OVERLAP_ENV = "ONDO_MIXED_DECODE_OVERLAP"


def mixed_decode_overlap() -> bool:
    """Whether a step with a prefill hands all its decode rows to the decode kernel and
    runs that kernel on a second stream beside the prefill kernel: off unless
    ONDO_MIXED_DECODE_OVERLAP=1. The decode rows' attention is bound by reading their
    contexts, the prompts' by the tensor cores, so the two can share the SMs; in the prefill
    kernel each decode row fills a mostly empty tile of matrix work instead."""
    return on_off(MIXED_DECODE_OVERLAP_ENV, default=False)


MIXED_DECODE_BESIDE_ENV = "ONDO_MIXED_DECODE_BESIDE"


def mixed_decode_beside() -> bool:
    """Whether a step with a prefill hands all its decode rows to a persistent decode kernel
    of two programs an SM, started first on a second stream, so that every SM reads the
    decode rows' contexts beside one of the prompts' tiles until they are done: off unless
    ONDO_MIXED_DECODE_BESIDE=1. On an H100, W3's mixed step's attention took 8 % less and
    W3 on the 0.6B shape ran 1.7 and 3.1 % faster, W1 and the 8B shape's W3 the same
    (docs/benchmarks.md); not yet on by default: the GPU suite has not run with it."""
    return on_off(MIXED_DECODE_BESIDE_ENV, default=False)


PREFILL_LONGEST_FIRST_ENV = "ONDO_PREFILL_LONGEST_FIRST"


def prefill_longest_first() -> bool:
    """Whether the prefill kernel starts each sequence's longest tiles first: off unless
    ONDO_PREFILL_LONGEST_FIRST=1: on an H100, W3 ran no faster with it (docs/benchmarks.md)."""
    return on_off(PREFILL_LONGEST_FIRST_ENV, default=False)


PREFILL_DECODE_TILE_ENV = "ONDO_PREFILL_DECODE_TILE"


def prefill_decode_tile() -> bool:
    """Whether a decode row that stays in the prefill kernel (beside prompts) takes a tile
    of its own query heads padded to 16 rows rather than a whole prompt tile (64 rows, 2 of
    them live on a 16 / 8-head model): the same K/V read, a quarter of the matrix work or
    less. On unless ONDO_PREFILL_DECODE_TILE=0: on an H100, W3 on the 0.6B shape ran
    0.6 % faster with it, its mixed step's attention 1 % (docs/benchmarks.md)."""
    return on_off(PREFILL_DECODE_TILE_ENV, default=True)


PREFILL_NEW_KV_ENV = "ONDO_PREFILL_NEW_KV"


def prefill_new_kv() -> bool:
    """Whether the prefill kernel reads the step's own keys from its K/V projections
    (contiguous, no block table) rather than back from the cache: on unless
    ONDO_PREFILL_NEW_KV=0. On an H100, W3 on the 0.6B shape ran 3 % faster with it and W1
    the same (docs/benchmarks.md)."""
    return on_off(PREFILL_NEW_KV_ENV, default=True)


def check_switches() -> None:
    """Read every attention switch once, so that a bad value fails the engine at start on
    any device (the kernels read them only on a GPU)."""
    mixed_split_min_rows(), mixed_split_by_work(), mixed_decode_overlap(), mixed_decode_beside()
    prefill_longest_first(), prefill_new_kv(), prefill_decode_tile(), configured_prefill_tiles()


def splits_mixed_step(meta: AttentionMetadata, num_kv_heads: int, num_sms: int) -> bool:
    """`splits_decode_rows` for the step `meta` (host lengths required), decided once a
    step: every layer's call after the first reads the choice kept on `meta`, without
    the switches' environment reads or the lengths' sums."""
    key = (num_kv_heads, num_sms)
    cached = meta.split_choices.get(key)
    if cached is not None:
        return cached
    num_single = meta.num_single_token_seqs or 0
    by_rule = mixed_split_min_rows() is None  # no row count set
    if by_rule and num_single == 0:
        choice = False  # no decode rows: nothing to split off
    elif by_rule and (mixed_decode_overlap() or mixed_decode_beside()):
        choice = True  # every decode row to a decode kernel, on its own stream
    else:
        work = meta.prompt_pairs_and_decode_tokens if mixed_split_by_work() else None
        choice = splits_decode_rows(num_single, num_kv_heads, num_sms, work)
    meta.split_choices[key] = choice
    return choice


def splits_decode_rows(num_single: int, num_kv_heads: int, num_sms: int,
                       work: tuple[int, int] | None = None) -> bool:
    """Whether a step's sequences with one new token go to the decode kernel.

    There each (sequence, kv head) is one program reading its context once; in the
    prefill kernel each takes a mostly empty tile of the step's grid. A few of them are
    cheaper in the prefill kernel, where they run beside the prompts' tiles, than as a
    kernel of their own whose handful of programs leaves most SMs idle: split them off
    once their programs make two waves over the SMs (on an H200, 2 decode rows beside a
    512-token prompt took 0.070 ms in the prefill kernel and 0.085 ms split off, 16
    beside a 2,048-token prompt 0.166 and 0.175 ms, 32 there 0.224 and 0.187 ms, 60
    beside four such prompts 0.509 and 0.412 ms: `bench/prefill_bench.py`). Those were
    128-row tiles. With the 64-row tiles of now the prefill kernel is the faster one
    wherever the prompts bring a fair share of the step's work (on an H100, W3's step of
    4 × 2,048 prompt tokens and 60 decode rows: 0.391 against 0.435 ms split off), so this
    rule picks the slower kernel there; the decode kernel still wins beside a short prompt
    and 255 decode rows (0.398 against 0.408 ms). `mixed_split_min_rows` replaces the
    rule with a row count.

    Given the step's `work` (its prompts' causal query-key pairs, its decode rows' context
    tokens: `AttentionMetadata.prompt_pairs_and_decode_tokens`; `splits_mixed_step` passes
    it unless ONDO_MIXED_SPLIT_BY_WORK=0), the decode rows are split off only when the pairs
    are fewer than the tokens: a step that is nearly all decode. Elsewhere their K/V reads
    run beside the prompts' tiles. On an H100 this picked the faster kernel in every mixed
    step measured, on both shapes' heads, and in the engine W3 ran 2.5 to 3.6 % faster on
    the 0.6B shape than with the waves rule (docs/benchmarks.md, "A mixed step's decode
    rows").
    """
    min_rows = mixed_split_min_rows()
    if min_rows is not None:
        return num_single >= min_rows
    if work is not None:
        prompt_pairs, decode_tokens = work
        return num_single > 0 and prompt_pairs < decode_tokens
    return num_single * num_kv_heads >= 2 * num_sms


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


def write_and_attend(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]: the new tokens' K, not yet in the cache
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store the new tokens' K/V into their slots, then attend: [T, Hq, D]. (A decode kernel
    that stored the new K/V itself, one kernel a layer fewer, ran about 45 % slower on an
    H200 from 64 rows up: docs/benchmarks.md.)"""
    write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    return paged_attention(query, k_cache, v_cache, meta, scale, key, value)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    key: torch.Tensor | None = None,  # the step's new K/V, already in the cache: the prefill
    value: torch.Tensor | None = None,  # kernel may read them from here (ONDO_PREFILL_NEW_KV)
) -> torch.Tensor:
    if _use_triton(query):
        from ondo.kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(query, k_cache, v_cache, meta, scale, key, value)
    return paged_attention_ref(query, k_cache, v_cache, meta, scale)
