"""One request's tokens, KV blocks and progress through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ondo.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time_s: float
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # physical GPU blocks, logical order
    cpu_block_table: list[int] = field(default_factory=list)  # while swapped out
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    stream: bool = True  # report every step's tokens, not only the final output
    detokenize: bool = True  # streamed text deltas made here (False: the caller decodes)
    index: int = 0  # which of the request's n sequences (parallel sampling)
    forked: bool = False  # n > 1: its other sequences exist and run beside it
    # Prefix caching: chained hashes of the full blocks of token_ids (memoized), and how
    # many leading blocks of block_table have been offered to the cache.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_registered_blocks: int = 0
    # Tokens drawn on the device but not yet read back (asynchronous scheduling): they
    # follow token_ids, and the next step feeds them to the model from the device.
    num_pending_tokens: int = 0
    pending_row: int = -1  # its row in the draws of the step still in flight

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    @property
    def num_total_tokens(self) -> int:
        """Known tokens plus those still on the device."""
        return len(self.token_ids) + self.num_pending_tokens

    def reaches_length_limit(self, max_model_len: int) -> bool:
        """Its pending tokens take it to max_tokens or max_model_len: it ends once they land."""
        total = self.num_total_tokens
        max_tokens = self.params.max_tokens
        return (max_tokens is not None and total - len(self.prompt_token_ids) >= max_tokens) \
            or total >= max_model_len

    @property
    def num_seats(self) -> int:
        """Places of `max_num_seqs` it holds: a request with n > 1 holds n from admission
        on, since it becomes n sequences when its first token is sampled."""
        n = self.params.num_sequences
        return n if n > 1 and self.index == 0 and not self.forked else 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
