"""Workloads where KV memory sharing pays, for the throughput benchmark: token ids in,
(prompt ids, SamplingParams) pairs out, reproducible from a seed. Plus a helper that
runs one through an engine and reports the peak KV blocks in use.

- W4, shared system prompt: 512 requests = one 1,024-token system prompt + a distinct
  128-token question each; 128 output tokens. Prefix caching prefills the system prompt
  once and holds one copy of its blocks.
- W5, parallel sampling: 64 prompts of 512 tokens, n=8 samples of 256 tokens each at
  temperature 1.0. Each prompt is prefilled once and its blocks shared by its 8
  sequences (copy-on-write of the last partial block).

Token ids are uniform over the vocabulary (ignore_eos keeps every output at full length).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ondo.engine.sampling_params import SamplingParams
from ondo.engine.step_stats import StepStats

Workload = list[tuple[list[int], SamplingParams]]
# The longest request (prompt + output tokens) of each, with the defaults below.
MAX_REQUEST_TOKENS = {"W4": 1024 + 128 + 128, "W5": 512 + 256}


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def w4_shared_system_prompt(tokenizer_vocab: int, seed: int, *, num_requests: int = 512,
                            system_tokens: int = 1024, question_tokens: int = 128,
                            output_tokens: int = 128) -> Workload:
    rng = random.Random(seed)
    system = _ids(rng, tokenizer_vocab, system_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    return [(system + _ids(rng, tokenizer_vocab, question_tokens), params) for _ in range(num_requests)]


def w5_parallel_sampling(vocab: int, seed: int, *, num_prompts: int = 64, n: int = 8,
                         input_tokens: int = 512, output_tokens: int = 256) -> Workload:
    rng = random.Random(seed)
    # Prompt i has seed base + i*n; its sequences use base + i*n + j (the n > 1 rule), so
    # no two sequences of the workload share a seed.
    base = seed * 1_000_000
    return [
        (_ids(rng, vocab, input_tokens),
         SamplingParams(n=n, temperature=1.0, seed=base + i * n, max_tokens=output_tokens, ignore_eos=True))
        for i in range(num_prompts)
    ]


@dataclass
class PeakKVBlocks:
    """A step listener: the most KV blocks in use after any step."""

    peak_blocks: int = 0
    total_blocks: int = 0
    num_steps: int = 0
    num_computed_tokens: int = 0  # prefill + decode tokens the model ran

    def __call__(self, stats: StepStats) -> None:
        self.peak_blocks = max(self.peak_blocks, stats.num_kv_blocks_used)
        self.total_blocks = stats.num_kv_blocks_total
        self.num_steps += 1
        self.num_computed_tokens += stats.num_prefill_tokens + stats.num_decode_tokens


def run_and_measure_peak_kv_blocks(engine, workload: Workload, request_prefix: str = "w") -> PeakKVBlocks:
    """Run every request of `workload` to completion on an `LLMEngine`; the listener's
    figures cover this run only."""
    peak = PeakKVBlocks()
    engine.add_step_listener(peak)
    for i, (ids, params) in enumerate(workload):
        engine.add_request(f"{request_prefix}{i}", prompt_token_ids=ids, params=params)
    while engine.has_unfinished_requests():
        engine.step()
    engine.remove_step_listener(peak)
    return peak
