"""Reading a llama.cpp GGUF file: its ModelConfig and its tensors under HF names.

Quantized tensors are dequantized with the `gguf` library itself; the one
llama.cpp quirk undone here is the Q/K row permutation of arch "llama".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ondo.model.config import ModelConfig

logger = logging.getLogger(__name__)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def open_gguf(path: str) -> Any:
    """A gguf.GGUFReader over `path`; a bad file raises an error naming it."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader: Any, path: str) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: "
            + ", ".join(_ARCHITECTURES)
        )

    def meta(key: str, default: Any = None) -> Any:
        return field_value(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens.data) if tokens is not None else int(meta("vocab_size"))
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        logger.warning("%s: rope_freqs (llama3 rope scaling) is not applied", path)
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [int(i) for i in dict.fromkeys([eos, eot]) if i is not None]
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=int(meta("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta("rope.scaling.type"), meta("rope.scaling.factor")),
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=None,
    )


def _rope_scaling(kind: str | None, factor: float | None) -> dict[str, Any] | None:
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor or 1.0)}
    raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF checkpoint name; None for tensors ondo does not load."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{kind}"
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    return None


def permute_for_interleaved_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows of arch "llama" (for tests and writers)."""
    head_half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, head_half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_interleaved_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo permute_for_interleaved_rope, giving back HF's rotate_half row order."""
    head_half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, head_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 numpy in torch's (row-major, reversed-from-GGUF) shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.array(tensor.data, dtype=np.float32)  # a copy: the memmap is read-only
    return dequantize(tensor.data, tensor.tensor_type)


def gguf_tensors(
    reader: Any, config: ModelConfig, path: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in `dtype`) for every tensor the model uses."""
    undo_permutation = field_value(reader, "general.architecture") == "llama"
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        try:
            array = dequantized(tensor)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {tensor.name}: {e}") from e
        if undo_permutation and ".q_proj." in name:
            array = unpermute_from_interleaved_rope(array, config.num_attention_heads)
        elif undo_permutation and ".k_proj." in name:
            array = unpermute_from_interleaved_rope(array, config.num_key_value_heads)
        yield name, torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
