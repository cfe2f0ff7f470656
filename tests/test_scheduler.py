"""The scheduler and block manager, with no model: decisions only."""

from __future__ import annotations

import random

import pytest

from ondo.engine.block_manager import BlockManager
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler import PreemptionCosts, Scheduler
from ondo.engine.sequence import Sequence, SequenceStatus


def make_seq(i: int, prompt_len: int) -> Sequence:
    """Distinct prompts (no shared prefix), so prefix caching plays no part."""
    prompt = list(range(1000 * i + 1, 1000 * i + prompt_len + 1))
    return Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=100), float(i))


def run_step(sched: Scheduler):
    """Do what the engine does after a forward pass: count computed tokens, append samples."""
    out = sched.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.token_ids.append(7)
    return out


def test_block_pool_refcounts_and_free_list():
    bm = BlockManager(num_gpu_blocks=8, num_cpu_blocks=4, block_size=4)
    seq = make_seq(0, 9)
    assert bm.allocate_slots(seq, 9)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.slot(seq, 5) == seq.block_table[1] * 4 + 1
    seq.num_computed_tokens = 9
    assert bm.allocate_slots(seq, 3)  # 12 tokens still fit in 3 blocks
    assert len(seq.block_table) == 3
    assert bm.allocate_slots(seq, 4)  # 13 tokens need a fourth
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.gpu.ref_counts)
    with pytest.raises(RuntimeError):
        bm.gpu.release(0)


def test_allocation_fails_without_partial_change():
    bm = BlockManager(num_gpu_blocks=2, num_cpu_blocks=0, block_size=4)
    seq = make_seq(0, 12)
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_swap_out_and_in_round_trip_mappings():
    bm = BlockManager(num_gpu_blocks=6, num_cpu_blocks=6, block_size=4)
    seq = make_seq(0, 10)
    bm.allocate_slots(seq, 10)
    gpu_before = list(seq.block_table)
    out = bm.swap_out(seq)
    assert [g for g, _ in out] == gpu_before
    assert bm.num_free_blocks == 6 and bm.num_cpu_blocks_used == 3
    back = bm.swap_in(seq)
    assert [c for c, _ in back] == [c for _, c in out]
    assert bm.num_cpu_blocks_used == 0 and len(seq.block_table) == 3


def test_prefill_is_chunked_by_the_token_budget_and_mixed_with_decodes():
    bm = BlockManager(64, 0, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make_seq(0, 6), make_seq(1, 25)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 6), (1, 4)]
    out = run_step(sched)
    # a decodes one token; b's prefill continues with the rest of the budget.
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 9)]
    assert not out.scheduled[1].samples
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 9)]
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 3)]
    assert out.scheduled[1].samples


def test_max_num_seqs_caps_the_running_set():
    bm = BlockManager(64, 0, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sched.add(make_seq(i, 3))
    out = run_step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [0, 1]
    assert len(sched.waiting) == 2


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_newest_running_sequence_is_preempted_when_blocks_run_out(mode):
    bm = BlockManager(num_gpu_blocks=4, num_cpu_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, preemption_mode=mode)
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 4 blocks used, each has 9 tokens now
    out = run_step(sched)  # a needs a third block: b (newest) is preempted
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    if mode == "swap":
        assert out.preempted_swap == [b] and b.status is SequenceStatus.SWAPPED
        assert len(out.swap_out) == 2 and sched.num_preemptions_swap == 1
        assert b.num_computed_tokens == 8
    else:
        assert out.preempted_recompute == [b] and b.status is SequenceStatus.WAITING
        assert b.num_computed_tokens == 0 and sched.num_preemptions_recompute == 1
    # Nothing new is admitted in a step that preempted.
    sched.add(make_seq(2, 1))
    assert sched.waiting[-1].seq_id == 2


def test_swapped_sequences_resume_before_waiting_ones():
    bm = BlockManager(num_gpu_blocks=4, num_cpu_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, preemption_mode="swap")
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)  # b swapped out; a holds 3 blocks, 1 is free
    c = make_seq(2, 2)  # c would fit in the free block, b (3 blocks) would not
    sched.add(c)
    out = run_step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    assert c.status is SequenceStatus.WAITING and b.status is SequenceStatus.SWAPPED
    sched.finish(a, "stop")
    out = run_step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [1, 2]  # b first, then c
    assert len(out.swap_in) == 2 and b.status is SequenceStatus.RUNNING


def test_auto_mode_weighs_measured_costs():
    def pick(swap_bps: float, prefill_tps: float) -> str:
        bm = BlockManager(num_gpu_blocks=4, num_cpu_blocks=8, block_size=4)
        costs = PreemptionCosts(kv_bytes_per_block=1000, swap_bytes_per_s=swap_bps,
                                prefill_tokens_per_s=prefill_tps)
        sched = Scheduler(bm, 4, 64, preemption_mode="auto", costs=costs)
        sched.add(make_seq(0, 8))
        sched.add(make_seq(1, 8))
        run_step(sched)
        out = run_step(sched)
        return "swap" if out.preempted_swap else "recompute"

    # 2 blocks of 1000 B out and in = 4000 B; 8 tokens to recompute.
    assert pick(swap_bps=1e9, prefill_tps=100.0) == "swap"  # 4 us vs 80 ms
    assert pick(swap_bps=100.0, prefill_tps=1e9) == "recompute"  # 40 s vs 8 ns


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    bm = BlockManager(num_gpu_blocks=4, num_cpu_blocks=1, block_size=4)
    sched = Scheduler(bm, 4, 64, preemption_mode="swap")
    sched.add(make_seq(0, 8))
    sched.add(make_seq(1, 8))
    run_step(sched)
    out = run_step(sched)
    assert out.preempted_recompute and not out.preempted_swap


def test_random_workload_never_leaks_and_wastes_under_one_block_per_sequence():
    rng = random.Random(0)
    bs = 4
    bm = BlockManager(num_gpu_blocks=24, num_cpu_blocks=16, block_size=bs)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=16, preemption_mode="swap")
    seqs = [make_seq(i, rng.randint(1, 30)) for i in range(20)]
    for s in seqs:
        s.params = SamplingParams(max_tokens=rng.randint(1, 12))
        sched.add(s)
    for _ in range(2000):
        if sched.num_unfinished == 0:
            break
        run_step(sched)
        for s in list(sched.running):
            waste = len(s.block_table) * bs - s.num_computed_tokens
            assert 0 <= waste <= bs - 1
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    assert sched.num_unfinished == 0
    assert bm.num_free_blocks == 24 and bm.num_cpu_blocks_used == 0
    assert all(c == 0 for c in bm.gpu.ref_counts + bm.cpu.ref_counts)
    assert sched.num_preemptions_swap > 0


def _decisions(fast_path: bool, monkeypatch) -> list[tuple]:
    """Every step's scheduled (request, tokens), preemptions and block copies, for one
    seeded workload with forks (shared blocks, so copy-on-write) and block shortage."""
    if not fast_path:
        monkeypatch.setattr(BlockManager, "has_slot_for_next_token", lambda self, seq: False)
    rng = random.Random(3)
    bm = BlockManager(num_gpu_blocks=20, num_cpu_blocks=12, block_size=4)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=16, preemption_mode="swap")
    for i in range(14):
        s = make_seq(i, rng.randint(1, 25))
        s.params = SamplingParams(max_tokens=rng.randint(1, 14))
        sched.add(s)
    forked, steps = 0, []
    for _ in range(2000):
        if sched.num_unfinished == 0:
            break
        out = run_step(sched)
        steps.append((tuple((it.seq.request_id, it.num_new_tokens) for it in out.scheduled),
                      tuple(s.request_id for s in out.preempted_swap), tuple(out.block_copies)))
        for s in list(sched.running):
            if forked < 3 and s.num_output_tokens == 1 and s.num_computed_tokens % 4:
                child = make_seq(100 + forked, 1)
                child.params = s.params
                sched.fork(s, child)
                forked += 1
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    assert sched.num_unfinished == 0 and forked == 3
    return steps


def test_decode_fast_path_decides_as_the_general_path(monkeypatch):
    fast = _decisions(True, monkeypatch)
    general = _decisions(False, monkeypatch)
    assert fast == general
    assert any(copies for _, _, copies in fast)  # a shared block was copied on write
    assert any(preempted for _, preempted, _ in fast)


def test_has_slot_for_next_token_only_inside_an_unshared_block():
    bm = BlockManager(num_gpu_blocks=8, num_cpu_blocks=0, block_size=4)
    seq = make_seq(0, 6)
    assert bm.allocate_slots(seq, 6)  # blocks for tokens 0-7
    seq.num_computed_tokens = 6
    assert bm.has_slot_for_next_token(seq)  # position 6 is in its second block
    seq.num_computed_tokens = 8
    assert not bm.has_slot_for_next_token(seq)  # position 8 needs a third block
    seq.num_computed_tokens = 6
    child = make_seq(1, 1)
    bm.fork(seq, child)
    assert not bm.has_slot_for_next_token(seq)  # the block is shared: copy on write first
