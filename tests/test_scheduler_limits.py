"""A governor's run-time limits on the scheduler (no model): they tighten what was configured,
never loosen it; seats drain without preemption; prefill is chunked and paced; the duty
cycle gate idles in proportion; the seat and block invariants hold under any change."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondo.engine.block_manager import BlockManager
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler import Scheduler
from ondo.engine.scheduler_limits import (
    MIN_PACING_BURST_TOKENS,
    UNLIMITED,
    DutyCycleGate,
    SchedulerLimits,
)
from ondo.engine.sequence import Sequence


def make_seq(i: int, prompt_len: int, max_tokens: int = 100, n: int = 1) -> Sequence:
    prompt = list(range(1000 * i + 1, 1000 * i + prompt_len + 1))
    return Sequence(i, f"r{i}", prompt, SamplingParams(n=n, max_tokens=max_tokens), float(i))


def run_step(sched: Scheduler):
    """What the engine does after a forward pass: count computed tokens, sample, finish."""
    out = sched.schedule()
    for item in out.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        if item.samples:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    return out


def prefill_tokens(out) -> int:
    return sum(s.num_new_tokens for s in out.scheduled
               if s.num_new_tokens > 1 or s.seq.num_output_tokens == 0)


def test_limits_tighten_the_configured_ones_and_never_loosen_them():
    sched = Scheduler(BlockManager(256, 0, 4), max_num_seqs=4, max_num_batched_tokens=16,
                      debug_checks=True)
    for i in range(6):
        sched.add(make_seq(i, 3))
    sched.set_limits(SchedulerLimits(max_num_batched_tokens=1000, max_num_seqs=1000))
    out = run_step(sched)
    assert len(out.scheduled) == 4 and out.num_tokens == 12  # the configured 4 seats hold
    sched.set_limits(SchedulerLimits(max_num_batched_tokens=2))
    out = run_step(sched)
    assert out.num_tokens == 2  # two of the four decodes; the others wait, still running
    assert len(sched.running) == 4
    sched.set_limits(UNLIMITED)
    assert run_step(sched).num_tokens == 4


def test_fewer_seats_stop_admissions_without_preempting_what_runs():
    sched = Scheduler(BlockManager(256, 0, 4), max_num_seqs=8, max_num_batched_tokens=64,
                      debug_checks=True)
    for i in range(8):
        sched.add(make_seq(i, 4, max_tokens=3 + i))
    run_step(sched)
    assert len(sched.running) == 8
    for i in range(8, 12):
        sched.add(make_seq(i, 4, max_tokens=5))
    sched.set_limits(SchedulerLimits(max_num_seqs=3))
    seen = []
    while sched.num_unfinished:
        out = run_step(sched)
        assert not out.preempted_recompute and not out.preempted_swap
        seen.append((len(sched.running), [s.seq.seq_id for s in out.scheduled]))
    # The eight keep running as they were, finishing one by one; the four new ones are
    # admitted only once fewer than three run, and never more than three then run at once.
    first_admission = next(k for k, (_, ids) in enumerate(seen) if any(i >= 8 for i in ids))
    assert all(r <= 3 for r, _ in seen[first_admission:])
    assert seen[0][0] == 8  # nothing was taken away from the running set
    assert sched.block_manager.num_free_blocks == 256


def test_the_prefill_chunk_caps_prompt_tokens_per_step_beside_the_decodes():
    sched = Scheduler(BlockManager(512, 0, 4), max_num_seqs=8, max_num_batched_tokens=256,
                      debug_checks=True)
    for i in range(3):
        sched.add(make_seq(i, 2))
    run_step(sched)  # three decoding sequences
    sched.add(make_seq(10, 100))
    sched.add(make_seq(11, 100))
    sched.set_limits(SchedulerLimits(max_prefill_tokens=32))
    chunks = []
    while any(s.num_output_tokens == 0 for s in sched.running + list(sched.waiting)):
        out = run_step(sched)
        decodes = [s for s in out.scheduled if s.seq.seq_id < 3 and s.num_new_tokens == 1]
        assert len(decodes) == sum(1 for s in sched.running if s.seq_id < 3)
        chunks.append(prefill_tokens(out))
    assert max(chunks) == 32 and sum(chunks) == 200  # two 100-token prompts, 32 at a time
    assert len(chunks) == 7


def test_admission_pacing_spreads_prompt_tokens_at_its_rate():
    sched = Scheduler(BlockManager(4096, 0, 4), max_num_seqs=128, max_num_batched_tokens=512,
                      debug_checks=True)
    now = [0.0]
    sched.clock = lambda: now[0]
    sched.set_limits(SchedulerLimits(prefill_tokens_per_s=1000.0))
    for i in range(80):  # 4,000 prompt tokens: more than 2 s of pacing admits
        sched.add(make_seq(i, 50, max_tokens=1000))
    computed = []
    for _ in range(200):  # 2 s of 10 ms steps
        now[0] += 0.01
        run_step(sched)
        computed.append(sum(min(s.num_computed_tokens, s.num_prompt_tokens)
                            for s in sched.running))
    depth = max(1000 * 0.1, MIN_PACING_BURST_TOKENS)
    # Rate times time, plus what the bucket held at the start.
    assert computed[99] == pytest.approx(1000 * 1.0 + depth, abs=60)
    assert computed[-1] == pytest.approx(1000 * 2.0 + depth, abs=60)
    assert sched.num_waiting_tokens == sum(s.num_tokens for s in sched.waiting)


def test_pacing_without_chunked_prefill_runs_a_whole_prompt_into_debt_rather_than_stall():
    sched = Scheduler(BlockManager(512, 0, 4), max_num_seqs=8, max_num_batched_tokens=512,
                      enable_chunked_prefill=False, debug_checks=True)
    now = [0.0]
    sched.clock = lambda: now[0]
    sched.set_limits(SchedulerLimits(prefill_tokens_per_s=100.0, max_prefill_tokens=8))
    sched.add(make_seq(0, 300))
    sched.add(make_seq(1, 300))
    out = run_step(sched)
    assert [s.num_new_tokens for s in out.scheduled] == [300]  # whole; the chunk limit is moot
    steps = 0
    while sched.waiting:
        now[0] += 0.1
        run_step(sched)
        steps += 1
    assert 20 <= steps <= 40  # the debt of ~236 tokens paid at 100/s before the next prompt


def test_limits_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerLimits(max_num_seqs=0)
    with pytest.raises(ValueError, match="duty_cycle"):
        SchedulerLimits(duty_cycle=0.0)
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        SchedulerLimits(prefill_tokens_per_s=-1.0)
    with pytest.raises(ValueError, match="unknown scheduler limit"):
        SchedulerLimits.from_dict({"max_batch": 3})
    assert SchedulerLimits.from_dict(SchedulerLimits(max_num_seqs=3).as_dict()).max_num_seqs == 3


def test_the_duty_cycle_gate_idles_in_proportion_to_the_busy_time():
    gate = DutyCycleGate(slice_s=0.04)
    gate.add_busy(0.1)
    assert not gate.slice_over()  # duty 1: never paces
    gate.set_duty(0.25)
    busy = pauses = 0.0
    for k in range(1000):
        step = 0.005 + 0.01 * (k % 3)
        gate.add_busy(step)
        busy += step
        if gate.slice_over():
            pauses += gate.end_slice()
    assert busy / (busy + pauses) == pytest.approx(0.25, abs=0.01)
    assert gate.paused_s == pytest.approx(pauses)


limit_changes = st.lists(
    st.tuples(st.integers(0, 40), st.one_of(st.none(), st.integers(1, 24)),
              st.one_of(st.none(), st.integers(1, 8)), st.one_of(st.none(), st.integers(1, 32)),
              st.one_of(st.none(), st.floats(50.0, 5000.0))),
    max_size=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=limit_changes, seed=st.integers(0, 2**16), mode=st.sampled_from(["swap", "recompute"]))
def test_any_sequence_of_limits_keeps_the_invariants_and_finishes_everything(changes, seed, mode):
    rng = random.Random(seed)
    bm = BlockManager(40, 40, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=24, preemption_mode=mode,
                      debug_checks=True)
    now = [0.0]
    sched.clock = lambda: now[0]
    for i in range(14):
        n = rng.choice([1, 1, 2])
        sched.add(make_seq(i, rng.randint(1, 30), max_tokens=rng.randint(1, 12), n=n))
    at = {step: SchedulerLimits(tokens, seats, chunk, rate) for step, tokens, seats, chunk, rate
          in changes}
    for step in range(3000):
        if step in at:
            sched.set_limits(at[step])
        if step == 60:
            sched.set_limits(UNLIMITED)  # whatever came before, the work gets done
        now[0] += 0.01
        out = sched.schedule()
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        for item in out.scheduled:
            seq = item.seq
            if item.samples:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
        if not sched.num_unfinished:
            break
    assert sched.num_unfinished == 0
    assert bm.num_free_blocks == 40 and bm.num_cpu_blocks_used == 0
    assert sched.num_waiting_tokens == 0
