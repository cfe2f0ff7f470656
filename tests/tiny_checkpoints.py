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


def _random_hf_model(config_class: str, overrides: dict, weight_std) -> torch.nn.Module:
    """A transformers model of the config with seeded random weights: norms near 1,
    every other tensor normal with `weight_std(name, param)`."""
    config = getattr(transformers, config_class)(**overrides)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + weight_std.norm_spread * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std(name, p) * torch.randn(p.shape, generator=gen))
    return model.eval()


class _Fixed:
    """std 0.15 everywhere: logits are O(1) and a wrong piece shows; a skipped norm too."""

    norm_spread = 0.2

    def __call__(self, name: str, p: torch.Tensor) -> float:
        return 0.15


class _Conditioned:
    """Each projection keeps the activation scale (gain / sqrt(fan_in)), like a trained
    network, so bf16 rounding does not blow up through the layers."""

    norm_spread = 0.1

    def __init__(self, gain: float) -> None:
        self.gain = gain

    def __call__(self, name: str, p: torch.Tensor) -> float:
        if "embed" in name:
            return 1.0
        return self.gain / p.shape[1] ** 0.5 if p.dim() == 2 else 0.1


def tiny_hf_model(config_class: str, overrides: dict) -> torch.nn.Module:
    return _random_hf_model(config_class, {**TINY_SHAPE, **overrides}, _Fixed())


def conditioned_hf_model(config_class: str, overrides: dict, gain: float = 1.0) -> torch.nn.Module:
    return _random_hf_model(config_class, overrides, _Conditioned(gain))


def keep_rope_in_float32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a transformers model to `dtype` but keep its rotary inv_freq buffers float32,
    as loading with from_pretrained(dtype=...) does (a plain .to() rounds them)."""
    saved = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(dtype)
    for name, buf in saved.items():
        model.get_submodule(name.rsplit(".", 1)[0]).inv_freq = buf.to(buf.device)
    return model
