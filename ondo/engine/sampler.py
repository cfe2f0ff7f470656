"""From logits to next tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Rows are sequences that sample this step. Work is vectorized over rows; only rows
with a per-request seed get their own generator, so a seeded request draws the same
tokens alone or inside any batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ondo.engine.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: logprob} for the sampled token and the top-N, or None.
    logprobs: list[dict[int, float] | None]
    sampled_logprobs: list[float | None]


def _seed_for(seed: int, output_index: int) -> int:
    # One stream of draws per (request seed, output position): independent of the
    # batch, and repeatable after a preemption.
    return (seed * 1_000_003 + output_index * 7_919 + 0x5EED) % (2**63 - 1)


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
) -> None:
    """In place. Repetition penalty (HF's, over prompt and output); presence and
    frequency penalties (OpenAI's, over the output)."""
    vocab = logits.shape[1]
    for row, p in enumerate(params):
        if not p.has_penalties:
            continue
        out = torch.tensor(output_ids[row], dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(prompt_ids[row] + output_ids[row], dtype=torch.long, device=logits.device)
            seen = seen.unique()
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and out.numel():
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask what top-k, top-p and min-p exclude (per-row parameters; 0/1/0 mean off).
    Which filters run is decided from the host-side parameters: no device sync."""
    vocab = logits.shape[1]
    device = logits.device
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        drop = ranks >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(-1) - probs
        drop |= mass_before >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [N, vocab] float32, raw model output
    params: list[SamplingParams],
    output_lens: list[int],  # tokens each row has generated so far (for seeded draws)
    generator: torch.Generator | None = None,
    history: Callable[[], tuple[list[list[int]], list[list[int]]]] | None = None,
) -> SamplerOutput:
    """`history()` gives (prompt ids, output ids) per row; called only if a penalty needs it."""
    n = logits.shape[0]
    device = logits.device
    want_logprobs = [p.logprobs is not None for p in params]
    raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None

    if any(p.has_penalties for p in params):
        if history is None:
            raise ValueError("penalties need the token history")
        prompt_ids, output_ids = history()
        logits = logits.clone()
        apply_penalties(logits, params, prompt_ids, output_ids)

    tokens = logits.argmax(-1)
    if not all(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params], device=device)
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
        scaled = _filter(logits / temps[:, None], params)
        probs = scaled.softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for row, p in enumerate(params):
            if p.seed is not None and not p.greedy:
                g = torch.Generator(device=device)
                g.manual_seed(_seed_for(p.seed, output_lens[row]))
                noise[row].exponential_(generator=g)
        sampled = (probs / noise).argmax(-1)
        tokens = torch.where(greedy, tokens, sampled)

    token_list = tokens.tolist()
    logprob_dicts: list[dict[int, float] | None] = [None] * n
    sampled_lp: list[float | None] = [None] * n
    if raw_logprobs is not None:
        max_top = max((p.logprobs or 0) for p in params)
        top_vals, top_ids = (raw_logprobs.topk(max_top, dim=-1) if max_top else (None, None))
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        top_vals_l = top_vals.tolist() if top_vals is not None else None
        top_ids_l = top_ids.tolist() if top_ids is not None else None
        for row, p in enumerate(params):
            if p.logprobs is None:
                continue
            d = {token_list[row]: chosen[row]}
            if p.logprobs and top_ids_l is not None:
                for tid, val in zip(top_ids_l[row][: p.logprobs], top_vals_l[row][: p.logprobs]):
                    d.setdefault(tid, val)
            logprob_dicts[row] = d
            sampled_lp[row] = chosen[row]
    return SamplerOutput(token_list, logprob_dicts, sampled_lp)
