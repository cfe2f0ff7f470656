"""The closed loop in virtual time: ondo's scheduler, a modelled GPU, the twin, the governor.

A Vidur-style discrete-event simulation (model-free: no forward pass runs): ondo's real
`Scheduler` and `BlockManager` decide every step exactly as in the engine; the step's FLOPs
and bytes (`ondo.engine.step_cost`, the formula the runner reports) give its duration on the
modelled GPU (`StepTimeModel`, at the SM clock the plant reports) and its load descriptor
(achieved rate over peak, as the engine's telemetry computes it); the twin's plant
(`GpuPlant`) is the GPU, driven by that load through the params' engine load map. Telemetry
is sampled from the plant at `poll_hz` (NVML's readings: lagging integer sensors, the 1 s
average power) into the same trackers a server runs (`TwinTracker`, `InputTracker`), and the
governor ticks on them; its limits reach the scheduler before the next step, as a command
reaches the engine loop, and its duty cycle paces the steps through the engine's own
`DutyCycleGate`.

Simplifications, each small at the scale this runs at: steps are synchronous (the H100
measurements the step-time model is fitted to were); prefix caching is off (the arrivals'
prompts are random); there is no CPU swap pool (preemption recomputes); a request's n is 1.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ondo.control.decision import GovernorDecision
from ondo.control.governor import Governor
from ondo.control.inputs import InputTracker
from ondo.control.objectives import Objectives
from ondo.control.policy import EngineConfig
from ondo.control.predictive import PredictiveTuning
from ondo.control.reactive import ReactiveTuning
from ondo.control.sim.arrivals import SimRequest
from ondo.control.sim.stalls import StallSchedule
from ondo.control.sim.step_time import StepTimeModel
from ondo.engine.block_manager import BlockManager
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler import Scheduler
from ondo.engine.scheduler_limits import DutyCycleGate, SchedulerLimits
from ondo.engine.sequence import Sequence
from ondo.engine.step_cost import CostShape, step_cost
from ondo.engine.step_stats import StepStats
from ondo.telemetry.schema import (
    H100_PEAK_BYTES_PER_S,
    H100_PEAK_FLOPS,
    EngineSample,
    GpuSample,
    engine_sample_from_step,
)
from ondo.twin.engine_load import plant_activity
from ondo.twin.live import TwinTracker
from ondo.twin.params import TwinParams
from ondo.twin.plant import (
    THERMAL_BITS,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_SW_POWER_CAP,
    GpuPlant,
    Load,
    steady_state,
)

IDLE = Load(0.0, 0.0)
IDLE_RETRY_S = 0.002
THROTTLE_BITS = THROTTLE_SW_POWER_CAP | THROTTLE_HW_SLOWDOWN | THERMAL_BITS


@dataclass(frozen=True)
class SimConfig:
    shape: CostShape
    step_time: StepTimeModel
    plant_params: TwinParams  # the GPU
    twin_params: TwinParams | None = None  # what the twin and governor know (None: the plant's)
    ambient_c: float | None = None  # inlet (None: the plant params')
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int = 39947
    block_size: int = 16
    poll_hz: float = 20.0
    initial_load: Load | None = None  # start at rest under this load (warm); None: idle
    peak_flops: float = H100_PEAK_FLOPS
    peak_bytes_per_s: float = H100_PEAK_BYTES_PER_S
    twin_forecasts: bool = False  # the snapshots' own forecasts (the governor does not need them)
    # A server's latencies: a decision reaches the engine (in a process of its own) this much
    # later, and each step's sample reaches the governor this much after the step ends.
    limits_delay_s: float = 0.0
    engine_sample_delay_s: float = 0.0
    # Spans in which the server process runs none of its threads (stalls.py): no poll, no
    # tick, step samples and decisions held back, no request admitted.
    stalls: StallSchedule | None = None

    @property
    def inlet_c(self) -> float:
        return self.plant_params.ambient_c if self.ambient_c is None else self.ambient_c


@dataclass
class SimResult:
    duration_s: float
    poll_period_s: float
    series: dict[str, np.ndarray]  # one entry per telemetry poll
    decisions: list[GovernorDecision]
    arrival_s: np.ndarray  # per request that arrived
    first_token_s: np.ndarray  # nan: none yet
    last_token_s: np.ndarray
    output_tokens: np.ndarray
    energy_j: float
    steps: int
    step_time_s: float  # time spent in steps (the rest idle or paced)
    objectives: Objectives = field(default_factory=Objectives)

    def summary(self, warmup_s: float = 0.0) -> dict[str, float]:
        """The benchmark's figures from `warmup_s` to the end, from the 20 Hz telemetry:
        seconds throttled (any clock-event reason the GPU's own controllers set: power cap,
        SW or HW thermal), over a temperature target (die or HBM sensor), over the power
        budget (NVML's 1 s average); output tokens per second; p99 time to first token of the
        requests that arrived (those still waiting at the end count their wait so far) and
        p99 time per output token (a request's mean after its first); GPU joules per output
        token."""
        keep = self.series["t_s"] >= warmup_s
        s = {k: v[keep] for k, v in self.series.items()}
        dt, o = self.poll_period_s, self.objectives
        span_s = self.duration_s - warmup_s
        throttled = (s["throttle_reasons"] & THROTTLE_BITS) > 0
        over_target = np.zeros(len(throttled), dtype=bool)
        if o.temp_target_c is not None:
            over_target |= s["temp_c"] > o.temp_target_c
        if o.hbm_temp_target_c is not None:
            over_target |= s["mem_temp_c"] > o.hbm_temp_target_c
        over_budget = (s["power_w"] > o.power_budget_w if o.power_budget_w is not None
                       else np.zeros(len(throttled), dtype=bool))
        tokens = int(s["output_tokens"][-1] - s["output_tokens"][0])
        energy_j = float(s["energy_j"][-1] - s["energy_j"][0])
        late = self.arrival_s >= warmup_s
        first = np.where(np.isnan(self.first_token_s), self.duration_s, self.first_token_s)
        ttft = (first - self.arrival_s)[late]
        many = late & (self.output_tokens >= 2)
        tpot = ((self.last_token_s[many] - self.first_token_s[many])
                / (self.output_tokens[many] - 1))
        return {
            "throttled_s": float(throttled.sum() * dt),
            "over_target_s": float(over_target.sum() * dt),
            "over_budget_s": float(over_budget.sum() * dt),
            "output_tokens_per_s": tokens / span_s,
            "ttft_p99_s": float(np.percentile(ttft, 99)) if len(ttft) else float("nan"),
            "tpot_p99_s": float(np.percentile(tpot, 99)) if len(tpot) else float("nan"),
            "joules_per_output_token": energy_j / tokens if tokens else float("nan"),
        }


class ClosedLoopSimulator:
    def __init__(self, config: SimConfig, requests: list[SimRequest], policy: str = "off",
                 objectives: Objectives | None = None,
                 reactive: ReactiveTuning | None = None,
                 predictive: PredictiveTuning | None = None,
                 concurrency: int | None = None) -> None:
        """`concurrency`: a closed loop instead of the trace's arrival times: that many
        requests in flight from t = 0, each finished one replaced at once by the next (as a
        benchmark client keeps them; the arrival times are then the release times)."""
        self.config = c = config
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.concurrency = concurrency
        self._finished = 0
        self.objectives = objectives or Objectives()
        twin_params = c.twin_params or c.plant_params
        start = steady_state(c.plant_params, c.initial_load or IDLE, c.inlet_c)
        self.plant = GpuPlant(c.plant_params, c.inlet_c, state=start)
        self.bm = BlockManager(c.num_kv_blocks, 0, c.block_size, enable_prefix_caching=False)
        self.scheduler = Scheduler(self.bm, c.max_num_seqs, c.max_num_batched_tokens,
                                   preemption_mode="recompute", debug_checks=False)
        self.t = 0.0
        self.scheduler.clock = lambda: self.t
        self.gate = DutyCycleGate()
        self.governor = Governor(twin_params, self.objectives,
                                 EngineConfig(c.max_num_seqs, c.max_num_batched_tokens), policy,
                                 reactive=reactive, predictive=predictive)
        self.twin = TwinTracker(twin_params)
        self.inputs = InputTracker(activity_map=self.twin.engine.activity_map)
        self.poll_period_s = 1.0 / c.poll_hz
        self._next_poll = 0.0
        self._next_tick = 0.0
        self._pending: deque[tuple[float, SchedulerLimits]] = deque()  # (due time, limits)
        self._samples: deque[tuple[float, EngineSample]] = deque()  # (due time, sample)
        self.decisions: list[GovernorDecision] = []
        self._series: dict[str, list] = {k: [] for k in (
            "t_s", "temp_c", "mem_temp_c", "power_w", "power_instant_w", "sm_mhz",
            "throttle_reasons", "duty_cycle", "max_num_seqs", "num_running", "num_waiting",
            "twin_die_c", "twin_hbm_c", "energy_j", "output_tokens")}
        n = len(self.requests)
        self._first = np.full(n, np.nan)
        self._last = np.full(n, np.nan)
        self._tokens = np.zeros(n, dtype=np.int64)
        self._steps = 0
        self._step_time_s = 0.0
        self._out_total = 0

    # -- the plant and its telemetry ------------------------------------------------------
    def _run_until(self, t_end: float, load: Load) -> None:
        while True:
            poll_at, tick_at = self._after_stall(self._next_poll), self._after_stall(self._next_tick)
            nxt = min(t_end, poll_at, tick_at)
            if nxt > self.t:
                self.plant.step(nxt - self.t, load, self.config.inlet_c)
                self.t = nxt
            if self.t >= poll_at - 1e-12:
                self._poll()
                # The poller's schedule goes on from where it was (a stall's readings lost).
                missed = max(0.0, math.floor((self.t - self._next_poll) / self.poll_period_s
                                             + 1e-9))
                self._next_poll += (missed + 1) * self.poll_period_s
            if self.t >= tick_at - 1e-12:
                self._tick()
                # The governor's thread: a tick a stall held back starts the period anew.
                late = tick_at > self._next_tick + 1e-12
                self._next_tick = (self.t if late else self._next_tick) + self.governor.period_s
            if self.t >= t_end - 1e-12:
                return

    def _after_stall(self, t_s: float) -> float:
        """When something due at t_s happens in the server process: at once, or when the
        stall it falls in ends."""
        stalls = self.config.stalls
        end = None if stalls is None else stalls.end_of_stall(t_s)
        return t_s if end is None else end

    def _stalled(self) -> bool:
        return self._after_stall(self.t) > self.t

    def _poll(self) -> None:
        self._deliver_samples()
        r = self.plant.reading()
        p = self.config.plant_params
        sample = GpuSample(0, "sim", self.t, self.t, self.poll_period_s, 0.0, r.temp_c,
                           r.mem_temp_c, r.power_w, r.power_instant_w, r.energy_j, r.sm_mhz,
                           p.sm_max_mhz, r.mem_mhz, r.throttle_reasons, r.util_pct)
        self.twin.on_gpu_sample(sample)
        self.inputs.on_gpu_sample(sample)
        limits = self.scheduler.limits
        tw = self.inputs.twin
        for key, value in (
            ("t_s", self.t), ("temp_c", r.temp_c), ("mem_temp_c", r.mem_temp_c),
            ("power_w", r.power_w), ("power_instant_w", r.power_instant_w), ("sm_mhz", r.sm_mhz),
            ("throttle_reasons", r.throttle_reasons), ("duty_cycle", limits.duty_cycle),
            ("max_num_seqs", limits.max_num_seqs or self.config.max_num_seqs),
            ("num_running", len(self.scheduler.running)),
            ("num_waiting", len(self.scheduler.waiting)),
            ("twin_die_c", np.nan if tw is None else tw.die_c),
            ("twin_hbm_c", np.nan if tw is None else tw.hbm_c),
            ("energy_j", float(self.plant.state.energy_j)), ("output_tokens", self._out_total),
        ):
            self._series[key].append(value)

    def _deliver_samples(self) -> None:
        if self._stalled():
            return
        while self._samples and self._samples[0][0] <= self.t + 1e-12:
            _, sample = self._samples.popleft()
            self.twin.on_engine_sample(sample)
            self.inputs.on_engine_sample(sample)

    def _tick(self) -> None:
        self._deliver_samples()
        snap = self.twin.snapshot(self.t, self.t, with_forecast=self.config.twin_forecasts)
        if snap is not None:
            self.inputs.on_twin_snapshot(snap)
        decision = self.governor.tick(self.inputs.inputs(self.t, self.t))
        if decision is not None:
            self.decisions.append(decision)
            self._pending.append((self.t + self.config.limits_delay_s, self.governor.limits))

    # -- the engine ----------------------------------------------------------------------
    def _apply_limits(self) -> None:
        if self._stalled():
            return
        while self._pending and self._pending[0][0] <= self.t + 1e-12:
            _, limits = self._pending.popleft()
            self.scheduler.set_limits(limits)
            self.gate.set_duty(limits.duty_cycle)

    def _step(self) -> bool:
        """One engine step; False if nothing could be scheduled."""
        c = self.config
        out = self.scheduler.schedule()
        items = out.scheduled
        if not items:
            return False
        q_lens = [it.num_new_tokens for it in items]
        ctx = [it.seq.num_computed_tokens + it.num_new_tokens for it in items]
        sampled = sum(1 for it in items if it.samples)
        flops, bytes_moved = step_cost(c.shape, q_lens, ctx, sampled)
        start = self.t
        dt = c.step_time.step_s(flops, bytes_moved, len(items), self.plant.reading().sm_mhz)
        prefill = sum(q for q, it in zip(q_lens, items) if q > 1 or it.seq.num_computed_tokens == 0)
        stats = StepStats(self._steps + 1, start, start + dt, prefill, sum(q_lens) - prefill,
                          len(items), self.bm.num_used_blocks, self.bm.num_total_blocks, 0,
                          len(out.preempted_recompute), len(self.scheduler.waiting),
                          len(self.scheduler.running), 0, sampled, flops, bytes_moved,
                          self.scheduler.num_waiting_tokens)
        sample = engine_sample_from_step(stats, start + dt, c.peak_flops, c.peak_bytes_per_s)
        a_c, a_m = plant_activity(c.plant_params, sample.compute_activity,
                                  sample.memory_activity)
        self._run_until(start + dt, Load(float(a_c), float(a_m)))
        self._steps += 1
        self._step_time_s += dt
        now = self.t
        for it in items:
            seq = it.seq
            seq.num_computed_tokens += it.num_new_tokens
            if it.samples:
                seq.token_ids.append(0)
                i = seq.seq_id
                if self._tokens[i] == 0:
                    self._first[i] = now
                self._tokens[i] += 1
                self._last[i] = now
                self._out_total += 1
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.scheduler.finish(seq, "length")
                    self._finished += 1
        due = self.t + c.engine_sample_delay_s
        self._samples.append((due if c.stalls is None else c.stalls.held_until(due), sample))
        self._deliver_samples()
        self.gate.add_busy(dt)
        if self.gate.slice_over():
            self._run_until(self.t + self.gate.end_slice(), IDLE)
        return True

    def _arrived(self, i: int, arrival_s: float) -> bool:
        if self._stalled():  # the front end takes no request
            return False
        if self.concurrency is None:
            return arrival_s <= self.t
        return i - self._finished < self.concurrency

    def run(self, duration_s: float) -> SimResult:
        nxt = 0
        reqs = self.requests
        arrival_s = [r.arrival_s for r in reqs]
        while self.t < duration_s:
            while nxt < len(reqs) and self._arrived(nxt, arrival_s[nxt]):
                r = reqs[nxt]
                arrival_s[nxt] = arrival_s[nxt] if self.concurrency is None else self.t
                params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True)
                self.scheduler.add(Sequence(nxt, f"r{nxt}", [0] * r.prompt_tokens, params,
                                            arrival_s[nxt]))
                nxt += 1
            self._apply_limits()
            if self.scheduler.num_unfinished and self._step():
                continue
            until = (reqs[nxt].arrival_s if nxt < len(reqs) and self.concurrency is None
                     else duration_s)
            if self.scheduler.num_unfinished:  # held back by pacing: try again shortly
                until = min(until, self.t + IDLE_RETRY_S)
            if self._stalled():  # requests wait for the front end
                until = min(until, self._after_stall(self.t))
            self._run_until(min(max(until, self.t + 1e-6), duration_s), IDLE)
        arrived = nxt
        return SimResult(
            duration_s=duration_s, poll_period_s=self.poll_period_s,
            series={k: np.asarray(v) for k, v in self._series.items()},
            decisions=self.decisions,
            arrival_s=np.array(arrival_s[:arrived]),
            first_token_s=self._first[:arrived], last_token_s=self._last[:arrived],
            output_tokens=self._tokens[:arrived], energy_j=float(self.plant.state.energy_j),
            steps=self._steps, step_time_s=self._step_time_s, objectives=self.objectives,
        )
