"""Host against GPU, step by step: where a steady-state step's time goes.

`StepTimeline` instruments a running engine from outside (its instance's methods are
wrapped, nothing in the engine changes) and records, per step:

- the host's phases, on the host clock: `schedule`, `prepare` (packing and the batch's
  upload), `execute` (the forward pass and the logits, launched), `wait` (for the previous
  step's draws), `postprocess` (tokens appended, stops checked, outputs made), `sample`
  (the sampling kernels, launched);
- on CUDA, four events on the engine's stream, put on the host clock through one
  reference event: the GPU reaching the step's upload (A), the end of its forward pass and
  logits (B), the start of its sampling (C), the end of its sampling and read-back (D);
- the step's size: sequences (rows) and new tokens, and what it must move and compute
  (`ModelRunner.step_cost`, the roofline's inputs).

An event's time is when the GPU got to it: a gap between the previous step's D and this
step's A is the GPU idle until the host had launched the step; one between B and C is the
GPU idle until the host had launched the sampling. `summarize` turns the records into
per-step means and says which host phases ran while the GPU idled; `by_rows` splits a
whole run by batch size (which of host and GPU bounds the steps of each size), and
`execute_outliers` lists the steps whose launch took far longer than the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ondo.bench.device_limits import DeviceLimits

HOST_PHASES = ("schedule", "prepare", "execute", "wait", "postprocess", "sample")


@dataclass
class StepRecord:
    """One launched step: host phase intervals (perf_counter seconds) and the GPU times of
    its events (same clock; None off CUDA)."""

    index: int
    host: dict[str, tuple[float, float]] = field(default_factory=dict)
    gpu: dict[str, float] = field(default_factory=dict)  # "A", "B", "C", "D"
    rows: int = 0  # sequences in the step
    tokens: int = 0  # new tokens in the step
    flops: float = 0.0  # the step's FLOPs and bytes at least (`ondo.engine.step_cost`)
    bytes_moved: float = 0.0

    @property
    def host_busy_s(self) -> float:
        """The host's work for the step: every phase but the wait for the GPU."""
        return sum(b - a for p, (a, b) in self.host.items() if p != "wait")

    @property
    def gpu_busy_s(self) -> float | None:
        """The GPU's forward pass and sampling; None without its events."""
        g = self.gpu
        return (g["B"] - g["A"]) + (g["D"] - g["C"]) if len(g) == 4 else None


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def summarize(steps: list[StepRecord]) -> dict[str, Any]:
    """Per-step means in milliseconds: the period (launch to launch), each host phase, and,
    where GPU times were taken, the GPU's forward and sampling time, its idle time before
    each step and before its sampling, its busy share of the period, and per host phase the
    idle GPU time it overlapped (what the GPU was waiting for)."""
    if len(steps) < 2:
        raise ValueError(f"a timeline needs at least 2 steps, got {len(steps)}")
    ms = 1e3
    starts = [s.host["prepare"][0] for s in steps]
    periods = [b - a for a, b in zip(starts, starts[1:])]
    out: dict[str, Any] = {
        "steps": len(steps),
        "period_ms": ms * statistics.fmean(periods),
        "period_p50_ms": ms * statistics.median(periods),
        "host_ms": {p: ms * statistics.fmean(s.host[p][1] - s.host[p][0] for s in steps
                                            if p in s.host) for p in HOST_PHASES
                    if any(p in s.host for s in steps)},
    }
    timed = [s for s in steps if len(s.gpu) == 4]
    if len(timed) < 2:
        return out
    fwd, smp, idle_fwd, idle_smp = [], [], [], []
    waiting_on: dict[str, float] = dict.fromkeys(HOST_PHASES, 0.0)
    unattributed = 0.0
    host_intervals = [(p, iv) for s in steps for p, iv in s.host.items()]
    for prev, s in zip(timed, timed[1:]):
        g = s.gpu
        fwd.append(g["B"] - g["A"])
        smp.append(g["D"] - g["C"])
        gaps = [(prev.gpu["D"], g["A"]), (g["B"], g["C"])]
        idle_fwd.append(max(0.0, g["A"] - prev.gpu["D"]))
        idle_smp.append(max(0.0, g["C"] - g["B"]))
        for gap in gaps:
            if gap[1] <= gap[0]:
                continue
            covered = 0.0
            for phase, iv in host_intervals:
                o = _overlap(gap, iv)
                if o > 0:
                    waiting_on[phase] += o
                    covered += o
            unattributed += max(0.0, (gap[1] - gap[0]) - covered)
    n = len(fwd)
    span = timed[-1].gpu["D"] - timed[0].gpu["D"]
    out["gpu_ms"] = {
        "forward": ms * statistics.fmean(fwd),
        "sample": ms * statistics.fmean(smp),
        "idle_before_step": ms * statistics.fmean(idle_fwd),
        "idle_before_sample": ms * statistics.fmean(idle_smp),
    }
    out["gpu_busy_fraction"] = (sum(fwd) + sum(smp)) / span if span > 0 else float("nan")
    out["gpu_idle_ms_by_host_phase"] = {p: ms * v / n for p, v in waiting_on.items() if v > 0}
    out["gpu_idle_ms_other_host_work"] = ms * unattributed / n
    return out


ROW_BANDS = (16, 32, 64, 128, 192, 256)


def by_rows(steps: list[StepRecord], edges: tuple[int, ...] = ROW_BANDS,
            limits: DeviceLimits | None = None) -> list[dict[str, Any]]:
    """A run split by step size: the steps with a prefill (more tokens than rows), then the
    decode steps in bands of rows (up to each edge; past the last one). Per band: its steps,
    its share of the run's time, the mean period (launch to next launch), the host's work
    (every phase but the wait) and, with GPU times, the GPU's forward and sampling, and the
    GPU's busy share of the band's time: near 1 the GPU bounds those steps, well below it
    the host does. With the device's `limits`, the band's roofline too: its steps' mean
    bound, the bound over the band's time (`fraction_of_roofline`, as `ondo bench
    throughput` computes it for a whole run) and the time the band takes beyond its bound
    (`ms_over_bound`: where a run loses to its roofline). The last step has no period and is
    left out."""
    if len(steps) < 2:
        raise ValueError(f"a timeline needs at least 2 steps, got {len(steps)}")
    ms = 1e3
    bands: dict[str, list[tuple[StepRecord, float]]] = {}
    for s, nxt in zip(steps, steps[1:]):
        period = nxt.host["prepare"][0] - s.host["prepare"][0]
        if s.tokens > s.rows:
            key = "with prefill"
        else:
            lo = 0
            for edge in edges:
                if s.rows <= edge:
                    key = f"decode {lo + 1}-{edge} rows"
                    break
                lo = edge
            else:
                key = f"decode > {edges[-1]} rows"
        bands.setdefault(key, []).append((s, period))
    total = sum(p for members in bands.values() for _, p in members)
    out = []
    for key, members in bands.items():
        time_s = sum(p for _, p in members)
        row: dict[str, Any] = {
            "band": key, "steps": len(members),
            "share_of_time": time_s / total if total > 0 else float("nan"),
            "mean_rows": statistics.fmean(s.rows for s, _ in members),
            "period_ms": ms * time_s / len(members),
            "host_busy_ms": ms * statistics.fmean(s.host_busy_s for s, _ in members),
        }
        gpu = [s.gpu_busy_s for s, _ in members if s.gpu_busy_s is not None]
        if len(gpu) == len(members):
            row["gpu_busy_ms"] = ms * statistics.fmean(gpu)
            row["gpu_busy_fraction"] = sum(gpu) / time_s if time_s > 0 else float("nan")
        if limits is not None:
            bound_s = sum(limits.step_bound_s(s.flops, s.bytes_moved) for s, _ in members)
            row["bound_ms"] = ms * bound_s / len(members)
            row["fraction_of_roofline"] = bound_s / time_s if time_s > 0 else float("nan")
            row["ms_over_bound"] = ms * (time_s - bound_s)
        out.append(row)
    return sorted(out, key=lambda r: (r["band"] != "with prefill", r["mean_rows"]))


def execute_outliers(steps: list[StepRecord], factor: float = 3.0, examples: int = 12) -> dict[str, Any]:
    """The decode steps whose `execute` (the forward pass launched) took more than `factor`
    times their median: how many, their mean, and how many of them ran a different number
    of rows than the step before (another CUDA graph, new shapes for the eager logits)
    against the run's count of such steps. A launch that waits for the GPU, or a one-time
    cost paid in the middle of serving, shows here. Steps with a prefill are left out:
    their launches are longer by nature."""
    timed = [s for s in steps if "execute" in s.host and s.tokens == s.rows]
    if not timed:
        raise ValueError("no decode step with an execute phase")
    ms = 1e3
    dur = [s.host["execute"][1] - s.host["execute"][0] for s in timed]
    median = statistics.median(dur)
    changed = [i > 0 and s.rows != timed[i - 1].rows for i, s in enumerate(timed)]
    slow = [i for i, d in enumerate(dur) if d > factor * median]
    return {
        "median_ms": ms * median,
        "factor": factor,
        "count": len(slow),
        "share_of_execute_time": sum(dur[i] for i in slow) / sum(dur) if sum(dur) > 0 else 0.0,
        "mean_ms": ms * statistics.fmean(dur[i] for i in slow) if slow else 0.0,
        "with_rows_changed": sum(changed[i] for i in slow),
        "steps_with_rows_changed": sum(changed),
        "steps": len(timed),
        "examples": [{"step": timed[i].index, "rows": timed[i].rows,
                      "previous_rows": timed[i - 1].rows if i else None,
                      "tokens": timed[i].tokens, "execute_ms": ms * dur[i]} for i in slow[:examples]],
    }


def format_bands(bands: list[dict[str, Any]]) -> str:
    """`by_rows` as a text table."""
    lines = [f"{'band':<22}{'steps':>7}{'time %':>8}{'period':>9}{'host':>8}{'GPU':>8}{'GPU busy':>10}"
             f"{'bound':>8}{'of bound':>10}{'ms over':>9}"]
    for b in bands:
        gpu = f"{b['gpu_busy_ms']:8.2f}{b['gpu_busy_fraction']:10.2f}" if "gpu_busy_ms" in b else " " * 18
        bound = (f"{b['bound_ms']:8.2f}{b['fraction_of_roofline']:10.2f}{b['ms_over_bound']:9.0f}"
                 if "bound_ms" in b else "")
        lines.append(f"{b['band']:<22}{b['steps']:>7}{100 * b['share_of_time']:8.1f}"
                     f"{b['period_ms']:9.2f}{b['host_busy_ms']:8.2f}{gpu}{bound}".rstrip())
    return "\n".join(lines)


def format_steps(steps: list[StepRecord], count: int = 4) -> str:
    """A few consecutive steps as text, times in ms from the first step's start."""
    t0 = steps[0].host["prepare"][0]
    lines = []
    for s in steps[:count]:
        host = "  ".join(f"{p} {1e3 * (a - t0):7.2f}–{1e3 * (b - t0):7.2f}"
                         for p, (a, b) in sorted(s.host.items(), key=lambda kv: kv[1][0]))
        lines.append(f"step {s.index} host: {host}")
        if len(s.gpu) == 4:
            g = {k: 1e3 * (v - t0) for k, v in s.gpu.items()}
            lines.append(f"step {s.index} GPU:  forward {g['A']:7.2f}–{g['B']:7.2f}  "
                         f"sample {g['C']:7.2f}–{g['D']:7.2f}")
    return "\n".join(lines)


class CudaClock:
    """Timing events on the current CUDA stream."""

    def new_event(self) -> Any:
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize()


class StepTimeline:
    """Records `StepRecord`s of `engine` while `recording()` is active. `clock` makes the
    GPU's events (default: CUDA's where the engine runs on CUDA, else none)."""

    def __init__(self, engine: Any, clock: Any | None = None) -> None:
        self.engine = engine
        self.clock = clock if clock is not None else (
            CudaClock() if engine.device.type == "cuda" else None)
        self.steps: list[StepRecord] = []
        self._recording = False
        self._launching: StepRecord | None = None
        self._by_launch: dict[int, StepRecord] = {}  # id(_InFlight) -> its record
        self._pending_events: list[tuple[StepRecord, str, Any]] = []
        self._ref: Any | None = None
        self._ref_host_s = 0.0
        self._finish_host: tuple[float, float] | None = None
        self._unpatch: list[Callable[[], None]] = []

    # -- instrumentation --------------------------------------------------------------
    def _wrap(self, owner: Any, name: str, wrapper: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        own = name in vars(owner)  # an attribute of the instance itself, not its class's
        setattr(owner, name, wrapper(original))
        self._unpatch.append(lambda: setattr(owner, name, original) if own
                             else delattr(owner, name))

    def _event(self, record: StepRecord, key: str) -> None:
        if self.clock is not None:
            e = self.clock.new_event()
            e.record()
            self._pending_events.append((record, key, e))

    def _install(self) -> None:
        engine, runner, scheduler = self.engine, self.engine.runner, self.engine.scheduler

        def execute(fn):
            def call(*args, **kwargs):
                record = self._launching
                t0 = time.perf_counter()
                result = fn(*args, **kwargs)
                if record is not None:
                    record.host["execute"] = (t0, time.perf_counter())
                    self._event(record, "B")
                return result
            return call

        def new_step() -> StepRecord:
            self._launching = StepRecord(len(self.steps))
            if self._recording:
                self.steps.append(self._launching)
            return self._launching

        pending_schedule: list[tuple[float, float]] = []

        def schedule(fn):
            def call(*args, **kwargs):
                t0 = time.perf_counter()
                result = fn(*args, **kwargs)
                pending_schedule[:] = [(t0, time.perf_counter())]
                return result
            return call

        def prepare(fn):
            def call(sched, *args, **kwargs):
                record = new_step()
                record.rows, record.tokens = len(sched.scheduled), sched.num_tokens
                if pending_schedule:
                    record.host["schedule"] = pending_schedule.pop()
                t0 = time.perf_counter()
                result = fn(sched, *args, **kwargs)
                record.host["prepare"] = (t0, time.perf_counter())
                # Outside the phases timed (a few µs of numpy; the engine's step stats
                # compute the same).
                record.flops, record.bytes_moved = runner.step_cost(result)
                return result
            return call

        def upload(fn):
            def call(*args, **kwargs):
                if self._launching is not None:
                    self._event(self._launching, "A")
                return fn(*args, **kwargs)
            return call

        def launch(fn):
            def call(*args, **kwargs):
                flight = fn(*args, **kwargs)
                if self._launching is not None:
                    self._by_launch[id(flight)] = self._launching
                return flight
            return call

        def sample(fn):
            def call(flight, *args, **kwargs):
                record = self._by_launch.get(id(flight))
                if record is not None:
                    self._event(record, "C")
                t0 = time.perf_counter()
                result = fn(flight, *args, **kwargs)
                if record is not None:
                    record.host["sample"] = (t0, time.perf_counter())
                    self._event(record, "D")
                return result
            return call

        def finish(fn):
            def call(flight, *args, **kwargs):
                record = self._by_launch.pop(id(flight), None)
                t0 = time.perf_counter()
                result = fn(flight, *args, **kwargs)
                t1 = time.perf_counter()
                if record is not None:
                    wait = engine.step_timing_s["wait"] - finish.wait_before
                    finish.wait_before = engine.step_timing_s["wait"]
                    # `_finish` times its own wait: split its span at that point. The
                    # phases land in the step being launched (the host's order), which
                    # is what the GPU waits on.
                    target = self._launching or record
                    if "wait" not in target.host:  # a drain before the launch: keep the first
                        target.host["wait"] = (t0, t0 + wait)
                        target.host["postprocess"] = (t0 + wait, t1)
                else:
                    finish.wait_before = engine.step_timing_s["wait"]
                return result
            return call

        finish.wait_before = engine.step_timing_s["wait"]
        self._wrap(scheduler, "schedule", schedule)
        self._wrap(runner, "prepare", prepare)
        self._wrap(runner, "upload", upload)
        self._wrap(runner, "execute", execute)
        self._wrap(engine, "_launch", launch)
        self._wrap(engine, "_sample", sample)
        self._wrap(engine, "_finish", finish)

    def _uninstall(self) -> None:
        while self._unpatch:
            self._unpatch.pop()()

    @contextmanager
    def recording(self) -> Iterator[StepTimeline]:
        """Record the steps launched inside the block; GPU times are resolved at its end."""
        self._install()
        if self.clock is not None:
            self.clock.synchronize()
            self._ref = self.clock.new_event()
            self._ref.record()
            self._ref.synchronize()
            self._ref_host_s = time.perf_counter()
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False
            self._uninstall()
            if self.clock is not None:
                self.clock.synchronize()
                for record, key, e in self._pending_events:
                    record.gpu[key] = self._ref_host_s + self._ref.elapsed_time(e) / 1e3
            self._pending_events.clear()
            # Only whole steps: each launched, sampled and finished inside the block.
            self.steps = [s for s in self.steps
                          if {"prepare", "execute", "sample"} <= s.host.keys()]
