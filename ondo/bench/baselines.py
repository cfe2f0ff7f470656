"""transformers on the same model and workload: static-batch `generate` and its own
continuous batching (`generate_batch`). Throughput counts only the tokens each request
asked for, so padding a static batch to its longest request costs it time, not tokens."""

from __future__ import annotations

import logging
import time

import torch

from ondo.bench.workloads import Workload

log = logging.getLogger(__name__)


def load_hf_model(folder: str, device: torch.device, attn_implementation: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def static_batch_generate(model, workload: Workload, batch_size: int, max_time_s: float) -> float:
    """Output tokens per second of `generate` on one left-padded static batch of the
    workload's first `batch_size` requests, stopped after `max_time_s` (generate's own
    `max_time`). Only tokens a request asked for count: min(steps run, its max_tokens)."""
    device = next(model.parameters()).device
    batch = workload.requests[:batch_size]
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids):] = 1
    longest = max(r.max_tokens for r in batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                             min_new_tokens=longest, do_sample=True, temperature=0.6, top_k=0,
                             eos_token_id=None, pad_token_id=0, max_time=max_time_s)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    steps = out.shape[1] - width
    useful = sum(min(steps, r.max_tokens) for r in batch)
    log.info("transformers generate bs=%d: %d steps in %.1f s, %d useful tokens", len(batch), steps,
             elapsed, useful)
    return useful / elapsed


def continuous_batching_generate(model, workload: Workload, max_new_tokens: int) -> float:
    """Output tokens per second of transformers' own continuous batching, every request
    capped at `max_new_tokens` (its generation config takes one limit for all)."""
    from transformers import GenerationConfig

    caps = [min(r.max_tokens, max_new_tokens) for r in workload.requests]
    config = GenerationConfig(max_new_tokens=max(caps), do_sample=False, eos_token_id=-1, pad_token_id=0,
                              max_batch_tokens=2048)
    inputs = [r.prompt_token_ids for r in workload.requests]
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate_batch(inputs=inputs, generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    log.info("transformers generate_batch: %d requests in %.1f s", len(inputs), elapsed)
    return len(inputs) * max(caps) / elapsed
