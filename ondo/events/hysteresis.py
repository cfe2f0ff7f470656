"""A Schmitt trigger with dwell times: how a detector turns a noisy, flapping signal into
episodes with one start and one end.

Two thresholds (`on` and, on the quiet side of it, `off`) and two minimum durations:

    clear ──value reaches on──▶ pending ──held rise_s without falling past off──▶ active
      ▲                           │ falls past off                                 │ falls past off
      └───────────────────────────┘                                                ▼
      └──────────────── held fall_s without reaching on again ─────────────── releasing
                                                       reaches on again: back to active ┘

The pending and releasing timers are reset only by crossing the *other* threshold, so a
signal that oscillates around one threshold, however fast, neither opens and closes
episodes nor stalls them: a bit flapping at 5 Hz for a minute is one episode. While
pending, a fall past `off` shorter than `fall_s` is a gap inside the same excursion, not its
end (the same rule that keeps an open episode open), and the episode opens on a sample that
is not past `off` once rise_s has passed since its first one. So an episode is a run of
samples at or past `on` with no quiet stretch of fall_s inside it, reported once it has
lasted rise_s. A missing value (None) changes nothing.

For a boolean signal use on = 1.0, off = 1.0 (true is 1.0, false 0.0). `rising=False` turns
the comparisons round, for signals that are bad when low (a margin).
"""

from __future__ import annotations

import enum


class Transition(enum.Enum):
    OPENED = "opened"  # the episode began at `since_s`
    CLOSED = "closed"  # the episode ended at `since_s` (when the signal fell past `off`)


CLEAR, PENDING, ACTIVE, RELEASING = range(4)
# Module constants: an enum member looked up on its class costs a descriptor call each time.
OPENED, CLOSED = Transition.OPENED, Transition.CLOSED


class Hysteresis:
    __slots__ = ("on", "off", "rise_s", "fall_s", "rising", "state", "since_s", "onset_s",
                 "low_since_s")

    def __init__(self, on: float, off: float, rise_s: float, fall_s: float,
                 rising: bool = True) -> None:
        if (off > on) if rising else (off < on):
            raise ValueError(f"off ({off}) must be on the quiet side of on ({on})")
        if rise_s < 0 or fall_s < 0:
            raise ValueError("dwell times must be >= 0")
        self.on, self.off, self.rise_s, self.fall_s, self.rising = on, off, rise_s, fall_s, rising
        self.state = CLEAR
        self.since_s = 0.0  # when the present pending or releasing phase began
        self.onset_s = 0.0  # when the open episode began
        self.low_since_s: float | None = None  # a quiet gap inside a pending excursion

    @property
    def active(self) -> bool:
        """Inside an episode (active or releasing)."""
        return self.state >= ACTIVE

    def update(self, t_s: float, value: float | None) -> Transition | None:
        if value is None:
            return None
        if self.rising:
            high, low = value >= self.on, value < self.off
        else:
            high, low = value <= self.on, value > self.off
        state = self.state
        if state == CLEAR:
            if not high:
                return None
            self.state, self.since_s, self.low_since_s = PENDING, t_s, None
            state = PENDING
        if state == PENDING:
            if low:
                if self.low_since_s is None:
                    self.low_since_s = t_s
                if t_s - self.low_since_s >= self.fall_s:
                    self.state = CLEAR
                return None
            self.low_since_s = None
            if t_s - self.since_s >= self.rise_s:
                self.state, self.onset_s = ACTIVE, self.since_s
                return OPENED
            return None
        if state == ACTIVE:
            if not low:
                return None
            self.state, self.since_s = RELEASING, t_s
            state = RELEASING
        # releasing
        if high:
            self.state = ACTIVE
        elif t_s - self.since_s >= self.fall_s:
            self.state = CLEAR
            return CLOSED
        return None
