"""The shape of a decoder model, read from a Hugging Face config.json dict."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Architectures that LlamaForCausalLM in ondo.model.llama runs; they differ only
# in QKV bias (Qwen2) and per-head q/k RMSNorm (Qwen3).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        architectures = d.get("architectures") or []
        if not architectures:
            raise ValueError(
                "config.json has no 'architectures' entry; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        arch = architectures[0]
        check_architecture(arch)
        if arch == "MistralForCausalLM" and d.get("sliding_window"):
            logger.warning(
                "sliding_window=%s ignored: ondo attends over the full context",
                d["sliding_window"],
            )
        if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
            logger.warning("use_sliding_window ignored: ondo attends over the full context")

        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        rope_theta, rope_scaling = _read_rope(d)
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has QKV bias; newer configs no longer say so.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_list(d.get("eos_token_id")),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )


def check_architecture(arch: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes one "rope_parameters" dict holding rope_theta too;
    # older configs have "rope_theta" and "rope_scaling" side by side.
    params = d.get("rope_parameters") or d.get("rope_scaling")
    theta = d.get("rope_theta")
    if params and theta is None:
        theta = params.get("rope_theta")
    rope_scaling = None
    if params and rope_type_of(params) != "default":
        rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta if theta is not None else 10000.0), rope_scaling


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
