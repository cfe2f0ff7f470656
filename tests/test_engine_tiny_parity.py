"""Greedy engine output equals transformers on tiny random Llama, Qwen2 and Qwen3 checkpoints
saved as HF folders; and the engine's bookkeeping (waste, leaks, aborts) on a random workload."""

from __future__ import annotations

import random

import pytest
import torch

from ondo import LLM, SamplingParams
from tests.test_engine_hf_parity import assert_same_or_true_tie, hf_greedy
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

CASES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
}


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    hf = tiny_hf_model(config_class, overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, str(path)


def random_prompts(n: int, seed: int, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TINY_SHAPE["vocab_size"]) for _ in range(rng.randint(1, max_len))]
            for _ in range(n)]


def test_greedy_matches_transformers(tiny):
    hf, path = tiny
    llm = LLM(path, block_size=4, max_num_batched_tokens=48, kv_cache_memory=1 << 22)
    prompts = random_prompts(10, seed=1)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        assert_same_or_true_tie(hf, ids, out.outputs[0].token_ids, hf_greedy(hf, ids, 24))
    assert llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]


def test_repetition_penalty_matches_transformers(tiny):
    hf, path = tiny
    llm = LLM(path, block_size=4, kv_cache_memory=1 << 22)
    prompt = random_prompts(1, seed=5)[0]
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                 repetition_penalty=1.5))[0].outputs[0].token_ids
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert ours == theirs.tolist()


def test_logprobs_are_transformers_log_softmax(tiny):
    hf, path = tiny
    llm = LLM(path, block_size=4, kv_cache_memory=1 << 22)
    prompt = random_prompts(1, seed=9)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3))
    c = out[0].outputs[0]
    assert len(c.logprobs) == 4
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + c.token_ids])).logits[0]
    ref = logits.log_softmax(-1)
    for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        pos = len(prompt) - 1 + i
        top3 = ref[pos].topk(3).indices.tolist()
        assert set(top3) <= set(lp) and tok in lp and len(lp) <= 4
        for t, v in lp.items():
            assert abs(v - float(ref[pos, t])) < 1e-4
    assert abs(c.cumulative_logprob - sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs))) < 1e-5


def test_random_workload_wastes_under_a_block_and_leaks_nothing(tiny):
    _, path = tiny
    bs = 4
    llm = LLM(path, block_size=bs, max_num_seqs=6, max_num_batched_tokens=32, num_kv_blocks=40,
              max_model_len=128, preemption_mode="swap", swap_space=0.01)
    engine = llm.engine
    rng = random.Random(3)
    prompts = random_prompts(30, seed=11)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=p,
                           params=SamplingParams(temperature=0.7, seed=i, max_tokens=rng.randint(1, 40),
                                                 ignore_eos=True))
    aborted = set()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        waste = engine.waste_per_running_seq()
        assert all(0 <= w <= bs - 1 for w in waste), waste
        if steps % 7 == 0 and len(aborted) < 5:
            rid = f"r{rng.randrange(30)}"
            if engine.abort_request(rid):
                aborted.add(rid)
        assert steps < 5000
    stats = llm.stats()
    assert aborted and stats["num_preemptions_swap"] > 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_cpu_blocks_used"] == 0
    assert all(c == 0 for c in engine.block_manager.gpu.ref_counts)
