"""ondo's decoder against transformers on tiny random checkpoints, through a paged KV cache."""

from __future__ import annotations

import pytest
import torch

from ondo.model.loader import load_model
from tests.paged_batch import PagedCache
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}

CASES = {
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3_rope": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE}),
    "llama_linear_rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen2_bias": ("Qwen2Config", {}),
    "qwen3_qk_norm": ("Qwen3Config", {"head_dim": 24}),
}
SEQ_LENS = [5, 11, 3]
BLOCK_SIZE = 4


@pytest.fixture(params=list(CASES), scope="module")
def checkpoint(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    hf = tiny_hf_model(config_class, overrides)
    path = tmp_path_factory.mktemp(request.param)
    # One case saved in shards, to read model.safetensors.index.json.
    shard = "40KB" if request.param == "llama" else "1GB"
    hf.save_pretrained(path, max_shard_size=shard)
    if request.param == "llama":
        assert (path / "model.safetensors.index.json").exists()
    return request.param, hf, str(path)


def test_prefill_then_decode_match_transformers(checkpoint):
    name, hf, path = checkpoint
    model, config = load_model(path, "auto", torch.float32, torch.device("cpu"))
    assert config.architecture == hf.config.architectures[0]
    assert config.tie_word_embeddings == (name == "llama_tied")

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY_SHAPE["vocab_size"], (n,), generator=gen) for n in SEQ_LENS]
    cache = PagedCache(config, num_blocks=16, block_size=BLOCK_SIZE, seed=3)
    for n in SEQ_LENS:
        cache.add_sequence(n + 1)

    # Prefill: all three prompts in one flat batch.
    meta, positions = cache.step(SEQ_LENS)
    with torch.no_grad():
        hidden = model(torch.cat(prompts), positions, cache.kv_caches, meta)
        logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    starts = meta.query_start_loc.tolist()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf(prompt[None]).logits[0]
        got = logits[starts[i] : starts[i + 1]]
        assert (got - expected).abs().max().item() < 1e-4, f"{name} prefill seq {i}"
        assert expected.abs().max().item() > 0.5  # logits large enough to be a real check

    # Decode: one new token per sequence, attending through the cache.
    next_ids = torch.tensor([7, 42, 99])
    meta, positions = cache.step([1, 1, 1])
    assert positions.tolist() == SEQ_LENS
    with torch.no_grad():
        logits = model.compute_logits(model(next_ids, positions, cache.kv_caches, meta))
    for i, prompt in enumerate(prompts):
        full = torch.cat([prompt, next_ids[i : i + 1]])
        with torch.no_grad():
            expected = hf(full[None]).logits[0, -1]
        assert (logits[i] - expected).abs().max().item() < 1e-4, f"{name} decode seq {i}"
