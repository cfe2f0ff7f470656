"""Where a long-running engine's time goes, window by window: the host time per step by
phase, the loop's own time around the steps, and the CUDA caching allocator's state.

Totals since start hide a slowdown that sets in after hours of serving; a line every
`interval_s` shows when it began and which part grew. The allocator's counters say
whether the device memory outside the KV cache has fragmented: each `cudaMalloc` or
`cudaFree` after warm-up, and above all each retry (every cached block freed, the
device synchronized, the allocation tried again), costs a step milliseconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# torch.cuda.memory_stats() keys: counts since the process started.
_ALLOCATOR_COUNTS = {"num_alloc_retries": "retries", "num_device_alloc": "cudaMalloc",
                     "num_device_free": "cudaFree"}


@dataclass
class WindowReport:
    """Logs a line per `interval_s` of activity: call `loop_time` for the loop's own
    phases and `maybe_log` once per pass; windows without a step log nothing."""

    step_timing_s: dict[str, float]  # the engine's cumulative host time by phase, and "steps"
    device: object | None = None  # a torch.device of type cuda, or None: no allocator figures
    interval_s: float = 10.0
    loop_s: dict[str, float] = field(default_factory=dict)  # cumulative, by loop phase
    _last: dict[str, float] = field(default_factory=dict)
    _last_loop: dict[str, float] = field(default_factory=dict)
    _last_allocator: dict[str, float] = field(default_factory=dict)
    _window_start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._snapshot()

    def loop_time(self, phase: str, seconds: float) -> None:
        self.loop_s[phase] = self.loop_s.get(phase, 0.0) + seconds

    def maybe_log(self, now: float | None = None) -> dict[str, object] | None:
        """Log (and return) the window's figures once `interval_s` has passed."""
        now = time.monotonic() if now is None else now
        if now - self._window_start < self.interval_s:
            return None
        steps = self.step_timing_s.get("steps", 0.0) - self._last.get("steps", 0.0)
        window_s, self._window_start = now - self._window_start, now
        if steps <= 0:
            self._snapshot()
            return None
        report = self._figures(window_s, steps)
        self._snapshot()
        log.info("engine window: %s", report)
        return report

    def _figures(self, window_s: float, steps: float) -> dict[str, object]:
        per_step = {k: round((v - self._last.get(k, 0.0)) / steps * 1e3, 3)
                    for k, v in self.step_timing_s.items() if k != "steps"}
        loop = {k: round(v - self._last_loop.get(k, 0.0), 3) for k, v in self.loop_s.items()}
        report: dict[str, object] = {"window_s": round(window_s, 1), "steps": int(steps),
                                     "host_ms_per_step": per_step, "loop_s": loop}
        allocator = self._allocator()
        if allocator:
            report["allocator"] = {
                "reserved_gib": round(allocator["reserved_bytes"] / 2**30, 2),
                "segments": int(allocator["segments"]),
                **{name: int(allocator[name] - self._last_allocator.get(name, 0.0))
                   for name in _ALLOCATOR_COUNTS.values()},
            }
        return report

    def _snapshot(self) -> None:
        self._last = dict(self.step_timing_s)
        self._last_loop = dict(self.loop_s)
        self._last_allocator = self._allocator()

    def _allocator(self) -> dict[str, float]:
        if self.device is None or getattr(self.device, "type", None) != "cuda":
            return {}
        import torch

        stats = torch.cuda.memory_stats(self.device)
        out = {name: float(stats.get(key, 0)) for key, name in _ALLOCATOR_COUNTS.items()}
        out["reserved_bytes"] = float(stats.get("reserved_bytes.all.current", 0))
        out["segments"] = float(stats.get("segment.all.current", 0))
        return out
