"""Megatron-style tensor-parallel layers: each rank holds a slice of a weight, and one
collective puts the slices' results together where the math needs it.

- Column-parallel (the fused QKV and gate-up projections): the output features are split
  across ranks, part by part (q, k, v; gate, up), so each rank's output is a whole set of
  heads or a whole slice of the MLP's width. No communication: the next layer takes the
  slice as it is.
- Row-parallel (o-proj, down): the input features are split; each rank's matmul is a
  partial sum of the full output, and exactly one all-reduce adds them.
- Vocabulary-parallel embedding: each rank holds a contiguous range of the vocabulary's
  rows; ids outside it look up zeros, and one all-reduce adds the ranks' rows.
- Vocabulary-parallel LM head: each rank's logits over its range; rank 0 gathers them.

The vocabulary is padded up to a multiple of the rank count (`vocab_range`): the last
rank's padding rows are zeros and their logits are cut off, so any vocabulary size works.
Attention heads are split evenly (`Shard.split`); KV heads too while there are at least as
many as ranks, else each KV head is replicated on size / num_kv_heads ranks
(`kv_head_range`): the ranks that share a KV head are exactly those whose query heads use it.

With one rank (`Shard.size == 1`) each layer is the plain unsharded layer: the same
parameter, the same operation, no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondo.distributed.group import tensor_parallel_group


@dataclass(frozen=True)
class Shard:
    """Which rank of how many holds this copy of the model."""

    rank: int = 0
    size: int = 1

    def split(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` (which `size` divides)."""
        per = total // self.size
        return self.rank * per, per


@dataclass(frozen=True)
class PartSlice:
    """One part of a fused column-parallel weight: its full row count, and the rows of it
    this rank holds."""

    full_rows: int
    start: int
    length: int


def kv_head_range(num_kv_heads: int, shard: Shard) -> tuple[int, int]:
    """(first KV head, count) this rank holds: an even share, or one replicated head when
    there are fewer KV heads than ranks (size must then be a multiple of num_kv_heads)."""
    if shard.size <= num_kv_heads:
        return shard.split(num_kv_heads)
    return shard.rank * num_kv_heads // shard.size, 1


def vocab_range(vocab_size: int, shard: Shard) -> tuple[int, int, int]:
    """(start, end, rows per rank): this rank's ids are [start, end); every rank holds
    ceil(vocab / size) rows, the last one padded with zeros past the vocabulary."""
    per_rank = -(-vocab_size // shard.size)
    start = min(shard.rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


def _check_full(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")


class ColumnParallelLinear(torch.nn.Module):
    """y = x W^T (+ b) over this rank's rows of each fused part, parts in order.
    `weight` is [sum of the parts' lengths, in_features]."""

    def __init__(self, in_features: int, parts: list[PartSlice], bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = parts
        self.offsets = [sum(p.length for p in parts[:i]) for i in range(len(parts))]
        rows = sum(p.length for p in parts)
        self.weight = torch.nn.Parameter(torch.empty(rows, in_features))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(rows))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def local_rows(self, part: int) -> tuple[int, int]:
        """(start, length) of `part` in this rank's rows."""
        return self.offsets[part], self.parts[part].length

    def load(self, param: torch.Tensor, part: int, full: torch.Tensor, name: str) -> None:
        """Copy this rank's rows of the checkpoint's whole `part` (weight or bias) into `param`."""
        p = self.parts[part]
        _check_full(name, full, (p.full_rows, *param.shape[1:]))
        with torch.no_grad():
            param.narrow(0, self.offsets[part], p.length).copy_(full.narrow(0, p.start, p.length))


def qkv_parallel_linear(hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                        bias: bool, shard: Shard) -> ColumnParallelLinear:
    """The fused QKV projection: this rank's query heads, then its KV heads for k and v."""
    q_start, q_heads = shard.split(num_heads)
    kv_start, kv_heads = kv_head_range(num_kv_heads, shard)
    q = PartSlice(num_heads * head_dim, q_start * head_dim, q_heads * head_dim)
    kv = PartSlice(num_kv_heads * head_dim, kv_start * head_dim, kv_heads * head_dim)
    return ColumnParallelLinear(hidden_size, [q, kv, kv], bias)


def gate_up_parallel_linear(hidden_size: int, intermediate_size: int,
                            shard: Shard) -> ColumnParallelLinear:
    """The fused gate-up projection: this rank's slice of the gate, then the same of up."""
    start, length = shard.split(intermediate_size)
    part = PartSlice(intermediate_size, start, length)
    return ColumnParallelLinear(hidden_size, [part, part], bias=False)


class RowParallelLinear(torch.nn.Module):
    """y = sum over ranks of x_rank W_rank^T: this rank's columns of W, one all-reduce."""

    def __init__(self, in_features: int, out_features: int, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.in_features = in_features
        self.in_start, in_local = shard.split(in_features)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.shard.size > 1:
            tensor_parallel_group().all_reduce(y)
        return y

    def load(self, param: torch.Tensor, part: int | None, full: torch.Tensor, name: str) -> None:
        _check_full(name, full, (param.shape[0], self.in_features))
        with torch.no_grad():
            param.copy_(full.narrow(1, self.in_start, param.shape[1]))


class VocabParallelEmbedding(torch.nn.Module):
    """Token embeddings over this rank's range of the vocabulary: out-of-range ids look up
    zeros, and one all-reduce adds the ranks' rows."""

    def __init__(self, vocab_size: int, hidden_size: int, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.start, self.end, rows = vocab_range(vocab_size, shard)
        self.weight = torch.nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        rows = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        rows = rows.masked_fill(~mine.unsqueeze(-1), 0.0)
        return tensor_parallel_group().all_reduce(rows)

    def load(self, param: torch.Tensor, part: int | None, full: torch.Tensor, name: str) -> None:
        _check_full(name, full, (self.vocab_size, self.hidden_size))
        n = self.end - self.start
        with torch.no_grad():
            param.narrow(0, 0, n).copy_(full.narrow(0, self.start, n))
            param.narrow(0, n, param.shape[0] - n).zero_()  # padding past the vocabulary


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection's rows, split like the embedding (`vocab_parallel_logits`
    reads its weight, or the embedding's where the two are tied)."""


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                          shard: Shard) -> torch.Tensor:
    """[N, hidden] x this rank's vocabulary rows -> logits. With one rank, the whole
    [N, vocab]; with more, rank 0 gets the whole [N, vocab] (the ranks' slices gathered
    in order, padding cut off) and the other ranks their own slice, which nobody reads."""
    local = F.linear(hidden, weight)
    if shard.size == 1:
        return local
    parts = tensor_parallel_group().gather_to_first(local)
    if parts is None:
        return local
    return torch.cat(parts, dim=-1)[:, :vocab_size]
