"""Offline workloads: random token prompts with fixed lengths, all with ignore_eos and a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ondo.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: list[Request]

    @property
    def input_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def params(self, temperature: float = 0.6) -> list[SamplingParams]:
        return [SamplingParams(temperature=temperature, max_tokens=r.max_tokens, ignore_eos=True)
                for r in self.requests]

    def subset(self, n: int) -> Workload:
        return Workload(self.name, f"{self.description} (first {n} requests)", self.requests[:n])


def _random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


# The longest request (prompt + output tokens) each workload can draw, whatever its seed
# or scale: what max_model_len must hold for it to run.
MAX_REQUEST_TOKENS = {"W1": 1024 + 1024, "W2": 128 + 1024, "W3": 2048 + 16}


def make_workload(name: str, vocab: int, seed: int = 0, scale: float = 1.0) -> Workload:
    """W1 nano-vllm's mix, W2 decode-heavy, W3 prefill-heavy; `scale` shrinks the request
    count (for smoke runs), never the lengths."""
    rng = random.Random(seed)

    def count(n: int) -> int:
        return max(1, round(n * scale))

    if name == "W1":
        reqs = [Request(_random_prompt(rng, vocab, rng.randint(100, 1024)), rng.randint(100, 1024))
                for _ in range(count(256))]
        return Workload(name, f"{len(reqs)} requests, input and output uniform in [100, 1024]", reqs)
    if name == "W2":
        reqs = [Request(_random_prompt(rng, vocab, 128), 1024) for _ in range(count(256))]
        return Workload(name, f"decode-heavy: {len(reqs)} requests, input 128, output 1024", reqs)
    if name == "W3":
        reqs = [Request(_random_prompt(rng, vocab, 2048), 16) for _ in range(count(1024))]
        return Workload(name, f"prefill-heavy: {len(reqs)} requests, input 2048, output 16", reqs)
    raise ValueError(f"unknown workload {name!r}; known: W1, W2, W3")


def warm_up_workload(vocab: int) -> Workload:
    """What a GPU run steps through before it measures: 32 of W1's requests on other prompts
    (seed 999), so that the kernels' first shapes compile, the graphs make their first
    replays and the allocators take their blocks outside the timed run."""
    return make_workload("W1", vocab, seed=999, scale=0.125)
