"""What one step must move and compute, from its shape alone: the roofline bound, the twin's
load input, and the step-time model of the closed-loop simulator all start here.

Each weight and each cached K/V is read once, new K/V written once; FLOPs are the linear
layers over every token, the LM head over the sampled rows, and attention over the causal
pairs. Pure numpy over sequences: no tensor, no device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostShape:
    """The parts of a decoder's shape a step's cost depends on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int  # bytes per weight and activation element
    kv_bytes_per_token: float  # K and V of one token over all layers

    @classmethod
    def from_config(cls, cfg, dtype_bytes: int, num_layers: int | None = None) -> CostShape:
        """From a `ModelConfig` (or anything with its field names); K/V in the weights' dtype."""
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        kv = 2 * layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
        return cls(cfg.hidden_size, cfg.intermediate_size, layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, dtype_bytes, float(kv))

    @property
    def linear_params(self) -> int:
        q_size = self.num_attention_heads * self.head_dim
        kv_size = self.num_key_value_heads * self.head_dim
        h = self.hidden_size
        return self.num_layers * (h * (q_size + 2 * kv_size) + q_size * h
                                  + 3 * h * self.intermediate_size)

    @property
    def head_params(self) -> int:
        return self.vocab_size * self.hidden_size


def step_cost(shape: CostShape, query_lens, context_lens, num_sampled: int) -> tuple[float, float]:
    """(FLOPs, bytes) of a step whose sequences take `query_lens` new tokens each and reach
    `context_lens` tokens (the new ones included); `num_sampled` rows go through the LM head."""
    q_lens = np.asarray(query_lens, dtype=np.float64)
    ctx = np.asarray(context_lens, dtype=np.float64)
    tokens = float(q_lens.sum())
    attended = float((q_lens * ctx - q_lens * (q_lens - 1) / 2).sum())  # causal pairs
    linear, head = shape.linear_params, shape.head_params
    flops = (2.0 * linear * tokens + 2.0 * head * num_sampled
             + 4.0 * shape.num_attention_heads * shape.head_dim * shape.num_layers * attended)
    elt = shape.dtype_bytes
    kv = shape.kv_bytes_per_token
    bytes_moved = ((linear + head) * elt + tokens * shape.hidden_size * elt
                   + kv * (float(ctx.sum()) - tokens) + kv * tokens)
    return flops, bytes_moved
