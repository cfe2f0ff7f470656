"""Stalls of the server process: spans in which none of its threads runs.

The server process holds the engine's front end, the NVML poller, the live twin and the
governor; the engine steps in a process of its own. When that process is starved of CPU
(its interpreter lock held by other work: the load generator of a benchmark sharing it, a
burst of streaming), its threads run late and then all at once. What the governor then
sees, and what the simulator reproduces during a stall:

- no GPU reading is taken; the poller reads again when the stall ends (the readings it
  missed are lost, as `PollingThread` skips a schedule more than 1 s behind, or taken back
  to back at the same instant, which adds nothing);
- the engine's step samples wait in the pipe and reach the governor after it, in a bunch
  the front end's reader works off at `catch_up` of the stalled time (a sample held for
  d seconds arrives catch_up * d after the stall ends), stamped with the engine's own
  times: late, not wrong, and the governor's first ticks after a stall see the engine
  as it was before it;
- the governor does not tick, and a decision on its way to the engine waits;
- no request enters the engine: the front end takes none, so the running batch shrinks as
  requests finish, and the ones that queued up start together when it ends (a prefill burst).

The engine keeps stepping with the limits it has. `StallSchedule.random` draws a seeded
sequence: stalls start at exponentially distributed intervals (mean `every_s`) and last a
log-uniform time in `duration_s`.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class StallSchedule:
    starts_s: tuple[float, ...]
    ends_s: tuple[float, ...]
    catch_up: float = 0.25  # the backlog of step samples, worked off in this share of a stall

    @classmethod
    def random(cls, every_s: float, duration_s: tuple[float, float], until_s: float,
               seed: int = 0, catch_up: float = 0.25) -> StallSchedule:
        lo, hi = duration_s
        if every_s <= 0 or not 0 < lo <= hi:
            raise ValueError(f"stalls need every_s > 0 and 0 < min <= max duration, got "
                             f"{every_s}, {duration_s}")
        rng = random.Random(seed)
        starts, ends = [], []
        t = rng.expovariate(1.0 / every_s)
        while t < until_s:
            d = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            starts.append(t)
            ends.append(t + d)
            t = t + d + rng.expovariate(1.0 / every_s)
        return cls(tuple(starts), tuple(ends), catch_up)

    def end_of_stall(self, t_s: float) -> float | None:
        """The end of the stall `t_s` falls in (start inclusive, end exclusive), else None."""
        i = bisect.bisect_right(self.starts_s, t_s) - 1
        if i >= 0 and t_s < self.ends_s[i]:
            return self.ends_s[i]
        return None

    def held_until(self, due_s: float) -> float:
        """When a step sample due at `due_s` reaches the governor: at once outside a stall,
        else after it, in order, as the front end works off the backlog."""
        i = bisect.bisect_right(self.starts_s, due_s) - 1
        if i < 0 or due_s >= self.ends_s[i]:
            return due_s
        return self.ends_s[i] + self.catch_up * (due_s - self.starts_s[i])

    def stalled_fraction(self, start_s: float, end_s: float) -> float:
        """The share of [start_s, end_s] spent stalled."""
        total = sum(max(0.0, min(e, end_s) - max(s, start_s))
                    for s, e in zip(self.starts_s, self.ends_s))
        return total / (end_s - start_s) if end_s > start_s else 0.0
