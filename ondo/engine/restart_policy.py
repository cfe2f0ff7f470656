"""When to restart a dead engine process, and when to give up.

The law: after the k-th death in a row, wait min(initial · 2^(k−1), max) seconds and
start a fresh engine, for k ≤ max_restarts; the (max_restarts + 1)-th death in a row
gives up (the server then exits non-zero, and systemd or Kubernetes restarts the whole
of it). An engine that failed to start counts as a death at once. An engine that ran
`stable_after_s` before dying starts the count again, so rare deaths weeks apart never
add up to giving up (Kubernetes resets its crash-loop backoff the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ENGINE_RESTARTS = 5


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = DEFAULT_ENGINE_RESTARTS  # in a row; 0: never restart
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"--engine-restarts={self.max_restarts} must be >= 0")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("backoff_initial_s must be in [0, backoff_max_s]")

    def backoff_s(self, attempt: int) -> float:
        """The wait before restart attempt `attempt` (1, 2, ...) of a run of deaths."""
        return min(self.backoff_initial_s * 2.0 ** (attempt - 1), self.backoff_max_s)


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    attempt: int  # of this run of deaths, from 1
    delay_s: float


class RestartBudget:
    """The deaths in a row of one server's engine, and what each means."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.in_a_row = 0

    def on_death(self, uptime_s: float) -> RestartDecision:
        """The engine died after running `uptime_s` (0 for one that never got ready)."""
        if uptime_s >= self.policy.stable_after_s:
            self.in_a_row = 0
        self.in_a_row += 1
        attempt = self.in_a_row
        if attempt > self.policy.max_restarts:
            return RestartDecision(False, attempt, 0.0)
        return RestartDecision(True, attempt, self.policy.backoff_s(attempt))
