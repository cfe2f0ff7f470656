"""Greedy decoding equals Hugging Face transformers token for token (float32, CPU)."""

from __future__ import annotations

import torch

from ondo import LLM, SamplingParams
from tests.prompts import PROMPTS

NEW_TOKENS = 32
TIE_TOLERANCE = 1e-3


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def assert_same_or_true_tie(model, prompt_ids, ours, theirs):
    """Equal tokens; at the first position that differs, transformers' own top-2 logits
    there must be within TIE_TOLERANCE (a true tie), and comparison stops there."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + theirs[:i]])).logits[0, -1]
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < TIE_TOLERANCE, f"token {i} differs ({a} vs {b}) with a top-2 gap of {gap}"
        assert {a, b} <= set(logits.topk(2).indices.tolist())
        return
    assert len(ours) == len(theirs)


def test_greedy_matches_transformers_on_the_embedded_model(hf_smollm2):
    llm = LLM(max_num_batched_tokens=512)
    tok = llm.tokenizer
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    lengths = [len(p) for p in prompt_ids]
    assert min(lengths) == 1 and 250 <= max(lengths) <= 320, lengths
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # All prompts in one call: batched, chunked prefill mixed with decodes.
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
    for ids, out in zip(prompt_ids, outs):
        ours = out.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS and out.outputs[0].finish_reason == "length"
        assert_same_or_true_tie(hf_smollm2, ids, ours, hf_greedy(hf_smollm2, ids, NEW_TOKENS))
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
