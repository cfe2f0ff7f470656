"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV cache.

One forward runs a flat batch of T new tokens from many sequences, with no
padding: projections are plain [T, ...] matmuls and attention goes through the
paged kernels, which read each sequence's context through its block table.

The forward is cut at the attention calls: a "head" region (norm, QKV projection,
q/k norm, rotary) before layer 0's attention, a "boundary" region between layer i's
attention and layer i+1's (output projection, residual, MLP, then the next head), and a
"tail" after the last (ending in the final norm). The regions are plain functions of
tensors, the weights passed in, so one compiled function serves every layer on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondo.kernels.attention import paged_attention, write_kv_cache
from ondo.kernels.metadata import AttentionMetadata
from ondo.model.config import ModelConfig
from ondo.model.fusion import fused_on_cuda
from ondo.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, rms_norm, silu_and_mul


@dataclass(frozen=True)
class _RegionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


@functools.cache
def _regions(shape: _RegionShape) -> tuple[Callable[..., tuple], Callable[..., tuple], Callable[..., torch.Tensor]]:
    """(head, boundary, tail) for one attention shape; compiled on CUDA (see fusion.py)."""
    h, hkv, d, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.eps

    def qkv(x, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin):
        n = x.shape[0]
        q, k, v = F.linear(x, qkv_w, qkv_b).split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.reshape(n, h, d)
        k = k.reshape(n, hkv, d)
        v = v.reshape(n, hkv, d)
        if q_norm_w is not None:
            q = rms_norm(q, q_norm_w, eps)
            k = rms_norm(k, k_norm_w, eps)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def mlp_block(attn, residual, o_w, ln2_w, gate_up_w, down_w):
        hidden = residual + F.linear(attn, o_w)
        x = rms_norm(hidden, ln2_w, eps)
        return hidden + F.linear(silu_and_mul(F.linear(x, gate_up_w)), down_w)

    def head(hidden, ln1_w, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin):
        return (hidden, *qkv(rms_norm(hidden, ln1_w, eps), qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin))

    def boundary(attn, residual, o_w, ln2_w, gate_up_w, down_w, ln1_w, qkv_w, qkv_b, q_norm_w, k_norm_w,
                 cos, sin):
        hidden = mlp_block(attn, residual, o_w, ln2_w, gate_up_w, down_w)
        return (hidden, *qkv(rms_norm(hidden, ln1_w, eps), qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin))

    def tail(attn, residual, o_w, ln2_w, gate_up_w, down_w, norm_w):
        return rms_norm(mlp_block(attn, residual, o_w, ln2_w, gate_up_w, down_w), norm_w, eps)

    # Only the boundary is compiled: it runs once per layer; head and tail once per pass,
    # where a compile would cost start-up time and win nothing measurable.
    return head, fused_on_cuda(boundary), tail


KVCache = tuple[
    torch.Tensor, torch.Tensor
]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]

# HF checkpoint projection name -> (fused ondo parameter, shard id).
_FUSED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_SHARDS_PER_PARAM = {"qkv_proj": 3, "gate_up_proj": 2}


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = torch.nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = torch.nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def shard_rows(self, shard_id: str) -> tuple[int, int]:
        """Where q, k or v sits in the rows of qkv_proj: (start, length)."""
        starts = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}
        return starts[shard_id], self.q_size if shard_id == "q" else self.kv_size

    def head_weights(self) -> tuple[torch.Tensor | None, ...]:
        return (self.qkv_proj.weight, self.qkv_proj.bias,
                None if self.q_norm is None else self.q_norm.weight,
                None if self.k_norm is None else self.k_norm.weight)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               meta: AttentionMetadata) -> torch.Tensor:
        """Write the new K/V into their slots and attend: [T, q_size]."""
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.q_size)


class LlamaMLP(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = torch.nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=False
        )
        self.down_proj = torch.nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def head_weights(self) -> tuple[torch.Tensor | None, ...]:
        return (self.input_layernorm.weight, *self.self_attn.head_weights())

    def tail_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.self_attn.o_proj.weight, self.post_attention_layernorm.weight,
                self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight)


class LlamaModel(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        # Tied models have no lm_head of their own; compute_logits reads the
        # embedding, so moving or re-materializing the model cannot untie them.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of the T new tokens."""
        cfg = self.config
        head, boundary, tail = _regions(_RegionShape(cfg.num_attention_heads, cfg.num_key_value_heads,
                                                     cfg.head_dim, cfg.rms_norm_eps))
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        layers = self.model.layers
        residual, q, k, v = head(hidden, *layers[0].head_weights(), cos, sin)
        last = len(layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
            attn = layer.self_attn.attend(q, k, v, kv_cache, meta)
            if i == last:
                return tail(attn, residual, *layer.tail_weights(), self.model.norm.weight)
            residual, q, k, v = boundary(attn, residual, *layer.tail_weights(),
                                         *layers[i + 1].head_weights(), cos, sin)
        raise AssertionError("a model has at least one layer")

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return F.linear(hidden, self.lm_head_weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """Copy HF-named tensors into ondo's (fused) parameters.

        Returns how many tensors went into each parameter: a fused one
        (qkv_proj, gate_up_proj) takes one per shard.
        """
        params = dict(self.named_parameters())
        loaded: dict[str, int] = {}
        for hf_name, tensor in weights:
            name, shard = _ondo_name(hf_name)
            if name is None:
                continue
            if self.lm_head is None and name == "lm_head.weight":
                continue  # tied checkpoints sometimes still carry a copy
            if name not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no ondo parameter {name!r}")
            self._copy_into(params[name], name, shard, tensor, hf_name)
            loaded[name] = loaded.get(name, 0) + 1
        return loaded

    def _copy_into(
        self,
        param: torch.Tensor,
        name: str,
        shard: str | int | None,
        tensor: torch.Tensor,
        hf_name: str,
    ) -> None:
        if shard is None:
            target = param
        elif isinstance(shard, str):
            layer = self.model.layers[_layer_index(name)]
            start, length = layer.self_attn.shard_rows(shard)
            target = param.narrow(0, start, length)
        else:
            size = self.config.intermediate_size
            target = param.narrow(0, shard * size, size)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)} for {name}"
            )
        with torch.no_grad():
            target.copy_(tensor)

    def missing_parameters(self, loaded: dict[str, int]) -> list[str]:
        """Parameters a checkpoint left unfilled, given load_weights' counts."""
        missing = []
        for name, _ in self.named_parameters():
            kind = name.rsplit(".", 2)[-2]
            if loaded.get(name, 0) < _SHARDS_PER_PARAM.get(kind, 1):
                missing.append(name)
        return missing


def _ondo_name(hf_name: str) -> tuple[str | None, str | int | None]:
    """HF parameter name -> (ondo parameter name, shard id); None for tensors ondo does not use."""
    if "rotary_emb.inv_freq" in hf_name:
        return None, None
    for hf_proj, (fused, shard) in _FUSED_SHARDS.items():
        if f".{hf_proj}." in hf_name:
            return hf_name.replace(hf_proj, fused), shard
    return hf_name, None


def _layer_index(name: str) -> int:
    # "model.layers.{i}.self_attn.qkv_proj.weight"
    return int(name.split(".")[2])
