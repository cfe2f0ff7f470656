"""What a soak run must show, decided from its records alone (pure: no I/O, no clock).

Each check returns a `Check`: its name, the measured value, the limit, whether it held,
and whether it counts for a correctness run (CI) or only for a timed one (the GPU soak:
memory, throughput and TTFT figures mean something only at scale and on a quiet machine).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Outcomes of one request, as the client saw it.
COMPLETED = "completed"  # a finish_reason (streamed: one final chunk, then [DONE])
FAILED = "failed"  # accepted, then ended by an error (an error event, or a 5xx body)
CLIENT_ABORTED = "client_aborted"  # the client left on purpose
REJECTED = "rejected"  # 4xx: bad input, answered as such
SHED = "shed"  # 503 queue_full: admission control, documented
UNAVAILABLE = "unavailable"  # 503 unavailable: the engine restarting
SERVER_ERROR = "server_error"  # any other 5xx
VIOLATION = "violation"  # a stream without exactly one end, or data after [DONE]
LOST = "lost"  # no answer at all: a reset, a timeout, a task still pending at the end


@dataclass
class SoakRecord:
    """One request of a soak run. Times are the client's monotonic clock, in seconds."""

    kind: str  # stream, plain, cancel, slow, bad:<what>, burst
    start_s: float
    end_s: float = 0.0
    first_token_s: float | None = None
    status: int = 0
    outcome: str = LOST
    error_code: str | None = None
    output_tokens: int = 0
    detail: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s


@dataclass(frozen=True)
class Check:
    name: str
    value: float | str
    limit: str
    ok: bool
    timed: bool = False  # True: a figure for the timed (GPU) soak only
    measured: float | None = None  # the figure judged, as a number (a change, a ratio)
    sigma: float | None = None  # the sampling noise of `measured` (one standard deviation)


@dataclass
class Window:
    """A span of the run during which the engine was restarting (kill to ready again)."""

    start_s: float
    end_s: float

    def holds(self, t_s: float, grace_s: float = 1.0) -> bool:
        return self.start_s - grace_s <= t_s <= self.end_s + grace_s


@dataclass
class MemorySeries:
    name: str  # server_rss, engine_rss, gpu_memory
    t_s: list[float] = field(default_factory=list)
    bytes_: list[float] = field(default_factory=list)


def outcome_counts(records: list[SoakRecord]) -> dict[str, int]:
    return dict(Counter(r.outcome for r in records))


def check_every_request_ended_once(records: list[SoakRecord]) -> Check:
    """No request lost, none with a broken stream: each one accepted ended exactly once."""
    bad = [r for r in records if r.outcome in (LOST, VIOLATION)]
    detail = "; ".join(f"{r.kind}: {r.outcome} {r.detail}" for r in bad[:3])
    return Check("every request ended exactly once",
                 f"{len(bad)} ({detail})" if bad else "0", "0 lost or broken", not bad)


def check_no_unexpected_5xx(records: list[SoakRecord], restarts: list[Window]) -> Check:
    """5xx only where documented: 503 queue_full (admission control) at any time; 503
    unavailable and errors of requests in flight only while the engine restarted."""
    unexpected = []
    for r in records:
        in_window = any(w.holds(r.end_s) or w.holds(r.start_s) for w in restarts)
        if r.outcome == SERVER_ERROR or (r.outcome in (FAILED, UNAVAILABLE) and not in_window):
            unexpected.append(r)
    detail = "; ".join(f"{r.kind}: {r.status} {r.error_code} {r.detail[:80]}" for r in unexpected[:3])
    return Check("no 5xx outside the engine-restart window",
                 len(unexpected) if not detail else f"{len(unexpected)} ({detail})",
                 "0 (503 queue_full allowed)", not unexpected)


def check_bad_inputs_rejected(records: list[SoakRecord]) -> Check:
    """Every bad input got a 4xx, none got through or broke anything."""
    bad = [r for r in records if r.kind.startswith("bad:")]
    wrong = [r for r in bad if r.outcome != REJECTED]
    detail = "; ".join(f"{r.kind} -> {r.status} {r.outcome}" for r in wrong[:3])
    return Check("bad inputs answered 4xx", f"{len(bad) - len(wrong)}/{len(bad)}" +
                 (f" ({detail})" if detail else ""), "all", not wrong)


def check_ledger(phase: str, admitted: float, ended: float, running: float, waiting: float,
                 kv_usage: float) -> Check:
    """At rest after a phase: every admitted request ended, nothing runs, no KV block is held."""
    ok = admitted == ended and running == 0 and waiting == 0 and kv_usage == 0
    value = (f"admitted {admitted:.0f}, ended {ended:.0f}, running {running:.0f}, "
             f"waiting {waiting:.0f}, kv {kv_usage:.3f}")
    return Check(f"{phase}: at rest, ledger balanced, no KV block held", value,
                 "admitted = ended, 0 running, kv 0", ok)


def relative_change(first: float, last: float) -> float:
    return (last - first) / first if first else (0.0 if last == first else float("inf"))


def check_memory_flat(series: MemorySeries, after_s: float, tolerance: float = 0.05) -> Check:
    """Mean of the last quarter of the samples taken after warm-up against the first
    quarter's: within `tolerance`."""
    pairs = [(t, b) for t, b in zip(series.t_s, series.bytes_) if t >= after_s]
    if len(pairs) < 4:
        return Check(f"{series.name} flat after warm-up", "too few samples", f"±{tolerance:.0%}",
                     True, timed=True)
    values = [b for _, b in pairs]
    q = max(1, len(values) // 4)
    change = relative_change(float(np.mean(values[:q])), float(np.mean(values[-q:])))
    return Check(f"{series.name} flat after warm-up",
                 f"{change:+.1%} ({values[0] / 2**20:.0f} -> {values[-1] / 2**20:.0f} MiB)",
                 f"±{tolerance:.0%}", abs(change) <= tolerance, timed=True, measured=change)


def completed_tokens_between(records: list[SoakRecord], t0_s: float, t1_s: float) -> list[int]:
    return [r.output_tokens for r in records if r.outcome == COMPLETED and t0_s <= r.end_s < t1_s]


def output_tokens_between(records: list[SoakRecord], t0_s: float, t1_s: float) -> int:
    return sum(completed_tokens_between(records, t0_s, t1_s))


def relative_noise(tokens: list[int]) -> float:
    """One standard deviation of a window's token total, relative to it, from the arrivals'
    randomness alone: a Poisson number of requests of random sizes (a compound Poisson
    sum, whose variance is estimated by the sum of the squared sizes)."""
    total = sum(tokens)
    return float(np.sqrt(sum(t * t for t in tokens))) / total if total else float("inf")


def check_throughput_stable(records: list[SoakRecord], t0_s: float, t1_s: float,
                            window_s: float, tolerance: float = 0.05) -> Check:
    """Output tokens of completed requests in the first and the last `window_s` of the
    steady load: within `tolerance` of each other. Reported with the ratio's sampling
    noise: under open-loop load the windows differ by chance too, more in short windows."""
    window_s = min(window_s, (t1_s - t0_s) / 2)
    first_tokens = completed_tokens_between(records, t0_s, t0_s + window_s)
    last_tokens = completed_tokens_between(records, t1_s - window_s, t1_s)
    first, last = sum(first_tokens) / window_s, sum(last_tokens) / window_s
    change = relative_change(first, last)
    sigma = float(np.hypot(relative_noise(first_tokens), relative_noise(last_tokens)))
    return Check(f"throughput, first vs last {window_s:.0f} s",
                 f"{first:.0f} -> {last:.0f} tok/s ({change:+.1%}, noise ±{sigma:.1%})",
                 f"±{tolerance:.0%}", abs(change) <= tolerance, timed=True,
                 measured=last / first if first else None, sigma=sigma)


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def check_ttft_stable(records: list[SoakRecord], t0_s: float, t1_s: float,
                      tolerance: float = 0.25, floor_s: float = 0.010) -> Check:
    """p99 TTFT of the streamed requests that started in the last quarter of the steady
    load against the first quarter's: no worse than (1 + tolerance) times, give or take
    `floor_s` (p99s of a few milliseconds jitter by more than a quarter)."""
    quarter = (t1_s - t0_s) / 4

    def ttfts(a: float, b: float) -> list[float]:
        return [r.ttft_s for r in records if r.outcome == COMPLETED and r.ttft_s is not None
                and a <= r.start_s < b]

    first, last = p99(ttfts(t0_s, t0_s + quarter)), p99(ttfts(t1_s - quarter, t1_s))
    ok = bool(last <= first * (1 + tolerance) + floor_s) if first == first and last == last else False
    limit = f"<= +{tolerance:.0%}" + (f" + {floor_s * 1e3:.0f} ms" if floor_s >= 0.1 else "")
    return Check("p99 TTFT, first vs last quarter", f"{first * 1e3:.1f} -> {last * 1e3:.1f} ms",
                 limit, ok, timed=True, measured=last / first if first else None)


def headline(checks: list[Check], outcomes: dict[str, int]) -> dict:
    """The soak's answer in a few numbers: requests lost (or with a broken stream), each
    memory series' change after warm-up, throughput of the last window over the first,
    p99 TTFT of the last quarter over the first."""
    def measured(prefix: str) -> float | None:
        return next((c.measured for c in checks if c.name.startswith(prefix)), None)

    return {
        "lost_requests": outcomes.get(LOST, 0) + outcomes.get(VIOLATION, 0),
        "memory_change": {c.name.split(" ")[0]: c.measured for c in checks
                          if c.name.endswith("flat after warm-up") and c.measured is not None},
        "throughput_last_over_first": measured("throughput, first vs last"),
        "throughput_ratio_sigma": next((c.sigma for c in checks
                                        if c.name.startswith("throughput, first vs last")), None),
        "p99_ttft_last_over_first": measured("p99 TTFT"),
    }


def verdict(checks: list[Check], timed: bool) -> bool:
    """All correctness checks held, and the timed ones too where the run is a timed one."""
    return all(c.ok for c in checks if timed or not c.timed)


def format_checks(checks: list[Check]) -> str:
    rows = [("check", "value", "limit", "")] + [
        (c.name, str(c.value), c.limit, ("ok" if c.ok else "FAIL") + (" (timed)" if c.timed else ""))
        for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
