"""Run-time limits on the scheduler, which a governor sets while the engine runs.

They can only tighten what the engine was configured with (`max_num_batched_tokens`,
`max_num_seqs`); `None` leaves a limit at its configured value.

- `max_num_batched_tokens`: the per-step token budget.
- `max_num_seqs`: seats for running sequences. Lowering it below what runs stops admissions
  (and swap-ins) until the running set has drained below it; nothing is preempted, since a
  preemption spends the very work (a swap or a recompute) that the limit is meant to save.
- `max_prefill_tokens`: the prefill chunk: prompt tokens computed per step, all sequences
  together (with chunked prefill; without it a prompt still runs whole).
- `prefill_tokens_per_s`: admission pacing, a token bucket on prompt tokens. A step may start
  prefill work while the bucket is not empty and then draws it down (into debt if a whole
  prompt or chunk needs it), so a burst of arrivals is spread over time instead of landing
  on the GPU as a few compute-heavy steps.
- `duty_cycle`: step pacing. Below 1 the engine steps in slices of `slice_s`, lets the GPU
  finish (drain), then idles (1 - d) / d of the slice's busy time: the GPU's average load,
  hence its average power and heat, scale with d while each busy step keeps its full batch.

Reading the limits each step is O(1): the scheduler keeps the effective values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MIN_DUTY_CYCLE = 0.05
PACING_BURST_S = 0.1  # bucket depth, in seconds of the pacing rate
MIN_PACING_BURST_TOKENS = 64
DEFAULT_SLICE_S = 0.04


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    max_prefill_tokens: int | None = None
    prefill_tokens_per_s: float | None = None
    duty_cycle: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"scheduler limit {name}={value!r} must be an integer >= 1")
        if self.prefill_tokens_per_s is not None and not self.prefill_tokens_per_s > 0:
            raise ValueError(f"scheduler limit prefill_tokens_per_s={self.prefill_tokens_per_s!r} "
                             "must be > 0 (None: no pacing)")
        if not MIN_DUTY_CYCLE <= self.duty_cycle <= 1.0:
            raise ValueError(f"scheduler limit duty_cycle={self.duty_cycle!r} must be in "
                             f"[{MIN_DUTY_CYCLE}, 1]")

    def as_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerLimits:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown scheduler limit(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


UNLIMITED = SchedulerLimits()


class PrefillPacer:
    """A token bucket on prompt tokens: `rate_per_s`, at most `depth` tokens saved up."""

    def __init__(self, rate_per_s: float, now_s: float, level: float | None = None) -> None:
        self.rate_per_s = rate_per_s
        self.depth = max(rate_per_s * PACING_BURST_S, MIN_PACING_BURST_TOKENS)
        self.level = self.depth if level is None else min(level, self.depth)
        self._last_s = now_s

    def refill(self, now_s: float) -> float:
        """Tokens in the bucket now (negative while a large chunk is being paid off)."""
        self.level = min(self.depth, self.level + self.rate_per_s * max(0.0, now_s - self._last_s))
        self._last_s = now_s
        return self.level

    def take(self, tokens: int) -> None:
        self.level -= tokens


class DutyCycleGate:
    """Step pacing for the engine loop (and the simulator's): count busy time with `add_busy`;
    once a slice is over (`slice_over`), the caller lets the GPU finish, then idles for
    `end_slice()` seconds."""

    def __init__(self, slice_s: float = DEFAULT_SLICE_S) -> None:
        self.slice_s = slice_s
        self.duty = 1.0
        self._busy_s = 0.0
        self.paused_s = 0.0  # total idle time the gate asked for

    def set_duty(self, duty: float) -> None:
        if duty != self.duty:
            self.duty = duty
            self._busy_s = 0.0

    def add_busy(self, seconds: float) -> None:
        if self.duty < 1.0:
            self._busy_s += max(0.0, seconds)

    def slice_over(self) -> bool:
        return self.duty < 1.0 and self._busy_s >= self.slice_s

    def end_slice(self) -> float:
        """The idle time owed for the slice just ended (and a new slice begins)."""
        pause_s = self._busy_s * (1.0 - self.duty) / self.duty
        self._busy_s = 0.0
        self.paused_s += pause_s
        return pause_s
