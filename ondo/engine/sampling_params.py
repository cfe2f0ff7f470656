"""How to pick each next token and when to stop: validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ondo.engine.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5
MAX_N = 16
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value


@dataclass
class SamplingParams:
    # Parallel sampling: n sequences share the prompt's prefill. Sequence i of a request
    # with seed s samples as a request with seed s + i would (and n=1), so `n=4, seed=s`
    # gives the outputs of four requests with seeds s, s+1, s+2, s+3.
    n: int = 1
    # Sequences generated, of which the n with the highest cumulative log-probability are
    # returned (None: n). They are reported only when all have finished.
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per sampled token (0: just the sampled one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    # The output must match this (a JSON schema, a regex, a choice, a grammar).
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"invalid sampling parameter structured_outputs=...: {e}") from None
        if self.logit_bias:
            self.logit_bias = _int_keys(self.logit_bias)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.n > MAX_N:
            raise bad("n", f"must be at most {MAX_N}")
        if not is_num(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be a number in [0, 100]")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if not is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if not is_num(self.presence_penalty) or not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not is_num(self.frequency_penalty) or not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop_list):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if self.best_of is not None:
            if not is_int(self.best_of) or self.best_of < self.n:
                raise bad("best_of", f"must be an integer >= n={self.n}")
            if self.best_of > MAX_N:
                raise bad("best_of", f"must be at most {MAX_N}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must map token ids to numbers")
            for token, bias in self.logit_bias.items():
                if not is_int(token) or token < 0:
                    raise ValueError(f"invalid sampling parameter logit_bias={{{token!r}: ...}}: "
                                     "keys must be token ids (integers >= 0)")
                if not is_num(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                    raise ValueError(f"invalid sampling parameter logit_bias={{{token}: {bias!r}}}: "
                                     "a bias must be a number in [-100, 100]")
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError("invalid sampling parameter structured_outputs=...: must be a "
                             "StructuredOutputsParams or a dict of its fields")

    def for_sequence(self, index: int) -> SamplingParams:
        """The parameters sequence `index` of an n > 1 request samples with (n=1, seed + index)."""
        if index == 0 and self.num_sequences == 1:
            return self
        seed = None if self.seed is None else self.seed + index
        # best_of > n: each sequence keeps best_of, so it keeps its cumulative logprob to rank by.
        return dataclasses.replace(self, n=1, seed=seed,
                                   best_of=self.best_of if self.ranks_by_logprob else None)

    @property
    def num_sequences(self) -> int:
        """Sequences the request runs: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def ranks_by_logprob(self) -> bool:
        """best_of > n: the outputs are the n best of more sequences (each needs its
        cumulative log-probability)."""
        return self.best_of is not None and self.best_of > self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _int_keys(bias: Any) -> Any:
    """JSON object keys are strings: {"50256": -100} means token 50256."""
    if not isinstance(bias, dict):
        return bias
    out: dict[Any, Any] = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        out[key] = value
    return out
