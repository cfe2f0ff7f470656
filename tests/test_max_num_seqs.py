"""`max_num_seqs` bounds the running sequences at every step, for every mix of `n`,
preemption mode, prefix caching and asynchronous scheduling; nothing leaks."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondo import LLM, SamplingParams
from ondo.engine.model_runner import ModelRunner
from ondo.engine.scheduler import ScheduledSeq, SchedulerOutput
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

MAX_SEQS = 8


def watch_steps(llm: LLM) -> list[tuple[int, int]]:
    """(batch size, running sequences) of every step, as a step listener sees them."""
    seen: list[tuple[int, int]] = []
    llm.engine.add_step_listener(lambda s: seen.append((s.batch_size, s.num_running)))
    return seen


def assert_no_leaks(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert bm.num_cpu_blocks_used == 0
    assert all(c == 0 for c in bm.gpu.ref_counts + bm.cpu.ref_counts)
    assert llm.engine.scheduler.num_unfinished == 0


def test_parallel_sampling_keeps_to_max_num_seqs_on_the_embedded_model():
    # The numbers of the reported overrun: six n=4 requests reached 20 running sequences.
    llm = LLM(dtype="float32", max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256)
    seen = watch_steps(llm)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True, seed=1)
    outs = llm.generate([f"Tell me about the number {i}." for i in range(6)], params)
    assert [len(o.outputs) for o in outs] == [4] * 6
    assert all(len(c.token_ids) == 20 for o in outs for c in o.outputs)
    assert max(b for b, _ in seen) == 8  # two requests of four at a time, no more
    assert max(r for _, r in seen) == 8
    assert llm.engine.scheduler.num_seats_running == 0
    assert_no_leaks(llm)


def test_runner_refuses_a_batch_larger_than_its_buffers(tmp_path):
    tiny_hf_model("LlamaConfig", {}).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), block_size=4, max_model_len=64, max_num_seqs=2, num_kv_blocks=64)
    engine = llm.engine
    seqs = [engine.add_request(f"r{i}", prompt_token_ids=[1, 2, 3]) for i in range(3)]
    for seq in seqs:
        engine.block_manager.allocate_slots(seq, 3)
    sched = SchedulerOutput(scheduled=[ScheduledSeq(seq, 3) for seq in seqs])
    with pytest.raises(RuntimeError, match="3 sequences exceeds max_num_seqs=2"):
        ModelRunner.prepare(engine.runner, sched)


@functools.cache
def tiny_path() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="ondo_tiny_seats_")
    tiny_hf_model("LlamaConfig", {}).save_pretrained(path)
    return path


@functools.cache
def engine_for(preemption_mode: str, prefix_caching: bool, async_scheduling: bool) -> LLM:
    # 24 blocks of 4 tokens: a few long requests already preempt each other.
    return LLM(tiny_path(), block_size=4, max_model_len=64, max_num_batched_tokens=48,
               max_num_seqs=MAX_SEQS, num_kv_blocks=24, swap_space=0.001,
               preemption_mode=preemption_mode, enable_prefix_caching=prefix_caching,
               async_scheduling=async_scheduling)


request_mix = st.lists(
    # n, prompt length, max_tokens, shares a prefix, extra sequences for best_of (0: none)
    st.tuples(st.integers(1, 8), st.integers(1, 30), st.integers(1, 24), st.booleans(),
              st.integers(0, 3)),
    min_size=1, max_size=12,
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=request_mix, mode=st.sampled_from(["swap", "recompute", "auto"]),
       prefix_caching=st.booleans(), async_scheduling=st.booleans(), seed=st.integers(0, 2**16))
def test_every_step_keeps_to_max_num_seqs_and_frees_every_block(mix, mode, prefix_caching,
                                                                async_scheduling, seed):
    llm = engine_for(mode, prefix_caching, async_scheduling)
    engine = llm.engine
    rng = random.Random(seed)
    vocab = TINY_SHAPE["vocab_size"]
    shared = [rng.randrange(vocab) for _ in range(12)]  # some prompts share a prefix
    prompts, params = [], []
    for n, prompt_len, max_tokens, share, extra in mix:
        own = [rng.randrange(vocab) for _ in range(prompt_len)]
        prompts.append((shared + own)[:60] if share else own)
        best_of = min(n + extra, MAX_SEQS) if extra else None
        params.append(SamplingParams(n=n, best_of=best_of, temperature=0.8, seed=rng.randrange(1000),
                                     max_tokens=max_tokens, ignore_eos=True))
    seen: list[tuple[int, int]] = []
    scheduler = engine.scheduler

    def listener(stats) -> None:
        seen.append((stats.batch_size, scheduler.num_seats_running))

    engine.add_step_listener(listener)
    try:
        outs = llm.generate(prompts, params)
    finally:
        engine.remove_step_listener(listener)
    assert seen and max(max(b, s) for b, s in seen) <= MAX_SEQS
    for out, (n, _, max_tokens, _, _) in zip(outs, mix):
        assert len(out.outputs) == n
        # A sequence ends at max_tokens or where max_model_len cuts it short.
        limit = min(max_tokens, 64 - len(out.prompt_token_ids))
        assert all(len(c.token_ids) == limit for c in out.outputs)
    assert_no_leaks(llm)
