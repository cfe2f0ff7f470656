"""Request arrivals for the simulator: a seeded bursty trace, written and replayed as JSONL.

`BurstyArrivals` is a two-state Markov-modulated Poisson process: calm periods (rate
`calm_rate_per_s`) and bursts (`burst_rate_per_s`) alternate, each lasting an exponentially
distributed time (means `mean_calm_s`, `mean_burst_s`); prompt and output lengths are uniform
in their ranges. The same seed gives the same trace.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class BurstyArrivals:
    calm_rate_per_s: float
    burst_rate_per_s: float
    mean_calm_s: float
    mean_burst_s: float
    prompt_tokens: tuple[int, int] = (100, 1024)  # W1's lengths
    output_tokens: tuple[int, int] = (100, 1024)
    seed: int = 0
    start_in_burst: bool = False

    def trace(self, duration_s: float) -> list[SimRequest]:
        rng = random.Random(self.seed)
        out: list[SimRequest] = []
        t, burst = 0.0, self.start_in_burst
        phase_end = rng.expovariate(1.0 / (self.mean_burst_s if burst else self.mean_calm_s))
        while t < duration_s:
            rate = self.burst_rate_per_s if burst else self.calm_rate_per_s
            gap = rng.expovariate(rate) if rate > 0 else float("inf")
            if t + gap >= phase_end:  # the phase changes first (memoryless: draw again)
                t = phase_end
                burst = not burst
                phase_end = t + rng.expovariate(1.0 / (self.mean_burst_s if burst
                                                       else self.mean_calm_s))
                continue
            t += gap
            if t < duration_s:
                out.append(SimRequest(t, rng.randint(*self.prompt_tokens),
                                      rng.randint(*self.output_tokens)))
        return out


def write_trace(path: str | Path, requests: list[SimRequest]) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(asdict(r)) + "\n")


def read_trace(path: str | Path) -> list[SimRequest]:
    """A JSONL trace: one {"arrival_s", "prompt_tokens", "output_tokens"} per line, in order."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(SimRequest(float(d["arrival_s"]), int(d["prompt_tokens"]),
                                      int(d["output_tokens"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a request ({e})") from None
    return sorted(out, key=lambda r: r.arrival_s)
