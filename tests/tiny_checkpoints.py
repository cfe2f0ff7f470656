"""Test helper: tiny transformers models with weights large enough that mistakes show in logits."""

from __future__ import annotations

import torch
import transformers

TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_hf_model(config_class: str, overrides: dict) -> torch.nn.Module:
    config = getattr(transformers, config_class)(**{**TINY_SHAPE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    # Larger-than-default weights so logits are O(1) and a wrong piece shows;
    # norms away from 1 so that a skipped norm weight shows too.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def conditioned_hf_model(config_class: str, overrides: dict, gain: float = 1.0) -> torch.nn.Module:
    """Random weights scaled like a trained network's (each projection keeps the activation
    scale: std = gain / sqrt(fan_in)), so bf16 rounding errors do not blow up through the
    layers the way they do in a chaotic random network."""
    config = getattr(transformers, config_class)(**overrides)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / p.shape[1] ** 0.5))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def keep_rope_in_float32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a transformers model to `dtype` but keep its rotary inv_freq buffers float32,
    as loading with from_pretrained(dtype=...) does (a plain .to() rounds them)."""
    saved = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(dtype)
    for name, buf in saved.items():
        model.get_submodule(name.rsplit(".", 1)[0]).inv_freq = buf.to(buf.device)
    return model
