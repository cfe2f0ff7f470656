"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV cache.

One forward runs a flat batch of T new tokens from many sequences, with no
padding: projections are plain [T, ...] matmuls and attention goes through the
paged kernels, which read each sequence's context through its block table.

The forward is cut at the attention calls: a "head" region (norm, QKV projection,
q/k norm, rotary) before layer 0's attention, a "boundary" region between layer i's
attention and layer i+1's (output projection, residual, MLP, then the next head), and a
"tail" after the last (ending in the final norm). The regions are plain functions of
tensors, the weights passed in, so one compiled function serves every layer on CUDA.

Tensor parallelism (`shard`, see `ondo.model.parallel_layers`): each rank builds the same
model over its own heads, MLP slice and vocabulary range, and loads its slice of each
checkpoint tensor. Its forward cuts the boundary region at the two all-reduces (after the
output projection and after the down projection); with one rank nothing changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondo.distributed.group import tensor_parallel_group
from ondo.kernels.attention import write_and_attend
from ondo.kernels.gate_up_silu import (  # also registers ondo::gate_up_silu
    GATE_UP_SILU_MIN_TOKENS,
    fused_gate_up_silu,
    gate_up_persistent,
    gate_up_silu_max_hidden,
)
from ondo.kernels.metadata import AttentionMetadata
from ondo.kernels.qk_norm_rope import fused_qk_norm_rope  # also registers ondo::qk_norm_rope
from ondo.model.config import ModelConfig
from ondo.model.fusion import fused_on_cuda
from ondo.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, rms_norm, silu_and_mul
from ondo.model.parallel_layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    gate_up_parallel_linear,
    kv_head_range,
    qkv_parallel_linear,
    vocab_parallel_logits,
)


@dataclass(frozen=True)
class _RegionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    # q/k norm and rotary as one kernel on CUDA (ONDO_FUSED_QK_NORM_ROPE, read at build)
    fused_qk_norm_rope: bool = False
    # gate/up projection and SiLU-and-mul as one kernel on CUDA (ONDO_FUSED_GATE_UP_SILU)
    fused_gate_up_silu: bool = False


def _qkv(shape: _RegionShape, x, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin):
    """QKV projection, q/k norm and rotary for the shape's (this rank's) heads."""
    return _norm_and_rotate(shape, F.linear(x, qkv_w, qkv_b), q_norm_w, k_norm_w, cos, sin)


def _norm_and_rotate(shape: _RegionShape, qkv, q_norm_w, k_norm_w, cos, sin):
    """q and k normed (where the model has q/k norms) and rotated, and v, from the QKV
    projection's output [T, (Hq + 2 Hkv) D]."""
    h, hkv, d, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.eps
    n = qkv.shape[0]
    if shape.fused_qk_norm_rope and q_norm_w is not None and qkv.is_cuda:
        q, k = torch.ops.ondo.qk_norm_rope(qkv, q_norm_w, k_norm_w, cos, sin, h, hkv, d, eps)
        return q, k, qkv[:, (h + hkv) * d:].reshape(n, hkv, d)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q = q.reshape(n, h, d)
    k = k.reshape(n, hkv, d)
    v = v.reshape(n, hkv, d)
    if q_norm_w is not None:
        q = rms_norm(q, q_norm_w, eps)
        k = rms_norm(k, k_norm_w, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def _gate_up_act(shape: _RegionShape, x, gate_up_w):
    """silu(gate) * up from the MLP's input [T, H]: [T, I]. With the switch, the operator
    (which picks its kernels by the step's token count, so the region makes one graph)."""
    if shape.fused_gate_up_silu and x.is_cuda:
        return torch.ops.ondo.gate_up_silu(x, gate_up_w)
    return silu_and_mul(F.linear(x, gate_up_w))


@functools.cache
def _regions(shape: _RegionShape) -> tuple[Callable[..., tuple], Callable[..., tuple], Callable[..., torch.Tensor]]:
    """(head, boundary, tail) for one attention shape; compiled on CUDA (see fusion.py)."""
    eps = shape.eps

    def qkv(x, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin):
        return _qkv(shape, x, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin)

    def mlp_block(attn, residual, o_w, ln2_w, gate_up_w, down_w):
        hidden = residual + F.linear(attn, o_w)
        x = rms_norm(hidden, ln2_w, eps)
        return hidden + F.linear(_gate_up_act(shape, x, gate_up_w), down_w)

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


@functools.cache
def _sharded_regions(shape: _RegionShape) -> tuple[Callable[..., tuple], ...]:
    """(head, mlp, next_head, final) for one rank of a tensor-parallel model: the boundary
    region cut at its two all-reduces. `mlp` takes the reduced output projection and
    returns the residual stream and the down projection's partial sum; `next_head` takes
    that sum reduced and goes on to the next layer's q, k, v; `final` ends the last layer."""
    eps = shape.eps

    def head(hidden, ln1_w, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin):
        x = rms_norm(hidden, ln1_w, eps)
        return (hidden, *_qkv(shape, x, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin))

    def mlp(o, residual, ln2_w, gate_up_w, down_w):
        hidden = residual + o
        x = rms_norm(hidden, ln2_w, eps)
        return hidden, F.linear(_gate_up_act(shape, x, gate_up_w), down_w)

    def next_head(down, hidden, ln1_w, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin):
        return head(hidden + down, ln1_w, qkv_w, qkv_b, q_norm_w, k_norm_w, cos, sin)

    def final(down, hidden, norm_w):
        return rms_norm(hidden + down, norm_w, eps)

    return head, fused_on_cuda(mlp), fused_on_cuda(next_head), final


KVCache = tuple[
    torch.Tensor, torch.Tensor
]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]

# HF checkpoint projection name -> (fused ondo parameter, part).
_FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_SHARDS_PER_PARAM = {"qkv_proj": 3, "gate_up_proj": 2}
_QKV_PARTS = {"q": 0, "k": 1, "v": 2}


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads // shard.size  # this rank's
        self.num_kv_heads = kv_head_range(config.num_key_value_heads, shard)[1]
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = qkv_parallel_linear(config.hidden_size, config.head_dim,
                                            config.num_attention_heads, config.num_key_value_heads,
                                            config.attention_bias, shard)
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, shard)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def shard_rows(self, shard_id: str) -> tuple[int, int]:
        """Where q, k or v sits in the rows of qkv_proj: (start, length)."""
        return self.qkv_proj.local_rows(_QKV_PARTS[shard_id])

    def head_weights(self) -> tuple[torch.Tensor | None, ...]:
        return (self.qkv_proj.weight, self.qkv_proj.bias,
                None if self.q_norm is None else self.q_norm.weight,
                None if self.k_norm is None else self.k_norm.weight)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               meta: AttentionMetadata) -> torch.Tensor:
        """Write the new K/V into their slots and attend: [T, q_size]."""
        k_cache, v_cache = kv_cache
        out = write_and_attend(q, k, v, k_cache, v_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.q_size)


class LlamaMLP(torch.nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = gate_up_parallel_linear(config.hidden_size, config.intermediate_size,
                                                    shard)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, shard)


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, shard)
        self.mlp = LlamaMLP(config, shard)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def head_weights(self) -> tuple[torch.Tensor | None, ...]:
        return (self.input_layernorm.weight, *self.self_attn.head_weights())

    def tail_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.self_attn.o_proj.weight, self.post_attention_layernorm.weight,
                self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight)


class LlamaModel(torch.nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, shard)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, shard) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(torch.nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()) -> None:
        super().__init__()
        self.config = config
        self.shard = shard
        self.model = LlamaModel(config, shard)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        # Tied models have no lm_head of their own; compute_logits reads the
        # embedding, so moving or re-materializing the model cannot untie them.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else ParallelLMHead(config.vocab_size, config.hidden_size, shard)
        )
        attn = self.model.layers[0].self_attn
        self._shape = _RegionShape(attn.num_heads, attn.num_kv_heads, config.head_dim,
                                   config.rms_norm_eps, fused_qk_norm_rope(),
                                   fused_gate_up_silu() and config.hidden_size <= gate_up_silu_max_hidden())

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer in this rank's KV cache (all of them with one rank)."""
        return self._shape.num_kv_heads

    @property
    def token_count_branches(self) -> tuple[int, ...]:
        """Token counts from which a step runs other kernels (the gate/up operator's: its
        fused kernel, and on a GPU, unless ONDO_GATE_UP_PERSISTENT=0, that kernel's
        persistent grid): a CUDA graph's warm-up at one side of one compiles nothing for the other."""
        if not self._shape.fused_gate_up_silu:
            return ()
        branches = (GATE_UP_SILU_MIN_TOKENS,)
        device = self.model.embed_tokens.weight.device
        if gate_up_persistent() and device.type == "cuda":
            from ondo.kernels.launch import device_sm_count
            from ondo.kernels.triton_gate_up_silu import persistent_min_tokens

            sms = device_sm_count(device.index or 0)
            persistent = persistent_min_tokens(self.config.intermediate_size // self.shard.size, sms)
            branches += (persistent,) if persistent > GATE_UP_SILU_MIN_TOKENS else ()
        return branches

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of the T new tokens."""
        if self.shard.size > 1:
            return self._sharded_forward(input_ids, positions, kv_caches, meta)
        head, boundary, tail = _regions(self._shape)
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

    def _sharded_forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                         kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """One rank's forward: attention over its heads, its slice of the MLP; the two
        row-parallel layers' all-reduces (o-proj in its own forward, down after the `mlp`
        region that ends in its matmul) make every rank's residual stream the full one."""
        head, mlp, next_head, final = _sharded_regions(self._shape)
        all_reduce = tensor_parallel_group().all_reduce
        hidden = self.model.embed_tokens(input_ids)  # masked lookup + all-reduce
        cos, sin = self.rotary_emb(positions)
        layers = self.model.layers
        residual, q, k, v = head(hidden, *layers[0].head_weights(), cos, sin)
        last = len(layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
            attn = layer.self_attn.attend(q, k, v, kv_cache, meta)
            o = layer.self_attn.o_proj(attn)
            hidden, down = mlp(o, residual, layer.post_attention_layernorm.weight,
                               layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)
            down = all_reduce(down)
            if i == last:
                return final(down, hidden, self.model.norm.weight)
            residual, q, k, v = next_head(down, hidden, *layers[i + 1].head_weights(), cos, sin)
        raise AssertionError("a model has at least one layer")

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """[N, hidden] -> logits [N, vocab] in `dtype` (None: the model's own, as the matmul
        writes them; the engine's sampler reads bf16 logits where it can, which saves a
        float32 copy of [N, vocab] a step). On rank 0 of a tensor-parallel model; the other
        ranks get their own vocabulary slice, which nobody reads."""
        if self.shard.size > 1:
            logits = vocab_parallel_logits(hidden, self.lm_head_weight, self.config.vocab_size, self.shard)
        else:
            logits = F.linear(hidden, self.lm_head_weight)
        return logits if dtype is None else logits.to(dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """Copy HF-named tensors into ondo's (fused) parameters, each cut to this rank's
        slice as it comes (no rank holds a whole sharded tensor for longer than its copy).

        Returns how many tensors went into each parameter: a fused one
        (qkv_proj, gate_up_proj) takes one per part.
        """
        params = dict(self.named_parameters())
        loaded: dict[str, int] = {}
        for hf_name, tensor in weights:
            name, part = _ondo_name(hf_name)
            if name is None:
                continue
            if self.lm_head is None and name == "lm_head.weight":
                continue  # tied checkpoints sometimes still carry a copy
            if name not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no ondo parameter {name!r}")
            self._copy_into(params[name], name, part, tensor, hf_name)
            loaded[name] = loaded.get(name, 0) + 1
        return loaded

    def _copy_into(self, param: torch.Tensor, name: str, part: int | None, tensor: torch.Tensor,
                   hf_name: str) -> None:
        module = self.get_submodule(name.rsplit(".", 1)[0])
        try:
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                module.load(param, part, tensor, hf_name)
                return
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
        except ValueError as e:
            raise ValueError(f"{e} for {name}") from None
        with torch.no_grad():
            param.copy_(tensor)

    def missing_parameters(self, loaded: dict[str, int]) -> list[str]:
        """Parameters a checkpoint left unfilled, given load_weights' counts."""
        missing = []
        for name, _ in self.named_parameters():
            kind = name.rsplit(".", 2)[-2]
            if loaded.get(name, 0) < _SHARDS_PER_PARAM.get(kind, 1):
                missing.append(name)
        return missing


def _ondo_name(hf_name: str) -> tuple[str | None, int | None]:
    """HF parameter name -> (ondo parameter name, part of a fused one); None for tensors
    ondo does not use."""
    if "rotary_emb.inv_freq" in hf_name:
        return None, None
    for hf_proj, (fused, part) in _FUSED_SHARDS.items():
        if f".{hf_proj}." in hf_name:
            return hf_name.replace(hf_proj, fused), part
    return hf_name, None
