"""The offline workloads: their lengths as described, deterministic, and the warm-up pass
on prompts the measured runs never see."""

from __future__ import annotations

import pytest

from ondo.bench.workloads import make_workload, warm_up_workload

VOCAB = 151936


def test_the_workloads_have_the_lengths_they_describe():
    w1 = make_workload("W1", VOCAB)
    assert len(w1.requests) == 256
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.max_tokens <= 1024 for r in w1.requests)
    assert len({len(r.prompt_token_ids) for r in w1.requests}) > 100  # spread, not one length
    w2, w3 = make_workload("W2", VOCAB), make_workload("W3", VOCAB)
    assert {(len(r.prompt_token_ids), r.max_tokens) for r in w2.requests} == {(128, 1024)}
    assert len(w3.requests) == 1024 and {(len(r.prompt_token_ids), r.max_tokens) for r in w3.requests} == {(2048, 16)}
    assert w1.output_tokens == sum(r.max_tokens for r in w1.requests)
    assert all(p.ignore_eos and p.max_tokens == r.max_tokens for p, r in zip(w1.params(), w1.requests))
    assert make_workload("W1", VOCAB) == w1  # seeded: the same requests every run
    assert w3.description == "prefill-heavy: 1024 requests, input 2048, output 16"
    assert make_workload("W3", VOCAB, scale=0.01).description.startswith("prefill-heavy: 10 requests,")
    with pytest.raises(ValueError, match="unknown workload 'W9'"):
        make_workload("W9", VOCAB)


def test_the_warm_up_pass_is_a_slice_of_w1_on_other_prompts():
    warm, w1 = warm_up_workload(VOCAB), make_workload("W1", VOCAB)
    assert len(warm.requests) == 32 and warm.name == "W1"
    measured = {tuple(r.prompt_token_ids) for r in w1.requests}
    assert not any(tuple(r.prompt_token_ids) in measured for r in warm.requests)
    assert all(100 <= len(r.prompt_token_ids) <= 1024 for r in warm.requests)


def test_no_request_of_any_seed_is_longer_than_its_workloads_bound():
    from ondo.bench.sharing_workloads import MAX_REQUEST_TOKENS as SHARING
    from ondo.bench.sharing_workloads import w4_shared_system_prompt, w5_parallel_sampling
    from ondo.bench.workloads import MAX_REQUEST_TOKENS

    for name, bound in MAX_REQUEST_TOKENS.items():
        longest = max(len(r.prompt_token_ids) + r.max_tokens
                      for seed in range(8) for r in make_workload(name, VOCAB, seed=seed).requests)
        assert longest <= bound, name
        assert longest > bound - 16, name  # the bound is the workload's, not a loose one
    for name, make in (("W4", w4_shared_system_prompt), ("W5", w5_parallel_sampling)):
        assert max(len(ids) + p.max_tokens for ids, p in make(1000, seed=0)) == SHARING[name]
