"""Automatic prefix caching: the block manager's hash chain, LRU eviction, sharing and
swapping with no model; then the engine on a tiny checkpoint, with caching on and off."""

from __future__ import annotations

import random

import pytest

from ondo import LLM, SamplingParams
from ondo.bench.sharing_workloads import (
    run_and_measure_peak_kv_blocks,
    w4_shared_system_prompt,
    w5_parallel_sampling,
)
from ondo.engine.block_manager import BlockManager, hash_block_tokens
from ondo.engine.scheduler import Scheduler
from ondo.engine.sequence import Sequence
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

BS = 4


def make_seq(i: int, tokens: list[int], max_tokens: int = 100) -> Sequence:
    return Sequence(i, f"r{i}", list(tokens), SamplingParams(max_tokens=max_tokens), float(i))


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit and compute a whole prompt, as a step of the engine would."""
    cached = bm.find_cached_prefix(seq)
    assert bm.allocate_with_prefix(seq, cached, seq.num_tokens - len(cached) * BS)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


# -- block manager, no model --------------------------------------------------------


def test_block_hash_chains_parent_tokens_and_extra_key():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, (1, 2, 3, 4))
    assert a != hash_block_tokens(None, [1, 2, 3, 5])
    assert a != hash_block_tokens(None, [1, 2, 3, 4], extra_key="lora-1")
    b = hash_block_tokens(a, [5, 6, 7, 8])
    # Same tokens after a different first block: a different block.
    assert b != hash_block_tokens(hash_block_tokens(None, [9, 2, 3, 4]), [5, 6, 7, 8])


def test_only_full_computed_blocks_are_cached_and_the_last_token_is_left_to_compute():
    bm = BlockManager(16, 0, BS)
    a = make_seq(0, list(range(1, 11)))  # 10 tokens: 2 full blocks + 2 tokens
    cached = bm.find_cached_prefix(a)
    assert cached == []
    assert bm.allocate_with_prefix(a, cached, 6)  # a chunk: only the first block is full
    a.num_computed_tokens = 6
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 1
    assert bm.allocate_slots(a, 4)
    # Registering waits for the K/V: not before the step that computes them is done.
    assert bm.num_cached_blocks == 1
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 2  # the partial third block is never cached

    b = make_seq(1, list(range(1, 11)) + [50, 51])
    assert bm.find_cached_prefix(b) == a.block_table[:2]
    # A prompt exactly two blocks long may take only the first: its last token needs logits.
    c = make_seq(2, list(range(1, 9)))
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    d = make_seq(3, [99] + list(range(2, 11)))  # differs in the first token: no hit at all
    assert bm.find_cached_prefix(d) == []
    bm.extra_key = "another-model"
    assert bm.find_cached_prefix(make_seq(4, list(range(1, 11)) + [7])) == []


def test_shared_prefix_blocks_are_reference_counted_and_freed_blocks_stay_cached():
    bm = BlockManager(16, 0, BS)
    a, b = make_seq(0, list(range(1, 14))), make_seq(1, list(range(1, 13)) + [77, 78])
    prefill(bm, a)  # 13 tokens: 4 blocks, 3 full
    prefill(bm, b)  # 14 tokens: shares a's 3 full blocks, 1 of its own
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert b.num_computed_tokens == 14
    assert [bm.gpu.ref_counts[x] for x in a.block_table] == [2, 2, 2, 1]
    assert bm.num_shared_blocks == 3 and bm.num_used_blocks == 5
    assert bm.prefix_cache_queries == 13 + 14 and bm.prefix_cache_hits == 12
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.gpu.ref_counts)
    assert bm.num_cached_blocks == 3  # still valid, still found
    c = make_seq(2, list(range(1, 13)) + [5])
    assert len(bm.find_cached_prefix(c)) == 3


def test_eviction_takes_the_least_recently_freed_block_tail_first():
    bm = BlockManager(6, 0, BS)
    a = make_seq(0, list(range(1, 9)) + [0])  # 2 full blocks + 1 token
    b = make_seq(1, list(range(21, 29)) + [0])
    prefill(bm, a)
    prefill(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)  # freed first: evicted first, its tail block before its head
    bm.free(b)
    assert list(bm.gpu.free_blocks) == [*reversed(a_blocks), *reversed(b_blocks)]
    assert bm.num_cached_blocks == 4
    c = make_seq(2, list(range(41, 45)) + [0])  # 2 blocks: a's unhashed tail and a's second block
    prefill(bm, c)
    assert c.block_table == [a_blocks[2], a_blocks[1]]
    assert bm.num_cached_blocks == 4  # a's second block evicted, c's first registered
    assert len(bm.find_cached_prefix(make_seq(3, list(range(1, 9)) + [0]))) == 1
    assert len(bm.find_cached_prefix(make_seq(4, list(range(21, 29)) + [0]))) == 2
    # A hit on a cached free block takes it off the free list: it is not evicted.
    d = make_seq(5, list(range(21, 29)) + [1])
    prefill(bm, d)
    assert d.block_table[:2] == b_blocks[:2] and bm.gpu.ref_counts[b_blocks[0]] == 1


def test_prefix_caching_off_never_hits():
    bm = BlockManager(16, 0, BS, enable_prefix_caching=False)
    a, b = make_seq(0, list(range(1, 14))), make_seq(1, list(range(1, 14)))
    prefill(bm, a)
    prefill(bm, b)
    assert bm.num_cached_blocks == 0 and bm.num_shared_blocks == 0
    assert bm.prefix_cache_hits == 0 and b.block_table[0] != a.block_table[0]


def test_swap_out_of_shared_blocks_keeps_them_and_swap_in_retakes_cached_ones():
    bm = BlockManager(16, 16, BS)
    a, b = make_seq(0, list(range(1, 14))), make_seq(1, list(range(1, 13)) + [77, 78])
    prefill(bm, a)
    prefill(bm, b)
    shared = a.block_table[:3]
    out = bm.swap_out(b)
    assert [g for g, _ in out][:3] == shared and len(out) == 4
    # a still holds the shared blocks: none of them went to the free list.
    assert [bm.gpu.ref_counts[x] for x in shared] == [1, 1, 1]
    assert not set(shared) & set(bm.gpu.free_blocks)
    back = bm.swap_in(b)
    # The 3 shared full blocks are cached on the GPU: taken again, no copy; the partial one is copied.
    assert b.block_table[:3] == shared and len(back) == 1 and back[0][0] == out[3][1]
    assert bm.num_cpu_blocks_used == 0 and bm.num_shared_blocks == 3
    # Swapped out alone, its cached blocks stay cached (free) until something evicts them.
    bm.free(a)
    bm.swap_out(b)
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks == 3
    back = bm.swap_in(b)
    assert b.block_table[:3] == shared and len(back) == 1
    bm.free(b)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.gpu.ref_counts + bm.cpu.ref_counts)


def test_copy_on_write_copies_a_shared_partial_block_once_per_writer_but_the_last():
    bm = BlockManager(16, 0, BS)
    parent = make_seq(0, list(range(1, 11)))  # 10 tokens: the third block is partial
    prefill(bm, parent)
    kids = [make_seq(i, parent.token_ids) for i in (1, 2, 3)]
    for kid in kids:
        kid.num_computed_tokens = parent.num_computed_tokens
        bm.fork(parent, kid)
    assert [bm.gpu.ref_counts[x] for x in parent.block_table] == [4, 4, 4]
    partial = parent.block_table[2]
    for seq in [parent, *kids]:
        seq.token_ids.append(5)
        assert bm.allocate_slots(seq, 1)
    copies = bm.take_copies()
    assert [src for src, _ in copies] == [partial] * 3 and bm.num_cow_copies == 3
    assert kids[-1].block_table[2] == partial  # the last writer keeps the original
    assert len({s.block_table[2] for s in [parent, *kids]}) == 4
    assert [bm.gpu.ref_counts[x] for x in parent.block_table] == [4, 4, 1]
    assert bm.take_copies() == []


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(3, 0, BS)
    parent = make_seq(0, list(range(1, 11)))
    prefill(bm, parent)
    kid = make_seq(1, parent.token_ids)
    kid.num_computed_tokens = 10
    bm.fork(parent, kid)
    assert not bm.allocate_slots(kid, 1)
    assert kid.block_table == parent.block_table and bm.take_copies() == []


def test_scheduler_random_shared_prefix_workload_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_gpu_blocks=14, num_cpu_blocks=16, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=16, preemption_mode="swap")
    system = list(range(1, 13))
    seqs = [make_seq(i, system + [rng.randrange(100) for _ in range(rng.randint(1, 12))],
                     max_tokens=rng.randint(1, 20)) for i in range(20)]
    for s in seqs:
        sched.add(s)
    for _ in range(2000):
        if sched.num_unfinished == 0:
            break
        out = sched.schedule()
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            bm.cache_full_blocks(item.seq)
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                item.seq.token_ids.append(7)
        for s in list(sched.running):
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    assert sched.num_unfinished == 0
    assert bm.num_free_blocks == 14 and bm.num_cpu_blocks_used == 0
    assert all(c == 0 for c in bm.gpu.ref_counts + bm.cpu.ref_counts)
    assert bm.prefix_cache_hits > 0 and sched.num_preemptions_swap > 0


# -- the engine, tiny checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("LlamaConfig", {}).save_pretrained(path)
    return str(path)


def shared_prefix_prompts() -> list[list[int]]:
    """Heavy overlap: two system prompts, distinct questions, and some exact repeats."""
    rng = random.Random(7)
    vocab = TINY_SHAPE["vocab_size"]
    systems = [[rng.randrange(vocab) for _ in range(30)], [rng.randrange(vocab) for _ in range(21)]]
    prompts = [systems[i % 2] + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))] for i in range(10)]
    return prompts + [prompts[0], prompts[3]]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=20, seed=100 + i, max_tokens=16, ignore_eos=True)


def run(path: str, prompts, params, **kwargs) -> tuple[list[list[int]], dict, int]:
    llm = LLM(path, block_size=BS, max_model_len=96, max_num_batched_tokens=64, swap_space=0.01, **kwargs)
    computed = []
    llm.engine.add_step_listener(lambda s: computed.append(s.num_prefill_tokens + s.num_decode_tokens))
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_cpu_blocks_used"] == 0
    assert all(c == 0 for c in llm.engine.block_manager.gpu.ref_counts + llm.engine.block_manager.cpu.ref_counts)
    return [o.outputs[0].token_ids for o in outs], stats, sum(computed)


@pytest.fixture(scope="module")
def reference(tiny_path):
    prompts = shared_prefix_prompts()
    params = [GREEDY if i % 2 else seeded(i) for i in range(len(prompts))]
    tokens, stats, computed = run(tiny_path, prompts, params, enable_prefix_caching=False)
    assert stats["prefix_cache_queries"] == 0 and stats["prefix_cache_hits"] == 0
    return prompts, params, tokens, computed


def test_cache_hits_compute_fewer_tokens_and_give_the_same_outputs(tiny_path, reference):
    prompts, params, want, computed_off = reference
    got, stats, computed_on = run(tiny_path, prompts, params)
    assert got == want
    assert stats["prefix_cache_hits"] > 0
    assert stats["prefix_cache_queries"] >= sum(len(p) for p in prompts)
    # Every token found cached is one not computed.
    assert computed_on == computed_off - stats["prefix_cache_hits"]
    assert stats["num_cached_blocks"] > 0 and stats["num_shared_blocks"] == 0


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_cache_under_forced_preemption_gives_the_same_outputs(tiny_path, reference, mode):
    prompts, params, want, _ = reference
    # 30 blocks of 4 tokens: the 12 sequences (up to 55 tokens each) cannot all stay.
    got, stats, _ = run(tiny_path, prompts, params, num_kv_blocks=30, preemption_mode=mode)
    assert got == want
    assert stats["num_preemptions_swap"] + stats["num_preemptions_recompute"] > 0
    if mode == "swap":
        assert stats["num_preemptions_swap"] > 0
    if mode == "recompute":
        assert stats["num_preemptions_recompute"] > 0
    assert stats["prefix_cache_hits"] > 0


# -- bench workloads ----------------------------------------------------------------


def test_sharing_workloads_have_the_specified_shapes():
    w4 = w4_shared_system_prompt(1000, seed=1)
    assert len(w4) == 512 and all(len(ids) == 1024 + 128 for ids, _ in w4)
    assert len({tuple(ids[:1024]) for ids, _ in w4}) == 1 and len({tuple(ids[1024:]) for ids, _ in w4}) == 512
    assert all(p.max_tokens == 128 and p.ignore_eos for _, p in w4)
    assert w4_shared_system_prompt(1000, seed=1)[5][0] == w4[5][0]
    w5 = w5_parallel_sampling(1000, seed=1)
    assert len(w5) == 64 and all(len(ids) == 512 for ids, _ in w5)
    assert all(p.n == 8 and p.max_tokens == 256 and p.temperature == 1.0 and p.ignore_eos for _, p in w5)
    seeds = [p.seed + j for _, p in w5 for j in range(p.n)]
    assert len(set(seeds)) == 64 * 8


def test_peak_kv_blocks_shrink_with_prefix_caching(tiny_path):
    def peak(caching: bool) -> int:
        # A budget of one prompt a step: the first prefill registers the system prompt
        # before the others look it up (requests admitted in one step cannot share).
        llm = LLM(tiny_path, block_size=BS, max_model_len=96, max_num_batched_tokens=46,
                  enable_prefix_caching=caching)
        work = w4_shared_system_prompt(TINY_SHAPE["vocab_size"], seed=3, num_requests=8, system_tokens=40,
                                       question_tokens=6, output_tokens=4)
        measured = run_and_measure_peak_kv_blocks(llm.engine, work)
        assert measured.num_steps > 0 and not llm.engine._step_listeners
        return measured.peak_blocks

    # With sharing: one copy of the 10 system-prompt blocks and at most 3 blocks of each
    # request's own (tokens 40 to 48), even with all 8 running at once.
    without, with_ = peak(False), peak(True)
    assert with_ <= 10 + 8 * 3 and with_ < without
