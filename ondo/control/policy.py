"""What every policy shares: its verdict, the engine's configured limits, the way a load level
becomes scheduler limits, and the TPOT SLO shaper.

A policy's main output is the load level u in [MIN_LEVEL, 1]: the engine's duty cycle (the
fraction of wall time it steps). Average power and heat scale with u while every busy step
keeps its full batch, which costs the fewest tokens per watt saved for memory-bound decoding
(a smaller batch would read the weights once for fewer tokens). The TPOT SLO, when set,
shapes the batch instead: seats and the prefill chunk (`TpotShaper`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from ondo.control.inputs import GovernorInputs
from ondo.control.objectives import Objectives
from ondo.engine.scheduler_limits import MIN_DUTY_CYCLE, UNLIMITED, SchedulerLimits

MIN_LEVEL = 0.1
LEVEL_STEP = 0.05


@dataclass(frozen=True)
class EngineConfig:
    """The limits the engine was configured with (the governor only tightens them)."""

    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass(frozen=True)
class Verdict:
    limits: SchedulerLimits
    reason: str
    forecast: dict = field(default_factory=dict)


class Policy(Protocol):
    name: str
    period_s: float

    def decide(self, inputs: GovernorInputs, objectives: Objectives,
               config: EngineConfig) -> Verdict: ...


class OffPolicy:
    """No limits: the engine runs as configured and the GPU's own controllers act."""

    name = "off"
    period_s = 1.0

    def decide(self, inputs: GovernorInputs, objectives: Objectives,
               config: EngineConfig) -> Verdict:
        return Verdict(UNLIMITED, "governor off")


def quantize_level(u: float) -> float:
    """Load levels in steps of LEVEL_STEP (fewer decisions for the same effect), rounded down."""
    u = min(1.0, max(MIN_LEVEL, u))
    return round(max(MIN_LEVEL, math.floor(u / LEVEL_STEP + 1e-9) * LEVEL_STEP), 4)


def limits_for(level: float, seats: int | None, chunk: int | None) -> SchedulerLimits:
    return SchedulerLimits(max_num_seqs=seats, max_prefill_tokens=chunk,
                           duty_cycle=max(MIN_DUTY_CYCLE, min(1.0, level)))


class TpotShaper:
    """Keeps the p99 time per output token under the SLO by halving the prefill chunk and
    cutting seats by a fifth when over it; gives them back (chunk x1.5, seats +10 %) once
    under 70 % of it, at most once per `hold_s`. Larger batches read the weights once for
    more tokens, so within the SLO the largest batch is the most tokens per joule."""

    def __init__(self, config: EngineConfig, hold_s: float = 1.0, min_seats: int = 4,
                 min_chunk: int = 256) -> None:
        self.config = config
        self.hold_s = hold_s
        self.min_seats = min(min_seats, config.max_num_seqs)
        self.min_chunk = min(min_chunk, config.max_num_batched_tokens)
        self.seats: int | None = None
        self.chunk: int | None = None
        self._last_change_s = -math.inf

    def update(self, tpot_p99_s: float | None, slo_s: float | None, now_s: float) -> bool:
        """Adjust; True while the SLO shapes the batch."""
        if slo_s is None:
            self.seats = self.chunk = None
            return False
        if tpot_p99_s is None or now_s - self._last_change_s < self.hold_s:
            return self.seats is not None or self.chunk is not None
        seats = self.seats or self.config.max_num_seqs
        chunk = self.chunk or self.config.max_num_batched_tokens
        if tpot_p99_s > slo_s:
            seats = max(self.min_seats, int(seats * 0.8))
            chunk = max(self.min_chunk, chunk // 2)
            self._last_change_s = now_s
        elif tpot_p99_s < 0.7 * slo_s and (self.seats is not None or self.chunk is not None):
            seats = min(self.config.max_num_seqs, int(seats * 1.1) + 1)
            chunk = min(self.config.max_num_batched_tokens, int(chunk * 1.5))
            self._last_change_s = now_s
        self.seats = None if seats >= self.config.max_num_seqs else seats
        self.chunk = None if chunk >= self.config.max_num_batched_tokens else chunk
        return self.seats is not None or self.chunk is not None
