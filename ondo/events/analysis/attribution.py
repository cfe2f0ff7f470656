"""Which load preceded each throttle episode.

Episodes are the ones the throttle detector (`ondo/events/detectors/gpu.py`) finds in the
GPU's samples, so they are the log's `throttle_started` / `throttle_ended` episodes. For each,
the engine steps of the `lookback_s` before its start are summed; the kind of token that
dominates them (prefill or decode) names the load. Its burst is the last run of heavy steps
(at least half the window's largest count of that kind) with no pause over `BURST_GAP_S`
between them that began before the episode, followed on past the episode's start while it
lasts: "38k prefill tokens in 0.6 s preceded the
sw_power_cap by 0.4 s" reads: the steps between the burst's first start and last end (0.6 s)
carried 38k prefill tokens, and the first started 0.4 s before the episode did. The window's
FLOP rate is set against the mean FLOP rate of the record's busy steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ondo.events.config import DetectorConfig
from ondo.events.detectors.gpu import ThrottleDetector
from ondo.events.schema import EventKind
from ondo.telemetry.schema import EngineSample, GpuSample

BURST_GAP_S = 0.25


@dataclass(frozen=True)
class Episode:
    reason: str
    start_s: float
    end_s: float | None  # None: still open at the end of the record
    min_sm_mhz: float | None


def throttle_episodes(gpus: list[GpuSample], config: DetectorConfig | None = None) -> list[Episode]:
    if not gpus:
        return []
    detector = ThrottleDetector(config or DetectorConfig(), gpus[0].gpu_index)
    episodes: list[Episode] = []
    for s in gpus:
        for d in detector.feed(s):
            if d.kind is EventKind.THROTTLE_ENDED:
                episodes.append(Episode(d.payload["reason"], d.payload["started_s"],
                                        d.payload["ended_s"], d.payload["min_sm_mhz"]))
    for reason, machine in detector.machines.items():
        if machine.active:  # still open when the record ends
            ep = detector.episodes.get(reason)
            episodes.append(Episode(str(reason.name).lower(), machine.onset_s, None,
                                    ep.min_sm_mhz if ep else None))
    episodes.sort(key=lambda e: (e.start_s, e.reason))
    return episodes


def _fmt_tokens(n: float) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else (f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}")


def attribute(ep: Episode, steps: list[EngineSample], step_end: np.ndarray,
              lookback_s: float, busy_flops_per_s: float | None) -> dict:
    """The load before `ep` (see the module's docstring), as a plain dict."""
    out: dict = {"reason": ep.reason, "start_s": ep.start_s, "end_s": ep.end_s,
                 "duration_s": None if ep.end_s is None else ep.end_s - ep.start_s,
                 "min_sm_mhz": ep.min_sm_mhz}
    lo = int(np.searchsorted(step_end, ep.start_s - lookback_s, side="left"))
    hi = int(np.searchsorted(step_end, ep.start_s + lookback_s, side="right"))
    window = [s for s in steps[lo:hi] if s.start_monotonic_s < ep.start_s]
    later = [s for s in steps[lo:hi] if s.start_monotonic_s >= ep.start_s]
    if not window:
        out["load"] = None
        out["text"] = (f"no engine step in the {lookback_s:g} s before the {ep.reason} "
                       f"at {ep.start_s:.2f} s")
        return out
    prefill = sum(s.num_prefill_tokens for s in window)
    decode = sum(s.num_decode_tokens for s in window)
    flops = sum(s.flops for s in window)
    kind = "prefill" if prefill > decode else "decode"
    attr = "num_prefill_tokens" if kind == "prefill" else "num_decode_tokens"
    b0, b1 = _burst(window, later, attr)
    tokens = sum(getattr(s, attr) for s in window + later if b0 <= s.start_monotonic_s < b1)
    lead_s = ep.start_s - b0
    rate_ratio = (flops / lookback_s / busy_flops_per_s) if busy_flops_per_s else None
    out["load"] = {
        "window_s": lookback_s, "steps": len(window), "prefill_tokens": prefill,
        "decode_tokens": decode, "flops": flops,
        "bytes": sum(s.bytes_moved for s in window),
        "kind": kind, "burst_tokens": tokens, "burst_s": b1 - b0, "lead_s": lead_s,
        "flops_rate_vs_busy_mean": rate_ratio,
    }
    out["text"] = (f"{_fmt_tokens(tokens)} {kind} tokens in {b1 - b0:.1f} s preceded the "
                   f"{ep.reason} at {ep.start_s:.2f} s by {lead_s:.1f} s")
    if rate_ratio is not None:
        out["text"] += f" (FLOP rate {rate_ratio:.1f}x the busy mean)"
    return out


def _burst(window: list[EngineSample], later: list[EngineSample],
           attr: str) -> tuple[float, float]:
    """(first start, last end) of the last run of heavy steps begun in `window`, followed on
    through the heavy steps after it (`later`) while they go on without a pause."""
    heavy_min = max(getattr(s, attr) for s in window) / 2

    def heavy(s: EngineSample) -> bool:
        return getattr(s, attr) >= heavy_min and getattr(s, attr) > 0

    runs = [s for s in window if heavy(s)]
    first = last = runs[-1]
    for s in reversed(runs[:-1]):
        if first.start_monotonic_s - s.end_monotonic_s > BURST_GAP_S:
            break
        first = s
    for s in later:
        if not heavy(s):
            continue
        if s.start_monotonic_s - last.end_monotonic_s > BURST_GAP_S:
            break
        last = s
    return first.start_monotonic_s, last.end_monotonic_s


def busy_flops_rate(steps: list[EngineSample]) -> float | None:
    busy_s = sum(s.duration_s for s in steps)
    return sum(s.flops for s in steps) / busy_s if busy_s > 0 else None
