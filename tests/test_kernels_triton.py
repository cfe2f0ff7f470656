"""Triton KV write and paged attention against the PyTorch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, so the shapes
are small; on a CUDA machine the same checks run on the GPU in fp32.
"""

import dataclasses
import math
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Must be set before triton.jit decorates the kernels, i.e. before their import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ondo.kernels.attention import (  # noqa: E402
    MIXED_DECODE_BESIDE_ENV,
    MIXED_DECODE_OVERLAP_ENV,
    MIXED_SPLIT_BY_WORK_ENV,
    MIXED_SPLIT_MIN_ROWS_ENV,
    PREFILL_DECODE_TILE_ENV,
    splits_decode_rows,
    splits_mixed_step,
)
from ondo.kernels.decode_splits import decode_split_tokens, decode_splits, graph_split_tokens  # noqa: E402
from ondo.kernels.reference import paged_attention_ref, write_kv_cache_ref  # noqa: E402
from ondo.kernels.testing import PagedBatch, make_paged_batch  # noqa: E402
from ondo.kernels.triton_attention import (  # noqa: E402
    PrefillTiles,
    decode_tile_rows,
    new_kv_mode,
    paged_attention_triton,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
    prefill_tiles,
)
from ondo.kernels.triton_kv_write import (  # noqa: E402
    KV_WRITE_TOKEN_PROGRAMS_FROM,
    KVWriteTiles,
    kv_write_tiles,
    write_kv_cache_triton,
)

ATOL = RTOL = 1e-4  # fp32 end to end; only the summation order differs


def _batch(query_lens, context_lens, heads=(8, 2), head_dim=64, block_size=16, seed=0):
    num_q_heads, num_kv_heads = heads
    return make_paged_batch(
        query_lens,
        context_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        device=DEVICE,
        seed=seed,
    )


def _reference(b: PagedBatch) -> torch.Tensor:
    """Reference output with the new tokens' K/V written by the reference writer."""
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    write_kv_cache_ref(b.key, b.value, k_cache, v_cache, b.meta.slot_mapping)
    return paged_attention_ref(b.query, k_cache, v_cache, b.meta, b.query.shape[-1] ** -0.5)


def _write_then_attend(b: PagedBatch, attend) -> torch.Tensor:
    """One layer of an engine step on the Triton path: store new K/V, then attend."""
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    return attend(b.query, b.k_cache, b.v_cache, b.meta, b.query.shape[-1] ** -0.5)


# ------------------------------------------------------------------ KV-cache write


def test_large_steps_write_their_kv_one_program_per_token():
    small = kv_write_tiles(128, KV_WRITE_TOKEN_PROGRAMS_FROM - 1)
    assert small.tokens == 0 and kv_write_tiles(256, 16).num_warps == 2  # a program per (token, kv head)
    assert kv_write_tiles(128, KV_WRITE_TOKEN_PROGRAMS_FROM) == KVWriteTiles(1, 4)
    assert kv_write_tiles(64, 8192) == KVWriteTiles(1, 4)


@pytest.mark.parametrize("heads, tiles", [((4, 2), None), ((4, 2), KVWriteTiles(1, 4)),
                                          ((6, 3), KVWriteTiles(3, 4)), ((6, 3), None)])
def test_write_kv_cache_stores_strided_rows_and_skips_negative_slots(heads, tiles):
    """Both layouts of the work: per (token, kv head), and several tokens with all their
    kv heads (3 a program over 8 tokens: a partly filled last program; 3 kv heads: a
    padded head tile)."""
    b = _batch([3, 1, 4], [3, 9, 21], heads=heads, block_size=8)
    hkv = heads[1]
    # K and V as views into a fused [T, 2 * Hkv, D] projection, as a model produces them.
    fused = torch.cat([b.key, b.value], dim=1)
    key, value = fused[:, :hkv], fused[:, hkv:]
    slots = b.meta.slot_mapping.clone()
    slots[[1, 5]] = -1  # e.g. padding tokens of a CUDA-graph batch
    expect_k, expect_v = b.k_cache.clone(), b.v_cache.clone()
    write_kv_cache_ref(key, value, expect_k, expect_v, slots)
    before = b.k_cache.clone()

    write_kv_cache_triton(key, value, b.k_cache, b.v_cache, slots, tiles=tiles)

    assert torch.equal(b.k_cache, expect_k)
    assert torch.equal(b.v_cache, expect_v)
    assert not torch.equal(b.k_cache, before)  # it did write something


# ------------------------------------------------------------------ decode


@pytest.mark.parametrize(
    "heads, head_dim, block_size",
    [
        ((4, 4), 64, 16),  # MHA
        ((8, 2), 128, 16),  # GQA 4
        ((16, 2), 64, 8),  # GQA 8
        ((8, 1), 128, 16),  # GQA 8, a single kv head
    ],
)
def test_decode_matches_reference_on_ragged_mid_block_contexts(heads, head_dim, block_size):
    # Contexts end mid-block, on a block edge (32), inside the first block (1, 5).
    b = _batch([1, 1, 1, 1], [37, 1, 32, 70], heads=heads, head_dim=head_dim, block_size=block_size)
    out = _write_then_attend(b, paged_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_decode_flash_decoding_splits_combine_to_reference():
    # 64-token splits (a whole number of tiles on CPU and GPU): the 150-token context has
    # 3 splits (the last one partial), the 20-token context one live split, and the
    # reduction must skip its dead ones.
    b = _batch([1, 1, 1], [150, 20, 96], heads=(8, 2), head_dim=64, block_size=16)
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    scale = 64**-0.5
    split = paged_decode_attention_triton(
        b.query, b.k_cache, b.v_cache, b.meta, scale, split_tokens=64
    )
    whole = paged_decode_attention_triton(
        b.query, b.k_cache, b.v_cache, b.meta, scale, split_tokens=160
    )
    torch.testing.assert_close(split, _reference(b), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(split, whole, atol=ATOL, rtol=RTOL)


def test_decode_skips_sequences_without_a_new_token():
    # A sequence with query_len 0 owns no output row; its neighbours must be unaffected.
    b = _batch([1, 0, 1], [140, 12, 7], heads=(8, 2), head_dim=64)
    assert b.meta.max_query_len == 1
    out = _write_then_attend(b, lambda *a: paged_decode_attention_triton(*a, split_tokens=64))
    assert out.shape[0] == 2
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def _reference_caches(b: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    write_kv_cache_ref(b.key, b.value, k_cache, v_cache, b.meta.slot_mapping)
    return k_cache, v_cache


def test_write_and_attend_gives_the_reference_caches_and_output(monkeypatch):
    """The model's entry point, on the Triton path (the KV-write kernel, then attention):
    the reference's caches and output for a decode step and for a mixed one."""
    from ondo.kernels import attention

    monkeypatch.setattr(attention, "_use_triton", lambda t: True)
    for query_lens, context_lens in (([1, 1, 1], [40, 3, 77]), ([5, 1, 0], [21, 18, 4])):
        b = _batch(query_lens, context_lens, heads=(8, 2), head_dim=64)
        k_ref, v_ref = _reference_caches(b)
        expect = _reference(b)
        out = attention.write_and_attend(b.query, b.key, b.value, b.k_cache, b.v_cache, b.meta, 64**-0.5)
        torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
        assert torch.equal(b.k_cache, k_ref) and torch.equal(b.v_cache, v_ref)


@pytest.mark.parametrize("split", [32, 64, 96])
def test_decode_graph_split_set_at_replay_equals_reference_and_the_fixed_split(split):
    """A CUDA graph's decode launch: a grid sized for the longest context allowed (4,096
    tokens: 16 splits here), the split's tokens read from the device as each replay sets
    them. Splits past a context's end write nothing, and the reduction must skip them."""
    b = _batch([1, 1, 1], [150, 20, 96], heads=(8, 2), head_dim=64, block_size=16)
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    scale = 64**-0.5
    graph_meta = dataclasses.replace(b.meta, max_context_len=4096, decode_split_tokens=torch.tensor(
        [split], dtype=torch.int32, device=DEVICE))
    from_device = paged_decode_attention_triton(b.query, b.k_cache, b.v_cache, graph_meta, scale)
    fixed = paged_decode_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale, split_tokens=split)
    torch.testing.assert_close(from_device, _reference(b), atol=ATOL, rtol=RTOL)
    assert torch.equal(from_device, fixed)  # the same splits, summed in the same order


def test_graph_split_follows_the_steps_contexts_within_the_graphs_grid():
    # The graph of 8 rows captured for 4,096 tokens (8 kv heads, 132 SMs, 64-token tiles):
    # 5 splits of 832 tokens. Replayed by 7 rows of at most 1,900 tokens: 5 splits of 384,
    # as an eager step of those rows chooses, where the captured split left 2 of 5 idle.
    assert decode_splits(8, 8, 4096, 64, 132) == (832, 5)
    assert graph_split_tokens(7, 1900, 8, 4096, 8, 64, 132) == decode_splits(7, 8, 1900, 64, 132)[0] == 384
    # Short contexts are not cut below 256 tokens: 2 splits of 192 (whole tiles).
    assert graph_split_tokens(7, 300, 8, 4096, 8, 64, 132) == 192
    # 2 rows replaying the graph of 4 rows (8 splits) would split 4,000 tokens 16 ways;
    # the grid holds 8, so the context is spread over those.
    assert decode_splits(4, 8, 4096, 64, 132)[1] == 8
    assert graph_split_tokens(2, 4000, 4, 4096, 8, 64, 132) == 512
    for rows, graph_rows in ((1, 2), (3, 4), (5, 8), (40, 48), (250, 256)):
        grid = decode_splits(graph_rows, 8, 4096, 64, 132)[1]
        for context in (1, 17, 255, 256, 1000, 2049, 4096):
            split = graph_split_tokens(rows, context, graph_rows, 4096, 8, 64, 132)
            assert split % 64 == 0 and split > 0
            assert math.ceil(context / split) <= grid, (rows, graph_rows, context, split, grid)


def test_decode_split_heuristic_fills_the_gpu_only_when_needed():
    # One sequence, 8 kv heads: 8 programs for 132 SMs, so a 32k context is split.
    one_seq = decode_split_tokens(1, 8, 32768, block_n=64, num_sms=132)
    assert one_seq == 1024  # 32 splits -> 256 programs, about two waves
    # 64 sequences x 8 kv heads already give 512 programs: no split.
    assert decode_split_tokens(64, 8, 2048, block_n=64, num_sms=132) >= 2048
    # Short contexts are never cut below 256 tokens per split.
    assert decode_split_tokens(1, 8, 512, block_n=64, num_sms=132) == 256



@pytest.mark.parametrize("split_tokens", [None, 64])
def test_decode_grid_with_a_rows_heads_side_by_side_gives_the_same_output(split_tokens, monkeypatch):
    # The grid (kv heads, rows, splits) runs the same programs as (rows, kv heads, splits).
    b = _batch([1, 1, 0, 1, 1], [150, 7, 12, 300, 64], heads=(8, 2), head_dim=64, block_size=8)
    outs = {}
    for inner in (False, True):
        outs[inner] = _write_then_attend(
            b, lambda *a, i=inner: paged_decode_attention_triton(*a, split_tokens=split_tokens, heads_inner=i))
    assert torch.equal(outs[True], outs[False])  # every token is a decode row's
    torch.testing.assert_close(outs[True], _reference(b), atol=ATOL, rtol=RTOL)
    # By default the grid follows ONDO_DECODE_LONGEST_FIRST: (kv heads, rows, splits) with it.
    import ondo.kernels.triton_attention as ta

    grids = []

    def launch(kernel, grid, *args, **kwargs):
        grids.append((kernel, grid))
        return real_launch(kernel, grid, *args, **kwargs)

    real_launch = ta.launch
    monkeypatch.setattr(ta, "launch", launch)
    for flag in ("0", "1"):
        monkeypatch.setenv("ONDO_DECODE_LONGEST_FIRST", flag)
        by_switch = _write_then_attend(b, lambda *a: paged_decode_attention_triton(*a, split_tokens=split_tokens))
        assert torch.equal(by_switch, outs[True])
    split_grids = [grid for kernel, grid in grids if kernel is ta._decode_split_kernel]
    assert [g[:2] for g in split_grids] == [(5, 2), (2, 5)]


def test_a_split_cap_cuts_long_contexts_at_any_batch_size(monkeypatch):
    # 240 rows x 8 kv heads fill the GPU without a split; with a 512-token cap the graph
    # captured for 4,096 tokens holds 8 splits, and a replay whose longest context is
    # 2,000 tokens cuts each at 512: its programs read at most 512 tokens each.
    assert decode_splits(240, 8, 4096, 64, 132) == (4096, 1)
    monkeypatch.setenv("ONDO_DECODE_SPLIT_MAX_TOKENS", "512")
    assert decode_splits(240, 8, 4096, 64, 132) == (512, 8)
    assert graph_split_tokens(240, 2000, 240, 4096, 8, 64, 132) == 512
    assert decode_splits(8, 8, 4096, 64, 132) == (512, 8)  # was 5 splits of 832
    assert decode_split_tokens(2, 8, 4096, block_n=64, num_sms=132) == 256  # small batches: as before
    # A cap below a tile is a tile; the grid never passes MAX_DECODE_SPLITS.
    monkeypatch.setenv("ONDO_DECODE_SPLIT_MAX_TOKENS", "10")
    assert decode_splits(240, 8, 4096, 64, 132) == (64, 64)
    assert decode_splits(240, 8, 32768, 64, 132) == (512, 64)
    for bad in ("-1", "half"):
        monkeypatch.setenv("ONDO_DECODE_SPLIT_MAX_TOKENS", bad)
        with pytest.raises(ValueError, match="ONDO_DECODE_SPLIT_MAX_TOKENS"):
            decode_splits(240, 8, 4096, 64, 132)

# ------------------------------------------------------------------ prefill / extend


def test_prefill_matches_reference_on_fresh_prompts():
    # Whole prompts (no cached prefix), several query tiles each, ragged, MHA.
    b = _batch([40, 7, 19], [40, 7, 19], heads=(4, 4), head_dim=64, block_size=16)
    out = _write_then_attend(b, paged_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "heads, head_dim",
    [((8, 2), 64), ((8, 1), 128)],  # GQA 4 and GQA 8
)
def test_chunked_prefill_attends_to_cached_prefix(heads, head_dim):
    # Chunks of 9 and 13 new tokens after 30 and 51 cached ones; both end mid-block.
    b = _batch([9, 13], [39, 64], heads=heads, head_dim=head_dim, block_size=16)
    out = _write_then_attend(b, paged_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_mixed_batch_of_prefill_chunks_decode_rows_and_idle_sequences():
    # Decode rows (1), a chunked prefill (6 of 45), an idle sequence (0), a fresh
    # prompt (11), with block size 8 so contexts span many shuffled blocks.
    b = _batch([1, 6, 0, 1, 11], [33, 45, 20, 1, 11], heads=(16, 2), head_dim=64, block_size=8)
    out = _write_then_attend(b, paged_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_mixed_batch_decode_rows_split_off_match_the_prefill_kernels_own():
    # Decode rows beside prompts go to the decode kernel (split_decode_rows), with
    # contexts long enough for several K/V tiles; the output must not depend on which
    # kernel took them.
    b = _batch([1, 40, 1, 0, 1, 23], [150, 70, 9, 20, 64, 90], heads=(8, 2), head_dim=64,
               block_size=8)
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    scale = 64**-0.5
    split = paged_prefill_attention_triton(
        b.query, b.k_cache, b.v_cache, b.meta, scale, split_decode_rows=True
    )
    whole = paged_prefill_attention_triton(
        b.query, b.k_cache, b.v_cache, b.meta, scale, split_decode_rows=False
    )
    expect = _reference(b)
    torch.testing.assert_close(split, expect, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(whole, expect, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("flag", [None, 0, 1])
def test_without_host_query_lengths_the_device_flag_picks_the_kernel(flag):
    # As under a CUDA graph's capture: no host copy of the query lengths, so the split
    # is read from the device (both kernels launched, each skipping the other's rows),
    # or, with no flag, the prefill kernel takes every row.
    b = _batch([1, 37, 1, 5], [100, 50, 9, 5], heads=(8, 2), head_dim=64, block_size=8)
    expect = _reference(b)
    b.meta.query_lens_cpu = None
    if flag is not None:
        b.meta.split_decode_rows = torch.tensor([flag], dtype=torch.int32, device=DEVICE)
    out = _write_then_attend(b, paged_prefill_attention_triton)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)


def test_metadata_counts_single_token_sequences_from_host_lengths():
    b = _batch([1, 40, 0, 1, 23, 1], [150, 70, 20, 9, 90, 1], heads=(8, 2), head_dim=64)
    assert b.meta.num_single_token_seqs == 3
    b = _batch([1, 2], [5, 5], heads=(8, 2), head_dim=64)
    b.meta.query_lens_cpu = None
    assert b.meta.num_single_token_seqs is None


def test_decode_rows_are_split_off_once_their_programs_make_two_waves():
    assert not splits_decode_rows(2, 8, 132)  # a light load: 16 programs
    assert not splits_decode_rows(32, 8, 132)  # 256 programs, under two waves of 132
    assert splits_decode_rows(33, 8, 132)
    assert splits_decode_rows(60, 8, 132)  # W3's steps
    assert not splits_decode_rows(60, 2, 132)  # fewer kv heads: fewer programs per row


def test_a_row_count_from_the_environment_replaces_the_split_rule(monkeypatch):
    monkeypatch.setenv(MIXED_SPLIT_MIN_ROWS_ENV, "100")
    assert not splits_decode_rows(60, 8, 132)
    assert splits_decode_rows(100, 8, 132)
    assert splits_decode_rows(255, 2, 132)
    monkeypatch.setenv(MIXED_SPLIT_MIN_ROWS_ENV, "1")
    assert splits_decode_rows(1, 8, 132)


def test_metadata_sums_prompt_pairs_and_decode_context_tokens():
    b = _batch([1, 40, 0, 1, 23], [150, 70, 20, 9, 23], heads=(8, 2), head_dim=64)
    # 40 new tokens over 70 (30 cached): 40*70 - 40*39/2 = 2020 pairs; 23 over 23: 276.
    assert b.meta.prompt_pairs_and_decode_tokens == (2020 + 276, 150 + 9)
    b = _batch([1, 2], [5, 5], heads=(8, 2), head_dim=64)
    b.meta.query_lens_cpu = None
    assert b.meta.prompt_pairs_and_decode_tokens is None


def test_by_work_decode_rows_are_split_off_only_beside_light_prompts(monkeypatch):
    # A short prompt beside a full batch of decodes: split off. Long prompts beside them
    # (W3's step, W1's first steps): the prefill kernel takes them. Each check is a new
    # step: a step keeps its first choice (see the test below).
    def light():
        return _batch([128] + [1] * 40, [128] + [1024] * 40, heads=(8, 2), head_dim=64).meta

    def heavy():
        return _batch([512] * 2 + [1] * 40, [512] * 2 + [600] * 40, heads=(8, 2), head_dim=64).meta

    prompts_only = _batch([64, 32], [64, 40], heads=(8, 2), head_dim=64)
    assert splits_mixed_step(light(), 2, 132) is True  # by work: the default
    monkeypatch.setenv(MIXED_SPLIT_BY_WORK_ENV, "0")
    assert splits_mixed_step(light(), 2, 132) is False  # the waves rule: 80 programs
    assert splits_mixed_step(heavy(), 2, 132) is False
    monkeypatch.setenv(MIXED_SPLIT_BY_WORK_ENV, "1")
    assert splits_mixed_step(light(), 2, 132) is True
    assert splits_mixed_step(heavy(), 2, 132) is False
    assert splits_mixed_step(prompts_only.meta, 2, 132) is False
    monkeypatch.setenv(MIXED_SPLIT_MIN_ROWS_ENV, "41")  # a row count overrides the work
    assert splits_mixed_step(light(), 2, 132) is False
    monkeypatch.setenv(MIXED_SPLIT_MIN_ROWS_ENV, "40")
    assert splits_mixed_step(light(), 2, 132) is True
    monkeypatch.delenv(MIXED_SPLIT_MIN_ROWS_ENV)
    monkeypatch.setenv(MIXED_SPLIT_BY_WORK_ENV, "yes")
    with pytest.raises(ValueError, match=MIXED_SPLIT_BY_WORK_ENV):
        splits_mixed_step(light(), 2, 132)


def test_a_step_decides_its_split_once_for_all_layers(monkeypatch):
    # The first layer's call decides; the later layers' calls on the same step's metadata
    # neither read the switches again nor change the choice. A new step decides anew.
    meta = _batch([128] + [1] * 40, [128] + [1024] * 40, heads=(8, 2), head_dim=64).meta
    assert splits_mixed_step(meta, 2, 132) is True
    monkeypatch.setenv(MIXED_SPLIT_BY_WORK_ENV, "yes")  # would be refused if read again
    assert all(splits_mixed_step(meta, 2, 132) is True for _ in range(28))
    monkeypatch.setenv(MIXED_SPLIT_BY_WORK_ENV, "0")
    assert splits_mixed_step(meta, 2, 132) is True
    fresh = _batch([128] + [1] * 40, [128] + [1024] * 40, heads=(8, 2), head_dim=64).meta
    assert splits_mixed_step(fresh, 2, 132) is False  # the waves rule, read for the new step


def test_overlapping_a_mixed_steps_decode_rows_sends_them_all_to_the_decode_kernel(monkeypatch):
    # W3's step: four prompts beside decode rows, which the by-work rule keeps in the
    # prefill kernel; with the decode kernel on a stream of its own they all go there.
    def w3():
        return _batch([256] * 4 + [1] * 12, [256] * 4 + [300] * 12, heads=(8, 2), head_dim=64).meta

    assert splits_mixed_step(w3(), 2, 132) is False
    monkeypatch.setenv(MIXED_DECODE_OVERLAP_ENV, "1")
    assert splits_mixed_step(w3(), 2, 132) is True
    prompts_only = _batch([64, 32], [64, 40], heads=(8, 2), head_dim=64).meta
    assert splits_mixed_step(prompts_only, 2, 132) is False  # no decode rows: nothing to send
    monkeypatch.setenv(MIXED_SPLIT_MIN_ROWS_ENV, "13")  # an explicit row count still rules
    assert splits_mixed_step(w3(), 2, 132) is False
    monkeypatch.delenv(MIXED_SPLIT_MIN_ROWS_ENV)
    monkeypatch.setenv(MIXED_DECODE_OVERLAP_ENV, "2")
    with pytest.raises(ValueError, match=MIXED_DECODE_OVERLAP_ENV):
        splits_mixed_step(w3(), 2, 132)


@pytest.mark.parametrize("switch", [MIXED_DECODE_OVERLAP_ENV, MIXED_DECODE_BESIDE_ENV])
def test_prefill_kernel_with_overlapped_decode_rows_matches_the_reference(switch, monkeypatch):
    # On a CPU there is no second stream: the same kernels run one after the other.
    monkeypatch.setenv(switch, "1")
    b = _batch([40, 1, 33, 1, 1], [40, 90, 70, 17, 200], heads=(8, 2), head_dim=64)
    out = _write_then_attend(b, paged_prefill_attention_triton)
    assert list(b.meta.split_choices.values()) == [True]  # the decode rows went to a decode kernel
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_decode_rows_beside_the_prompts_read_the_flag_in_a_graph_shaped_batch(monkeypatch):
    # ONDO_MIXED_DECODE_BESIDE=1 in a capture's metadata (no host lengths): the persistent
    # kernel walks every (sequence, kv head) pair, writes the decode rows where the device's
    # flag says so and leaves them to the prefill kernel where it holds 0.
    monkeypatch.setenv(MIXED_DECODE_BESIDE_ENV, "1")
    b = _batch([40, 1, 33, 1, 1], [40, 90, 70, 17, 200], heads=(8, 2), head_dim=64)
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    expect = _reference(b)
    for flag in (1, 0):
        meta = dataclasses.replace(b.meta, query_lens_cpu=None, context_lens_cpu=None, split_choices={},
                                   split_decode_rows=torch.tensor([flag], dtype=torch.int32))
        out = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, meta, b.query.shape[-1] ** -0.5)
        torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)


def test_the_persistent_decode_kernel_walks_more_pairs_than_it_has_programs(monkeypatch):
    import ondo.kernels.triton_attention as ta

    monkeypatch.setattr(ta, "_sm_count", lambda t: 2)  # 4 programs for 5 rows x 2 kv heads
    monkeypatch.setenv(MIXED_DECODE_BESIDE_ENV, "1")
    b = _batch([25, 1, 1, 1, 1, 1], [25, 60, 3, 41, 100, 18], heads=(4, 2), head_dim=32)
    out = _write_then_attend(b, paged_prefill_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_a_step_without_decode_rows_splits_nothing_without_summing_its_work(monkeypatch):
    meta = _batch([64, 32], [64, 40], heads=(8, 2), head_dim=64).meta
    assert splits_mixed_step(meta, 2, 132) is False
    assert "prompt_pairs_and_decode_tokens" not in vars(meta)  # the pairs were never summed


@pytest.mark.parametrize("decode_ctx", [24, 300])
def test_prefill_kernel_by_work_matches_reference(monkeypatch, decode_ctx):
    # One 40-token prompt beside 6 decode rows: split off at 300 context tokens each
    # (820 pairs < 1800 tokens), kept in the prefill kernel at 24 (820 > 144).
    monkeypatch.setenv(MIXED_SPLIT_BY_WORK_ENV, "1")
    b = _batch([40] + [1] * 6, [40] + [decode_ctx + i for i in range(6)], heads=(8, 2), head_dim=64)
    assert splits_mixed_step(b.meta, 2, 132) is (decode_ctx == 300)
    out = _write_then_attend(b, paged_prefill_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5", ""])
def test_a_bad_split_row_count_is_refused_with_the_variables_name(monkeypatch, value):
    monkeypatch.setenv(MIXED_SPLIT_MIN_ROWS_ENV, value)
    with pytest.raises(ValueError, match=MIXED_SPLIT_MIN_ROWS_ENV):
        splits_decode_rows(60, 8, 132)


@pytest.mark.parametrize("tiles", [(32, 16, 4, 1), (16, 64, 4, 1)])
def test_prefill_with_other_tiles_matches_reference(tiles):
    # Query tiles of 32 rows (16 tokens of a GQA-2 group) and K/V tiles of 16 or 64 tokens.
    b = _batch([40, 1, 23], [40, 70, 90], heads=(8, 4), head_dim=64, block_size=8)
    out = _write_then_attend(
        b, lambda *a: paged_prefill_attention_triton(*a, tiles=PrefillTiles(*tiles))
    )
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_prefill_tiles_wholly_below_the_query_skip_the_mask_without_changing_output():
    # A long cached prefix (several unmasked K/V tiles) and a chunk that ends on a tile
    # edge and one that does not.
    b = _batch([32, 17], [160, 113], heads=(4, 2), head_dim=64, block_size=16)
    out = _write_then_attend(b, paged_prefill_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_prefill_kernel_handles_decode_only_batches_too():
    # The prefill kernel is a superset: it must agree on a batch the decode kernel owns.
    b = _batch([1, 1], [29, 64], heads=(8, 2), head_dim=128)
    out = _write_then_attend(b, paged_prefill_attention_triton)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)


def test_prefill_tiles_started_longest_first_give_the_same_output():
    # A long prompt, a chunk over a cached prefix, decode rows and an empty sequence: the
    # programs taken from the grid's end compute exactly what they compute in grid order.
    b = _batch([70, 1, 23, 1, 0, 9], [70, 40, 90, 17, 11, 9], heads=(8, 2), head_dim=64, block_size=8)
    outs = {}
    for first in (False, True):
        tiles = PrefillTiles(16, 32, 4, 1, first)
        outs[first] = _write_then_attend(b, lambda *a, t=tiles: paged_prefill_attention_triton(*a, tiles=t))
    assert torch.equal(outs[True], outs[False])
    torch.testing.assert_close(outs[True], _reference(b), atol=ATOL, rtol=RTOL)


def _strided_value(b: PagedBatch) -> PagedBatch:
    """The batch with V a view of a wider projection, as the model hands it over (K/V
    rows of 3 * Hkv * D elements), holding the same values."""
    t, h, d = b.value.shape
    wide = torch.full((t, 3 * h * d), float("nan"), dtype=b.value.dtype, device=b.value.device)
    view = wide[:, 2 * h * d:].view(t, h, d)
    view.copy_(b.value)
    return dataclasses.replace(b, value=view)


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("tiles", [(16, 32, 4, 1, False), (32, 16, 4, 1, True)])
def test_prefill_reading_the_steps_own_kv_matches_reference(mode, tiles):
    # Fresh prompts (one ending inside a K/V tile, one on a tile edge), a chunk over a
    # prefix that ends inside a tile and one over a whole-tile prefix, decode rows, an
    # idle sequence, and K/V tokens past the last sequence (a graph's padding: NaN).
    b = _strided_value(_batch([70, 1, 23, 1, 0, 32, 16, 9], [70, 40, 90, 17, 11, 32, 48, 9], heads=(8, 2),
                              head_dim=64, block_size=8))
    out = _write_then_attend(
        b, lambda *a: paged_prefill_attention_triton(*a, tiles=PrefillTiles(*tiles), key=b.key, value=b.value,
                                                     new_kv=mode))
    expect = _reference(b)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    cached = _write_then_attend(b, lambda *a: paged_prefill_attention_triton(*a, tiles=PrefillTiles(*tiles)))
    torch.testing.assert_close(out, cached, atol=ATOL, rtol=RTOL)
    # The new tokens' keys really come from `key` now: other values there, not in the
    # cache, change every row (each sees its own new key) but a fresh prompt's first,
    # whose softmax over a single key is 1 whatever the key.
    other = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, 64 ** -0.5,
                                           tiles=PrefillTiles(*tiles), key=b.key.flip(0), value=b.value, new_kv=mode)
    changed = (other - out).abs().amax(dim=(1, 2)) > 1e-3
    starts, lens = b.meta.query_start_loc.tolist(), b.meta.context_lens_cpu
    alone = [starts[i] for i, q in enumerate(b.meta.query_lens_cpu) if 0 < q == lens[i]]
    assert changed.nonzero().flatten().tolist() == [i for i in range(len(changed)) if i not in alone]


@pytest.mark.parametrize("mode", [1, 2])
def test_prefill_reading_the_steps_own_kv_ignores_padding_tokens(mode):
    # The step's K/V hold 5 more tokens than its sequences own (a CUDA graph's padding),
    # all NaN: no sequence may see them, in a masked tile or out of one.
    b = _batch([19, 1, 12], [19, 30, 40], heads=(4, 2), head_dim=32, block_size=16)
    pad = torch.full((5, *b.key.shape[1:]), float("nan"), device=b.key.device)
    key, value = torch.cat([b.key, pad]), torch.cat([b.value, pad])
    query = torch.cat([b.query, torch.zeros(5, *b.query.shape[1:], device=b.query.device)])
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    out = paged_prefill_attention_triton(query, b.k_cache, b.v_cache, b.meta, 32 ** -0.5,
                                         tiles=PrefillTiles(16, 16, 4, 1), key=key, value=value, new_kv=mode)
    torch.testing.assert_close(out[:32], _reference(b), atol=ATOL, rtol=RTOL)


def test_the_prefill_new_kv_switch(monkeypatch):
    k = torch.zeros(4, 2, 64)
    monkeypatch.delenv("ONDO_PREFILL_NEW_KV", raising=False)
    assert new_kv_mode(k, k) == 1  # on by default; no tensor descriptors on a CPU
    assert new_kv_mode(None, None, new_kv=2) == 0  # nothing to read from
    monkeypatch.setenv("ONDO_PREFILL_NEW_KV", "0")
    assert new_kv_mode(k, k) == 0
    assert new_kv_mode(k, k, new_kv=2) == 2
    monkeypatch.setenv("ONDO_PREFILL_NEW_KV", "1")
    assert new_kv_mode(k, k) == 1
    monkeypatch.setenv("ONDO_PREFILL_NEW_KV", "yes")
    with pytest.raises(ValueError, match="ONDO_PREFILL_NEW_KV"):
        new_kv_mode(k, k)


def test_the_prefill_longest_first_switch(monkeypatch):
    q, kc = torch.zeros(1, 4, 64), torch.zeros(1, 16, 2, 64)
    assert not prefill_tiles(q, kc).longest_first  # off by default
    monkeypatch.setenv("ONDO_PREFILL_LONGEST_FIRST", "1")
    assert prefill_tiles(q, kc).longest_first
    monkeypatch.setenv("ONDO_PREFILL_LONGEST_FIRST", "on")
    with pytest.raises(ValueError, match="ONDO_PREFILL_LONGEST_FIRST must be 0 or 1"):
        prefill_tiles(q, kc)


@pytest.mark.parametrize("longest_first", ["0", "1"])
@pytest.mark.parametrize("split_flag", [None, 0, 1])
def test_prefill_kernel_on_a_graph_shaped_batch_ignores_padding(split_flag, longest_first, monkeypatch):
    """As a CUDA graph replays it: more token rows than the batch has (padding of no
    sequence, slot -1), trailing sequences with no new tokens and stale context lengths,
    wider block tables, and a max_query_len that is the padded size. The batch's own
    rows must come out as without the padding, whichever end of the grid starts."""
    monkeypatch.setenv("ONDO_PREFILL_LONGEST_FIRST", longest_first)
    b = _batch([1, 37, 1, 0, 5], [20, 50, 9, 12, 5], heads=(8, 2), head_dim=64, block_size=8)
    expect = _reference(b)
    total, pad_tokens, num_seqs = b.query.shape[0], 23, 8
    gen = torch.Generator().manual_seed(5)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.randn(pad_tokens, *t.shape[1:], generator=gen).to(t)])

    m = b.meta
    extra = num_seqs - m.num_seqs
    tables = torch.zeros(num_seqs, m.block_tables.shape[1] + 4, dtype=torch.int32, device=DEVICE)
    tables[: m.num_seqs, : m.block_tables.shape[1]] = m.block_tables
    meta = type(m)(
        slot_mapping=torch.cat([m.slot_mapping, torch.full((pad_tokens,), -1, dtype=torch.int64, device=DEVICE)]),
        block_tables=tables,
        context_lens=torch.cat([m.context_lens, torch.full((extra,), 30, dtype=torch.int32, device=DEVICE)]),
        query_start_loc=torch.cat([m.query_start_loc,
                                   torch.full((extra,), total, dtype=torch.int32, device=DEVICE)]),
        max_query_len=total + pad_tokens, max_context_len=m.max_context_len, block_size=m.block_size,
        split_decode_rows=None if split_flag is None else torch.tensor([split_flag], dtype=torch.int32,
                                                                      device=DEVICE),
    )
    graph_shaped = PagedBatch(padded(b.query), padded(b.key), padded(b.value), b.k_cache, b.v_cache, meta)
    out = _write_then_attend(graph_shaped, paged_prefill_attention_triton)
    assert out.shape[0] == total + pad_tokens
    torch.testing.assert_close(out[:total], expect, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("heads", [(8, 2), (16, 1)])
def test_decode_rows_in_a_tile_of_their_own_match_the_reference(mode, heads, monkeypatch):
    """ONDO_PREFILL_DECODE_TILE=1: a decode row that stays in the prefill kernel takes a
    tile of its query heads (16 rows) instead of a prompt tile (32 here); prompts, chunks
    and idle sequences beside it keep theirs. Both give the reference's output, and the
    prompts' rows the same bits as without the switch."""
    b = _strided_value(_batch([70, 1, 23, 1, 0, 1, 9], [70, 40, 90, 17, 11, 130, 9], heads=heads,
                              head_dim=64, block_size=8))
    tiles = PrefillTiles(32, 16, 4, 1)

    def attend(*a):
        return paged_prefill_attention_triton(*a, split_decode_rows=False, tiles=tiles, key=b.key,
                                              value=b.value, new_kv=mode)

    monkeypatch.setenv(PREFILL_DECODE_TILE_ENV, "0")
    before = _write_then_attend(b, attend)
    monkeypatch.setenv(PREFILL_DECODE_TILE_ENV, "1")
    out = _write_then_attend(b, attend)
    torch.testing.assert_close(out, _reference(b), atol=ATOL, rtol=RTOL)
    starts = b.meta.query_start_loc.tolist()
    decode_rows = [starts[i] for i, q in enumerate(b.meta.query_lens_cpu) if q == 1]
    prompt_rows = [r for r in range(out.shape[0]) if r not in decode_rows]
    assert torch.equal(out[prompt_rows], before[prompt_rows])


def test_the_prefill_decode_tile_switch(monkeypatch):
    monkeypatch.delenv(PREFILL_DECODE_TILE_ENV, raising=False)
    assert decode_tile_rows(2, 64) == 16  # on by default: a tensor-core tile at least
    monkeypatch.setenv(PREFILL_DECODE_TILE_ENV, "0")
    assert decode_tile_rows(2, 64) == 0  # a prompt tile
    monkeypatch.setenv(PREFILL_DECODE_TILE_ENV, "1")
    assert decode_tile_rows(32, 64) == 32  # a row's query heads
    assert decode_tile_rows(2, 16) == 0  # no smaller than a prompt tile already
    monkeypatch.setenv(PREFILL_DECODE_TILE_ENV, "2")
    with pytest.raises(ValueError, match="ONDO_PREFILL_DECODE_TILE must be 0 or 1"):
        decode_tile_rows(2, 64)


def test_fp16_inputs_keep_fp16_output_close_to_fp32_reference():
    b = _batch([5, 1], [21, 18], heads=(8, 2), head_dim=64)
    expect = _reference(b)
    half = PagedBatch(
        b.query.half(), b.key.half(), b.value.half(), b.k_cache.half(), b.v_cache.half(), b.meta
    )
    out = _write_then_attend(half, paged_attention_triton)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expect, atol=5e-3, rtol=5e-3)
