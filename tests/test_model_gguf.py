"""GGUF loading: dequantization through the gguf library, llama.cpp's Q/K permutation, the embedded model."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from ondo.model.default_model import default_model_path
from ondo.model.gguf_file import permute_for_interleaved_rope, unpermute_from_interleaved_rope
from ondo.model.loader import load_model
from tests.paged_batch import PagedCache
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

CPU = torch.device("cpu")

_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK_NAMES[module]}.{kind}"


def write_llama_gguf(path: str, hf: torch.nn.Module, qtype: QType) -> dict[str, np.ndarray]:
    """A llama.cpp-style file: Q/K rows permuted, 2-D weights in `qtype`, norms F32.

    Returns the stored (quantized, permuted) arrays by HF name.
    """
    cfg = hf.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    stored = {}
    for name, tensor in hf.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if ".q_proj." in name:
            array = permute_for_interleaved_rope(array, cfg.num_attention_heads)
        elif ".k_proj." in name:
            array = permute_for_interleaved_rope(array, cfg.num_key_value_heads)
        if array.ndim == 2 and qtype != QType.F32:
            array = gguf.quants.quantize(array, qtype)
            writer.add_tensor(_gguf_name(name), array, raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), array)
        stored[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_interleaved_rope_permutation_round_trip():
    # One head of dim 4: llama.cpp interleaves the two rotate_half halves.
    rows = np.arange(4, dtype=np.float32)[:, None]
    assert permute_for_interleaved_rope(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = permute_for_interleaved_rope(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_from_interleaved_rope(permuted, 3), w)


def test_permuted_f32_gguf_gives_transformers_logits(tmp_path):
    hf = tiny_hf_model("LlamaConfig", {})
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, hf, QType.F32)
    model, config = load_model(path, "auto", torch.float32, CPU)
    assert config.num_key_value_heads == TINY_SHAPE["num_key_value_heads"]
    assert not config.tie_word_embeddings

    prompt = torch.tensor([3, 17, 64, 5, 99, 120, 8])
    cache = PagedCache(config, num_blocks=8, block_size=4, seed=1)
    cache.add_sequence(len(prompt))
    meta, positions = cache.step([len(prompt)])
    with torch.no_grad():
        got = model.compute_logits(model(prompt, positions, cache.kv_caches, meta))
        expected = hf(prompt[None]).logits[0]
    assert (got - expected).abs().max().item() < 1e-4


# Tolerance against the unquantized weight, as a fraction of the tensor's largest |value|.
QUANT_TOLERANCE = {
    QType.F16: 1e-3,
    QType.BF16: 8e-3,
    QType.Q8_0: 1e-2,
    QType.Q4_0: 0.15,
    QType.Q4_1: 0.1,
}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_weights_load_as_the_library_dequantizes_them(tmp_path, qtype):
    hf = tiny_hf_model("LlamaConfig", {})
    path = str(tmp_path / f"tiny-{qtype.name}.gguf")
    stored = write_llama_gguf(path, hf, qtype)
    model, config = load_model(path, "gguf", torch.float32, CPU)
    params = dict(model.named_parameters())
    attn = model.model.layers[1].self_attn
    mlp_size = config.intermediate_size

    def ondo_value(hf_name: str) -> torch.Tensor:
        layer_attn = hf_name.replace("model.layers.1.", "")
        if layer_attn.startswith("self_attn.") and layer_attn.split(".")[1] in (
            "q_proj",
            "k_proj",
            "v_proj",
        ):
            start, length = attn.shard_rows(layer_attn.split(".")[1][0])
            return attn.qkv_proj.weight[start : start + length]
        if layer_attn == "mlp.gate_proj.weight":
            return model.model.layers[1].mlp.gate_up_proj.weight[:mlp_size]
        if layer_attn == "mlp.up_proj.weight":
            return model.model.layers[1].mlp.gate_up_proj.weight[mlp_size:]
        return params[hf_name]

    checked = 0
    for hf_name, original in hf.state_dict().items():
        if original.ndim != 2 or not (hf_name.startswith("model.layers.1.") or "embed" in hf_name):
            continue
        library = gguf.quants.dequantize(stored[hf_name], qtype)
        if ".q_proj." in hf_name:
            library = unpermute_from_interleaved_rope(library, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            library = unpermute_from_interleaved_rope(library, config.num_key_value_heads)
        got = ondo_value(hf_name).detach()
        np.testing.assert_array_equal(got.numpy(), library, err_msg=hf_name)
        error = (got - original).abs().max().item() / original.abs().max().item()
        assert error < QUANT_TOLERANCE[qtype], f"{hf_name}: {error}"
        assert qtype in (QType.F16, QType.BF16) or error > 1e-5  # really quantized
        checked += 1
    assert checked == 8  # embedding + 7 projections of layer 1


def test_corrupt_gguf_error_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="broken.gguf"):
        load_model(str(path), "auto", torch.float32, CPU)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_model(str(tmp_path / "absent.gguf"), "auto", torch.float32, CPU)


@pytest.fixture(scope="module")
def embedded_hf_model():
    transformers = pytest.importorskip("transformers")
    folder, file_name = os.path.split(default_model_path())
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32
    ).eval()


def test_embedded_smollm2_matches_transformers_gguf_load(embedded_hf_model):
    model, config = load_model(None, "auto", torch.float32, CPU)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and config.eos_token_ids == [2]

    prompt = torch.tensor([1, 504, 3458, 282, 4649, 314, 1345, 28, 2043])
    cache = PagedCache(config, num_blocks=8, block_size=4, seed=2)
    cache.add_sequence(len(prompt))
    meta, positions = cache.step([len(prompt)])
    with torch.no_grad():
        got = model.compute_logits(model(prompt, positions, cache.kv_caches, meta))
        expected = embedded_hf_model(prompt[None]).logits[0]
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
