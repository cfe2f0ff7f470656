"""Derived series: energy over a span, energy per output token, tokens per joule, time under each
throttle reason, SM clock relative to its maximum.

GPU and engine series share the host monotonic clock. Nothing is interpolated: energy per token
is measured between two fresh readings of the energy counter, counting the output tokens of the
engine steps that ended between them; a throttle state holds until the next sample says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ondo.telemetry.schema import EngineSample, GpuSample, ThrottleReason


def energy_used_j(energy_j: np.ndarray) -> float:
    """Energy drawn over a series of readings of the monotonic energy counter (J)."""
    e = np.asarray(energy_j, dtype=float)
    e = e[~np.isnan(e)]
    return float(e[-1] - e[0]) if e.size else 0.0


def throttle_time_fractions(t_s: np.ndarray, reasons: np.ndarray) -> dict[str, float]:
    """Fraction of [t_first, t_last] spent under each throttle reason; each sample's reasons
    hold until the next sample."""
    t = np.asarray(t_s, dtype=float)
    r = np.asarray(reasons, dtype=np.int64)
    span_s = t[-1] - t[0] if t.size > 1 else 0.0
    if span_s <= 0:
        return {reason.name.lower(): 0.0 for reason in ThrottleReason}  # type: ignore[union-attr]
    dt = np.diff(t)
    return {
        reason.name.lower(): float(np.sum(dt[(r[:-1] & reason.value) != 0]) / span_s)  # type: ignore[union-attr]
        for reason in ThrottleReason
    }


def sm_clock_ratio(sm_mhz: np.ndarray, sm_max_mhz: float) -> np.ndarray:
    return np.asarray(sm_mhz, dtype=float) / sm_max_mhz


@dataclass(frozen=True)
class EfficiencyWindow:
    """Energy and output tokens between two fresh energy-counter readings of one GPU."""

    gpu_index: int
    t_start_s: float
    t_end_s: float
    energy_j: float
    output_tokens: int

    @property
    def energy_per_output_token_j(self) -> float | None:
        return self.energy_j / self.output_tokens if self.output_tokens else None

    @property
    def tokens_per_j(self) -> float | None:
        return self.output_tokens / self.energy_j if self.energy_j > 0 else None


@dataclass
class EfficiencyTracker:
    """Turns a GPU's samples and the engine's steps into `EfficiencyWindow`s of at least
    `window_s`. Feed both in any interleaving; a step that arrives after its window closed is
    counted in the next window."""

    gpu_index: int = 0
    window_s: float = 1.0
    _start: tuple[float, float] | None = None
    _pending: list[tuple[float, int]] = field(default_factory=list)

    def on_engine(self, sample: EngineSample) -> None:
        self._pending.append((sample.end_monotonic_s, sample.num_output_tokens))

    def on_gpu(self, sample: GpuSample) -> EfficiencyWindow | None:
        if (
            sample.gpu_index != self.gpu_index
            or sample.energy_j is None
            or "energy_j" in sample.stale
        ):
            return None
        t, e = sample.t_monotonic_s, sample.energy_j
        if self._start is None:
            self._start = (t, e)
            self._pending = [p for p in self._pending if p[0] > t]
            return None
        t0, e0 = self._start
        if t - t0 < self.window_s:
            return None
        tokens = sum(n for end, n in self._pending if end <= t)
        self._pending = [p for p in self._pending if p[0] > t]
        self._start = (t, e)
        return EfficiencyWindow(self.gpu_index, t0, t, e - e0, tokens)


def efficiency_windows(
    gpu_samples: Iterable[GpuSample],
    engine_samples: Iterable[EngineSample],
    gpu_index: int = 0,
    window_s: float = 1.0,
) -> list[EfficiencyWindow]:
    """The windows `EfficiencyTracker` would emit live, over recorded series."""
    tracker = EfficiencyTracker(gpu_index, window_s)
    events: list[tuple[float, int, GpuSample | EngineSample]] = [
        (s.end_monotonic_s, 0, s) for s in engine_samples
    ]
    events += [(s.t_monotonic_s, 1, s) for s in gpu_samples]
    events.sort(key=lambda x: (x[0], x[1]))
    out = []
    for _, _, s in events:
        if isinstance(s, EngineSample):
            tracker.on_engine(s)
        elif (w := tracker.on_gpu(s)) is not None:
            out.append(w)
    return out
