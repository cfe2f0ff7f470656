"""Parallel sampling (n > 1) on a tiny checkpoint: the fork after the prefill, the seed
rule (sequence i samples with seed + i), copy-on-write counts, streaming, preemption."""

from __future__ import annotations

import random

import pytest

from ondo import LLM, SamplingParams
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

BS = 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama_n")
    tiny_hf_model("LlamaConfig", {}).save_pretrained(path)
    return str(path)


def make_llm(path: str, **kwargs) -> LLM:
    return LLM(path, block_size=BS, max_model_len=96, max_num_batched_tokens=64, swap_space=0.01, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_path) -> LLM:
    return make_llm(tiny_path)


def prompt_of(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(TINY_SHAPE["vocab_size"]) for _ in range(length)]


def seeded(seed: int, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.9, top_k=40, seed=seed, max_tokens=12, ignore_eos=True, **kw)


def test_n4_seeded_equals_four_requests_with_seeds_s_to_s_plus_3(llm):
    prompt = prompt_of(10)
    out = llm.generate([prompt], seeded(50, n=4))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    separate = llm.generate([prompt] * 4, [seeded(50 + i) for i in range(4)])
    assert [c.token_ids for c in out.outputs] == [o.outputs[0].token_ids for o in separate]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the seeds do differ
    assert all(c.finish_reason == "length" for c in out.outputs)


def test_greedy_n4_gives_four_copies_of_the_n1_answer(llm):
    prompt = prompt_of(9, seed=1)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    out = llm.generate([prompt], SamplingParams(n=4, temperature=0, seed=3, max_tokens=12, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [want] * 4


@pytest.mark.parametrize("prompt_len,expect_cow", [(10, 3), (12, 0)])
def test_copy_on_write_only_when_the_fork_shares_a_partial_block(tiny_path, prompt_len, expect_cow):
    # 10 tokens: the third block holds 2; each sequence's first new token lands in it, so
    # 3 of the 4 copy it (the last keeps it). 12 tokens end on a block boundary: no copy.
    llm = make_llm(tiny_path)
    shared = []
    llm.engine.add_step_listener(lambda s: shared.append(llm.engine.block_manager.num_shared_blocks))
    llm.generate([prompt_of(prompt_len, seed=2)], seeded(7, n=4))
    stats = llm.stats()
    assert stats["num_cow_copies"] == expect_cow
    assert max(shared) == 3  # the prompt's three blocks, shared by the four sequences
    assert stats["num_shared_blocks"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]
    assert all(c == 0 for c in llm.engine.block_manager.gpu.ref_counts)


def test_streaming_deltas_per_sequence_and_finish_when_all_have_finished(llm):
    prompt = prompt_of(7, seed=3)
    full = llm.generate([prompt], seeded(11, n=3))[0].outputs
    stop = full[1].token_ids[2]
    cut = [c.token_ids[: c.token_ids.index(stop) + 1] if stop in c.token_ids else c.token_ids for c in full]
    engine = llm.engine
    engine.add_request("stream", prompt_token_ids=prompt, params=seeded(11, n=3, stop_token_ids=[stop]))
    streamed: list[list[int]] = [[], [], []]
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert [c.index for c in out.outputs] == [0, 1, 2]
            for c in out.outputs:
                streamed[c.index] += c.new_token_ids
            if out.finished:
                final = out
            else:
                assert not all(c.finished for c in out.outputs)
    assert streamed == cut
    assert [c.token_ids for c in final.outputs] == cut
    assert final.outputs[1].finish_reason == "stop" and final.outputs[1].stop_reason == stop


def test_abort_before_the_fork_reports_every_sequence(llm):
    engine = llm.engine
    engine.add_request("ab", prompt_token_ids=prompt_of(40, seed=4), params=seeded(1, n=4))
    assert engine.abort_request("ab")
    outs = engine.step()
    assert [c.finish_reason for c in outs[0].outputs] == ["abort"] * 4
    assert [c.index for c in outs[0].outputs] == [0, 1, 2, 3]
    assert not engine.has_unfinished_requests()
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]


def test_n_is_limited():
    with pytest.raises(ValueError, match="n"):
        SamplingParams(n=17)
    assert SamplingParams(n=16).n == 16


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
@pytest.mark.parametrize("caching", [True, False])
def test_forked_sequences_survive_preemption(tiny_path, llm, mode, caching):
    prompts = [prompt_of(10 + 3 * i, seed=10 + i) for i in range(4)]
    params = [seeded(20 + 10 * i, n=4) for i in range(4)]
    want = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    # 24 blocks of 4 tokens: 16 sequences of up to 31 tokens do not fit together.
    small = make_llm(tiny_path, num_kv_blocks=24, preemption_mode=mode, enable_prefix_caching=caching)
    got = [[c.token_ids for c in o.outputs] for o in small.generate(prompts, params)]
    assert got == want
    stats = small.stats()
    assert stats["num_preemptions_swap"] + stats["num_preemptions_recompute"] > 0
    if mode != "auto":
        assert stats[f"num_preemptions_{mode}"] > 0
    if mode == "swap":
        # With caching, a swapped-out block still cached on the GPU comes back with no copy.
        back_copied = stats["num_swapped_in_blocks"]
        assert back_copied < stats["num_swapped_out_blocks"] if caching else back_copied == stats["num_swapped_out_blocks"]
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_cpu_blocks_used"] == 0
    bm = small.engine.block_manager
    assert all(c == 0 for c in bm.gpu.ref_counts + bm.cpu.ref_counts)
