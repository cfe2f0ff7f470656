"""ModelConfig parsing, dummy weights and the loader's errors."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from ondo.model.config import ModelConfig
from ondo.model.loader import load_model, load_model_from_config
from tests.tiny_checkpoints import tiny_hf_model

CPU = torch.device("cpu")

LLAMA_DICT = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"type": "linear", "factor": 4.0},
    "eos_token_id": [128001, 128009],
    "bos_token_id": 128000,
    "torch_dtype": "bfloat16",
}


def test_from_hf_dict_reads_old_style_rope_and_eos_list():
    config = ModelConfig.from_hf_dict(LLAMA_DICT)
    assert config.head_dim == 16
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"type": "linear", "factor": 4.0}
    assert config.eos_token_ids == [128001, 128009]
    assert config.torch_dtype == "bfloat16"
    assert not config.attention_bias and not config.qk_norm


def test_qwen_flags_follow_the_architecture():
    qwen2 = ModelConfig.from_hf_dict({**LLAMA_DICT, "architectures": ["Qwen2ForCausalLM"]})
    qwen3 = ModelConfig.from_hf_dict(
        {**LLAMA_DICT, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32}
    )
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.q_size == 128


def test_mistral_sliding_window_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        ModelConfig.from_hf_dict(
            {**LLAMA_DICT, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
        )
    assert "sliding_window=4096" in caplog.text


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        ModelConfig.from_hf_dict({**LLAMA_DICT, "architectures": ["GPT2LMHeadModel"]})
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(info.value)


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_dict({**LLAMA_DICT, "rope_scaling": {"rope_type": "yarn"}})


def test_dummy_weights_are_built_in_the_target_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_DICT))
    model, config = load_model(str(tmp_path), "dummy", torch.bfloat16, CPU)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in params.values())
    assert torch.all(params["model.norm.weight"] == 1)
    qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == (64 + 2 * 32, 64)
    assert 0.015 < qkv.float().std().item() < 0.025


def test_dummy_tied_model_reads_logits_through_the_embedding():
    config = ModelConfig.from_hf_dict({**LLAMA_DICT, "tie_word_embeddings": True})
    model = load_model_from_config(config, torch.float32, CPU)
    assert model.lm_head is None
    hidden = torch.randn(3, 64)
    expected = hidden @ model.model.embed_tokens.weight.T
    assert torch.allclose(model.compute_logits(hidden), expected)


@pytest.fixture
def sharded_checkpoint(tmp_path):
    tiny_hf_model("LlamaConfig", {}).save_pretrained(tmp_path, max_shard_size="40KB")
    return tmp_path


def test_missing_shard_error_names_the_file(sharded_checkpoint):
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(sharded_checkpoint / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_model(str(sharded_checkpoint), "auto", torch.float32, CPU)


def test_corrupt_shard_error_names_the_file(sharded_checkpoint):
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (sharded_checkpoint / shard).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=shard):
        load_model(str(sharded_checkpoint), "safetensors", torch.float32, CPU)


def test_checkpoint_without_a_weight_is_refused(tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf_model("LlamaConfig", {})
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if "layers.1.mlp.up" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="gate_up_proj"):
        load_model(str(tmp_path), "auto", torch.float32, CPU)


def test_missing_config_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), "auto", torch.float32, CPU)
