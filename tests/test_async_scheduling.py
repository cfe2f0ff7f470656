"""Asynchronous scheduling: step N+1 scheduled while step N's draws are still on the
device. On CPU the device is the host, but the engine takes exactly the same path (tokens
pending, read from the previous draws, dropped after a stop), so it must give exactly the
outputs of synchronous stepping, leak nothing, and waste no step on a length limit."""

from __future__ import annotations

import random

import pytest

from ondo import LLM, SamplingParams
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

BS = 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama_async")
    tiny_hf_model("LlamaConfig", {}).save_pretrained(path)
    return str(path)


def prompts() -> list[list[int]]:
    """Ragged lengths, a shared system prompt and exact repeats."""
    rng = random.Random(11)
    vocab = TINY_SHAPE["vocab_size"]
    system = [rng.randrange(vocab) for _ in range(24)]
    own = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(10)]
    ps = [(system if i % 3 == 0 else []) + q for i, q in enumerate(own)]
    return ps + [ps[0], ps[4]]


def params_for(i: int) -> SamplingParams:
    max_tokens = 3 + (i * 5) % 17  # sequences end at different steps
    if i % 2:
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.9, top_p=0.9, seed=50 + i, max_tokens=max_tokens,
                          ignore_eos=True, logprobs=2)


def run(path: str, ps, params, **kwargs):
    llm = LLM(path, block_size=BS, max_model_len=96, max_num_batched_tokens=64, swap_space=0.01, **kwargs)
    outs = llm.generate(ps, params)
    stats = llm.stats()
    bm = llm.engine.block_manager
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_cpu_blocks_used"] == 0
    assert all(c == 0 for c in bm.gpu.ref_counts + bm.cpu.ref_counts)
    return outs, llm


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_path):
    ps = prompts()
    params = [params_for(i) for i in range(len(ps))]
    outs, llm = run(tiny_path, ps, params, async_scheduling=False)
    assert llm.engine.num_steps_ahead == 0
    return ps, params, outs


def test_async_scheduling_gives_the_synchronous_outputs(tiny_path, reference):
    ps, params, want = reference
    got, llm = run(tiny_path, ps, params, async_scheduling=True)
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason == "length"
        if w.outputs[0].logprobs is not None:
            for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert a.keys() == b.keys()
                assert all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    engine = llm.engine
    # Nearly every step after the first was scheduled ahead of its predecessor.
    assert engine.num_steps_ahead >= engine.step_timing_s["steps"] - 3
    # A length limit is seen while scheduling: no slot is spent past max_tokens.
    assert engine.num_generation_tokens_total == sum(p.max_tokens for p in params)


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_async_scheduling_under_forced_preemption(tiny_path, reference, mode):
    ps, params, want = reference
    got, llm = run(tiny_path, ps, params, async_scheduling=True, num_kv_blocks=26, preemption_mode=mode)
    assert tokens(got) == tokens(want)
    stats = llm.stats()
    assert stats["num_preemptions_swap"] + stats["num_preemptions_recompute"] > 0
    assert llm.engine.num_steps_ahead > 0


def test_penalties_and_parallel_sampling_drain_and_match(tiny_path):
    ps = prompts()[:6]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=0.7),
              SamplingParams(n=3, temperature=0.8, seed=9, max_tokens=10, ignore_eos=True)] * 3
    want, _ = run(tiny_path, ps, params, async_scheduling=False)
    got, llm = run(tiny_path, ps, params, async_scheduling=True)
    assert tokens(got) == tokens(want)
    assert llm.engine._num_sync_requests == 0


def _parallel_params(i: int) -> SamplingParams:
    # n = 3 seeded (sequences of one request end at the same step), n = 2 greedy, n = 1.
    if i % 3 == 0:
        return SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=9 + i, max_tokens=4 + 3 * i,
                              ignore_eos=True, logprobs=1)
    if i % 3 == 1:
        return SamplingParams(n=2, temperature=0, max_tokens=7, ignore_eos=True)
    return SamplingParams(temperature=0.9, seed=i, max_tokens=5 + i, ignore_eos=True)


@pytest.mark.parametrize("kwargs", [{}, {"num_kv_blocks": 30, "preemption_mode": "recompute"},
                                    {"num_kv_blocks": 30, "preemption_mode": "swap"}])
def test_parallel_sampling_runs_ahead_with_the_synchronous_outputs(tiny_path, kwargs, monkeypatch):
    """n > 1 forks as the step that samples its first token is launched: with
    its sequences then run with steps ahead (the default), and give the
    tokens and logprobs of synchronous stepping, also when blocks run short and sequences
    are preempted."""
    monkeypatch.setenv("ONDO_PARALLEL_SAMPLING_AHEAD", "1")
    ps = prompts()[:9]
    params = [_parallel_params(i) for i in range(len(ps))]
    want, _ = run(tiny_path, ps, params, async_scheduling=False, **kwargs)
    got, llm = run(tiny_path, ps, params, async_scheduling=True, **kwargs)
    assert tokens(got) == tokens(want)
    assert [len(o.outputs) for o in got] == [p.n for p in params]
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            assert a.finish_reason == b.finish_reason == "length"
            if b.logprobs is not None:
                assert [x.keys() for x in a.logprobs] == [x.keys() for x in b.logprobs]
    engine = llm.engine
    assert engine._num_sync_requests == 0
    if kwargs:
        stats = llm.stats()
        assert stats["num_preemptions_swap"] + stats["num_preemptions_recompute"] > 0
        assert engine.num_steps_ahead > 0
    else:  # nothing drains: every step after the first was scheduled ahead
        assert engine.num_steps_ahead >= engine.step_timing_s["steps"] - 3


def test_one_request_takes_exactly_max_tokens_steps(tiny_path):
    llm = LLM(tiny_path, block_size=BS, max_model_len=96, async_scheduling=True)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 7
    assert llm.engine.step_timing_s["steps"] == 7  # one prefill, six decodes, no wasted step
    assert llm.engine.num_steps_ahead == 6


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_path, reference):
    ps, params, want = reference
    llm = LLM(tiny_path, block_size=BS, max_model_len=96, max_num_batched_tokens=64, async_scheduling=True)
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(ps, params)):
        engine.add_request(f"r{i}", params=sp, prompt_token_ids=p, stream=False)
    finals = {}
    for _ in range(3):
        for o in engine.step():
            finals[o.request_id] = o
    assert engine._in_flight is not None
    in_flight = {s.request_id for s in engine._in_flight.seqs}
    victims = sorted(in_flight - set(finals))[:3]
    assert victims
    for rid in victims:
        assert engine.abort_request(rid)
    while engine.has_unfinished_requests():
        for o in engine.step():
            finals[o.request_id] = o
    assert len(finals) == len(ps)
    for i in range(len(ps)):
        o = finals[f"r{i}"]
        if f"r{i}" in victims:
            assert o.outputs[0].finish_reason == "abort"
        else:
            assert o.outputs[0].token_ids == want[i].outputs[0].token_ids
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert all(c == 0 for c in bm.gpu.ref_counts)


def test_stops_on_eos_and_stop_strings_match_synchronous_stepping():
    batch = ["The three laws of thermodynamics are", "Write a haiku about GPUs.",
             "def quicksort(arr):", "Paris, Rome, Madrid and"]
    params = [SamplingParams(temperature=0, max_tokens=48),
              SamplingParams(temperature=0, max_tokens=48, stop=["\n\n", "."]),
              SamplingParams(temperature=0, max_tokens=48, stop=["return"], include_stop_str_in_output=True),
              SamplingParams(temperature=0.7, seed=3, max_tokens=48, stop=[","])]
    sync = LLM(max_model_len=256, async_scheduling=False).generate(batch, params)
    llm = LLM(max_model_len=256, async_scheduling=True)
    got = llm.generate(batch, params)
    for g, w in zip(got, sync):
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == \
            (w.outputs[0].finish_reason, w.outputs[0].stop_reason)
    assert {o.outputs[0].finish_reason for o in got} >= {"stop"}
    assert llm.engine.num_steps_ahead > 0


def test_parallel_sampling_runs_ahead_unless_switched_off(tiny_path, monkeypatch):
    params = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)
    for env, ahead in ((None, True), ("0", False), ("1", True)):
        if env is None:
            monkeypatch.delenv("ONDO_PARALLEL_SAMPLING_AHEAD", raising=False)
        else:
            monkeypatch.setenv("ONDO_PARALLEL_SAMPLING_AHEAD", env)
        llm = LLM(tiny_path, block_size=BS, max_model_len=96, async_scheduling=True)
        assert llm.engine.parallel_sampling_ahead is ahead
        out = llm.generate([[1, 2, 3, 4, 5]], params)[0]
        assert len(out.outputs) == 2
        engine = llm.engine
        assert (engine.num_steps_ahead > 0) is ahead
        assert engine._num_sync_requests == 0


@pytest.mark.parametrize("kwargs", [{"async_scheduling": True}, {"async_scheduling": False},
                                    {"async_scheduling": True, "num_kv_blocks": 26, "preemption_mode": "swap"}])
def test_decode_rows_packed_longest_first_give_the_same_outputs(tiny_path, reference, kwargs, monkeypatch):
    """ONDO_DECODE_LONGEST_FIRST=1 (the default) packs a decode step's rows by context,
    longest first: the tokens (greedy and seeded), logprobs and finish reasons stay those
    of the scheduler's order (ONDO_DECODE_LONGEST_FIRST=0), with steps ahead and under
    preemption."""
    ps, params, _ = reference
    monkeypatch.setenv("ONDO_DECODE_LONGEST_FIRST", "0")
    want, unpacked = run(tiny_path, ps, params, **kwargs)
    assert not unpacked.engine.runner.longest_first
    monkeypatch.delenv("ONDO_DECODE_LONGEST_FIRST")
    packed = []
    original = __import__("ondo.engine.model_runner", fromlist=["ModelRunner"]).ModelRunner.upload

    def upload(self, host):
        packed.append(host)
        return original(self, host)

    monkeypatch.setattr("ondo.engine.model_runner.ModelRunner.upload", upload)
    got, llm = run(tiny_path, ps, params, **kwargs)
    assert llm.engine.runner.longest_first
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        if w.outputs[0].logprobs is not None:
            for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert a.keys() == b.keys()
                assert all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    decode = [h for h in packed if int(h.query_start_loc[-1]) == len(h.context_lens)]
    assert decode and all((h.context_lens[:-1] >= h.context_lens[1:]).all() for h in decode)
    # Some steps' rows did move: their sampled rows come back from other packed rows.
    assert any((h.logits_indices != range(len(h.logits_indices))).any() for h in decode)
    assert all(sorted(h.logits_indices) == list(range(len(h.context_lens))) for h in decode)


def test_the_longest_first_switch_takes_0_or_1(tiny_path, monkeypatch):
    monkeypatch.setenv("ONDO_DECODE_LONGEST_FIRST", "yes")
    with pytest.raises(ValueError, match="ONDO_DECODE_LONGEST_FIRST must be 0 or 1"):
        LLM(tiny_path, block_size=BS, max_model_len=96, max_num_batched_tokens=64)


def test_a_bad_mixed_split_setting_fails_the_engine_at_start(tiny_path, monkeypatch):
    # Read only by the Triton kernels, yet refused at start on any device.
    monkeypatch.setenv("ONDO_MIXED_SPLIT_MIN_ROWS", "half")
    with pytest.raises(ValueError, match="ONDO_MIXED_SPLIT_MIN_ROWS must be a whole number"):
        LLM(tiny_path, block_size=BS, max_model_len=96, max_num_batched_tokens=64)
    monkeypatch.setenv("ONDO_MIXED_SPLIT_MIN_ROWS", "300")
    monkeypatch.setenv("ONDO_MIXED_SPLIT_BY_WORK", "on")
    with pytest.raises(ValueError, match="ONDO_MIXED_SPLIT_BY_WORK must be 0 or 1"):
        LLM(tiny_path, block_size=BS, max_model_len=96, max_num_batched_tokens=64)
    monkeypatch.setenv("ONDO_MIXED_SPLIT_BY_WORK", "1")
    for name in ("ONDO_MIXED_DECODE_OVERLAP", "ONDO_MIXED_DECODE_BESIDE", "ONDO_PREFILL_NEW_KV",
                 "ONDO_PREFILL_LONGEST_FIRST", "ONDO_RESIDUAL_ADD_IN_NORM", "ONDO_FUSED_QK_NORM_ROPE",
                 "ONDO_FUSED_GATE_UP_SILU"):
        monkeypatch.setenv(name, "true")
        with pytest.raises(ValueError, match=f"{name} must be 0 or 1"):
            LLM(tiny_path, block_size=BS, max_model_len=96, max_num_batched_tokens=64)
        monkeypatch.setenv(name, "0")
