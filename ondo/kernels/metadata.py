"""The flat batch that one engine step hands to the model and the kernels."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to.

    A step packs the new tokens of B sequences into one flat tensor of T tokens
    (no padding). Sequence ``i`` owns new tokens ``query_start_loc[i]`` up to
    ``query_start_loc[i + 1]``; they are the last ``query_len`` positions of its
    ``context_lens[i]`` tokens, all of which (cached prefix and new tokens) are
    reached through ``block_tables[i]``.
    """

    slot_mapping: torch.Tensor  # [T] int64: physical slot (block * block_size + offset) per new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with 0 past the used blocks
    context_lens: torch.Tensor  # [B] int32: tokens in context after this step (prefix + new)
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts
    max_query_len: int
    max_context_len: int
    block_size: int
    # [1] int32 on the device, read only where the host lengths are absent (a CUDA graph's
    # capture): nonzero sends the sequences with one new token to the decode kernel.
    split_decode_rows: torch.Tensor | None = None
    # [1] int32 on the device, read by a CUDA graph's decode kernel where it splits its
    # contexts: the context tokens per split, set before each replay from the step's own
    # longest context (`graph_split_tokens`); the grid, captured once, holds the splits of
    # `max_context_len`, the longest context the engine allows.
    decode_split_tokens: torch.Tensor | None = None
    # Host copies, so the reference path never waits on the device for sizes.
    query_lens_cpu: list[int] | None = None
    context_lens_cpu: list[int] | None = None
    # (kv heads, SMs) -> whether this step's decode rows go to the decode kernel: made once
    # a step by `ondo.kernels.attention.splits_mixed_step`, read by every later layer.
    split_choices: dict[tuple[int, int], bool] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def num_single_token_seqs(self) -> int | None:
        """Sequences bringing exactly one new token, from the host lengths (None without
        them): counted once a step, however many layers ask."""
        if self.query_lens_cpu is None:
            return None
        return sum(1 for n in self.query_lens_cpu if n == 1)

    @functools.cached_property
    def prompt_pairs_and_decode_tokens(self) -> tuple[int, int] | None:
        """(causal query-key pairs of the sequences bringing several new tokens, context
        tokens of those bringing one): the two kinds of attention work in a mixed step,
        from the host lengths (None without them), once a step."""
        if self.query_lens_cpu is None or self.context_lens_cpu is None:
            return None
        pairs = decode_tokens = 0
        for q, c in zip(self.query_lens_cpu, self.context_lens_cpu):
            if q == 1:
                decode_tokens += c
            elif q > 1:
                pairs += q * c - q * (q - 1) // 2
        return pairs, decode_tokens

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
