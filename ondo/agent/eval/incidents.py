"""Scripted incidents for `ondo agent eval`: telemetry that makes the detectors open a known
condition, each with the action type a good operator would pick.

Each one is a list of records in time order (GPU samples, engine steps, finished requests,
governor decisions), made from a committed trace of `data/traces/` (replayed as recorded, or
with one thing changed: temperatures offset as a hotter inlet would, a sensor frozen, engine
steps that preempt) or by running the twin's plant (`ondo.twin.plant`) under a scripted load
with worse cooling. `build()` replays them through the same detectors and twin as `ondo
events replay` into a fresh telemetry database: telemetry -> events -> (the harness)
retrieval -> model -> check.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondo.events.config import DetectorConfig
from ondo.events.replay import ReplaySummary, replay_records
from ondo.events.trace_input import TraceRecords, read_trace_records
from ondo.telemetry.schema import EngineSample, GpuSample, RequestSample, stale_columns
from ondo.twin.params import TwinParams, h100_params
from ondo.twin.plant import GpuPlant, Load, steady_state

TRACES = Path(__file__).resolve().parents[3] / "data" / "traces"
STEP = "h100_step.csv"
PRBS = "h100_prbs.csv"
SERVING_H100 = "ondo_serving_w1_qwen3-0.6b_h100.csv"
SERVING_H200 = "ondo_serving_steps_w1_qwen3-0.6b_h200.csv"


@dataclass(frozen=True)
class GovernorRecord:
    """A governor decision as the detectors read it (by field name)."""

    t_monotonic_s: float
    t_wall_s: float
    policy: str
    reason: str
    limits: dict
    inputs: dict
    forecast: dict


@dataclass(frozen=True)
class Incident:
    name: str
    trigger: str  # the event kind whose (last) entry is the incident the agent runs on
    expected_action: str
    expected_runbook: str
    source: str  # where the telemetry comes from
    what: str  # what was done to it
    make: Callable[[TwinParams], TraceRecords]
    detector_changes: tuple[tuple[str, Any], ...] = ()

    def build(self, db: str | Path, params: TwinParams | None = None) -> ReplaySummary:
        params = params or h100_params()
        config = DetectorConfig.from_params(params, **dict(self.detector_changes))
        return replay_records(self.make(params), db, config=config, params=params,
                              overwrite=True)


@functools.lru_cache(maxsize=8)
def _trace(name: str, sm_max_mhz: float) -> TraceRecords:
    return read_trace_records(TRACES / name, sm_max_mhz=sm_max_mhz)


def _with(trace: TraceRecords, records: list[Any], what: str) -> TraceRecords:
    records.sort(key=_time)
    gpu = sum(isinstance(r, GpuSample) for r in records)
    engine = sum(isinstance(r, EngineSample) for r in records)
    keep = trace.phase_load if len(records) == len(trace.records) else {}
    return TraceRecords(f"{trace.path} ({what})", "export", records, keep, gpu, engine)


def _time(r: Any) -> float:
    if isinstance(r, GpuSample):
        return r.t_monotonic_s
    if isinstance(r, EngineSample):
        return r.end_monotonic_s
    if isinstance(r, RequestSample):
        return r.finish_monotonic_s
    return float(r.t_monotonic_s)


def _as_is(name: str) -> Callable[[TwinParams], TraceRecords]:
    return lambda params: _trace(name, params.sm_max_mhz)


def _map_gpu(name: str, what: str, f: Callable[[int, GpuSample, float], GpuSample]):
    """The trace with every GPU sample passed through f(index, sample, t since start)."""
    def make(params: TwinParams) -> TraceRecords:
        trace = _trace(name, params.sm_max_mhz)
        t0 = _time(trace.records[0])
        out = [f(i, r, r.t_monotonic_s - t0) if isinstance(r, GpuSample) else r
               for i, r in enumerate(trace.records)]
        return TraceRecords(f"{trace.path} ({what})", trace.format, out, trace.phase_load,
                            trace.gpu_rows, trace.engine_rows)
    return make


def _offset_temps(die_c: float, hbm_c: float):
    def f(_: int, s: GpuSample, __: float) -> GpuSample:
        return dataclasses.replace(
            s, temp_c=None if s.temp_c is None else s.temp_c + die_c,
            mem_temp_c=None if s.mem_temp_c is None else s.mem_temp_c + hbm_c)
    return f


def _frozen_power(t0_s: float, t1_s: float):
    held: dict[str, Any] = {}

    def f(_: int, s: GpuSample, t: float) -> GpuSample:
        if t < t0_s:
            held.update(power_w=s.power_w, energy_j=s.energy_j)
            return s
        if t > t1_s:
            return s
        return dataclasses.replace(s, power_w=held["power_w"], energy_j=held["energy_j"],
                                   stale=s.stale | {"power_w", "energy_j"})
    return f


def _failed_temp(t0_s: float, t1_s: float):
    def f(_: int, s: GpuSample, t: float) -> GpuSample:
        if t0_s <= t <= t1_s:
            return dataclasses.replace(s, temp_c=None, failed=s.failed | {"temp_c"})
        return s
    return f


def _map_engine(name: str, what: str, f: Callable[[EngineSample, float], EngineSample],
                extra: Callable[[TraceRecords], list[Any]] | None = None):
    """The serving trace with every engine step passed through f(step, t since start), plus
    `extra` records (finished requests, governor decisions)."""
    def make(params: TwinParams) -> TraceRecords:
        trace = _trace(name, params.sm_max_mhz)
        t0 = _time(trace.records[0])
        out = [f(r, r.end_monotonic_s - t0) if isinstance(r, EngineSample) else r
               for r in trace.records]
        return _with(trace, out + (extra(trace) if extra else []), what)
    return make


def _between(t: float, t0: float, t1: float) -> bool:
    return t0 <= t <= t1


def _preempting(step: EngineSample, t: float) -> EngineSample:
    if not _between(t, 5.0, 25.0):
        return step
    total = step.num_kv_blocks_total or 4096
    return dataclasses.replace(step, num_kv_blocks_total=total,
                               num_kv_blocks_used=int(0.97 * total), num_running=64,
                               num_preemptions=1 if step.step_index % 3 == 0 else 0)


def _swapping(step: EngineSample, t: float) -> EngineSample:
    if not _between(t, 5.0, 25.0):
        return step
    total = step.num_kv_blocks_total or 4096
    swapped = int(0.6 * total) if (step.step_index // 20) % 2 else 0
    return dataclasses.replace(step, num_kv_blocks_total=total, num_swapped_blocks=swapped,
                               num_kv_blocks_used=int(0.9 * total), num_running=48)


def _kv_full(step: EngineSample, t: float) -> EngineSample:
    if not _between(t, 3.0, 28.0):
        return step
    total = step.num_kv_blocks_total or 4096
    return dataclasses.replace(step, num_kv_blocks_total=total,
                               num_kv_blocks_used=int(0.985 * total), num_running=4,
                               num_waiting=6)


def _backlog(step: EngineSample, t: float) -> EngineSample:
    if not _between(t, 5.0, 25.0):
        return step
    return dataclasses.replace(step, num_waiting=80)


def _requests(ttft_s: float, tpot_s: float, n: int = 40, start_s: float = 6.0,
              every_s: float = 0.45, prefix: str = "cmpl"):
    """Finished requests of the trace's clock: arrival, first token after ttft_s, 32 output
    tokens at tpot_s each."""
    def extra(trace: TraceRecords) -> list[Any]:
        t0 = _time(trace.records[0])
        wall0 = getattr(trace.records[0], "t_wall_s", 0.0)
        out = []
        for k in range(n):
            arrival = t0 + start_s + k * every_s
            first = arrival + ttft_s
            finish = first + 31 * tpot_s
            out.append(RequestSample(f"{prefix}-{k:03d}", arrival, arrival + 0.01, first,
                                     finish, wall0 + (finish - t0), 200, 32, "length"))
        return out
    return extra


def _governor_then_requests(trace: TraceRecords) -> list[Any]:
    t0 = _time(trace.records[0])
    wall0 = getattr(trace.records[0], "t_wall_s", 0.0)
    limits = {"max_num_batched_tokens": 256, "max_num_seqs": 8, "max_prefill_tokens": None,
              "prefill_tokens_per_s": 2000.0, "duty_cycle": 1.0}
    decision = GovernorRecord(t0 + 3.0, wall0 + 3.0, "predictive",
                              "forecast die peak above the target", limits,
                              {"die_c": 48.0, "power_w": 350.0}, {"die_peak_c": 84.0})
    return [decision, *_requests(6.0, 0.03)(trace)]


def _idle_engine_on(name: str):
    """The GPU trace as recorded, beside an engine that only runs one short decode step
    every 2 s: whatever loads the GPU, it is not this engine."""
    def make(params: TwinParams) -> TraceRecords:
        trace = _trace(name, params.sm_max_mhz)
        t0, t1 = _time(trace.records[0]), _time(trace.records[-1])
        steps = []
        k = 0
        t = t0 + 0.5
        while t < t1:
            steps.append(EngineSample(k, t, t + 0.004, t, 0, 1, 1, 1, 12, 4096, 0, 0, 0, 1, 0,
                                      2.4e9, 1.3e9, 0.001, 0.001))
            k, t = k + 1, t + 2.0
        return _with(trace, list(trace.records) + steps, "an idle engine beside it")
    return make


def _plant(name: str, what: str, inlet_rise_c: float = 0.0, resistance_factor: float = 1.0,
           idle_s: float = 15.0, load_s: float = 150.0, rest_s: float = 20.0,
           dt_s: float = 0.05):
    """The twin's plant as the GPU (20 Hz samples): idle, a compute-bound load, idle."""
    def make(params: TwinParams) -> TraceRecords:
        p = dataclasses.replace(
            params, ambient_c=params.ambient_c + inlet_rise_c,
            die_sink_c_per_w=params.die_sink_c_per_w * resistance_factor,
            sink_board_c_per_w=params.sink_board_c_per_w * resistance_factor,
            board_amb_c_per_w=params.board_amb_c_per_w * resistance_factor)
        plant = GpuPlant(p, state=steady_state(p, Load(), p.ambient_c))
        records: list[Any] = []
        phase: dict[int, tuple[float, float]] = {}
        prev: GpuSample | None = None
        n = int((idle_s + load_s + rest_s) / dt_s)
        for k in range(n):
            t = (k + 1) * dt_s
            busy = idle_s <= t < idle_s + load_s
            load = Load(compute_activity=1.0 if busy else 0.0)
            r = plant.step(dt_s, load)
            # A real sensor is never exactly constant: a little noise per refresh (~100 ms),
            # else the plant's flat idle power reads as a stale sensor.
            noise_w = 0.25 * math.sin(1.3 * int(t / p.power_update_s))
            s = GpuSample(0, "sim", t, t, dt_s, None, float(r.temp_c), float(r.mem_temp_c),
                          r.power_w + noise_w, r.power_instant_w + noise_w, r.energy_j,
                          r.sm_mhz, p.sm_max_mhz, r.mem_mhz, int(r.throttle_reasons),
                          r.util_pct)
            s = dataclasses.replace(s, stale=stale_columns(prev, s))
            prev = s
            phase[len(records)] = (load.compute_activity, load.memory_activity)
            records.append(s)
        return TraceRecords(f"plant ({what})", "export", records, phase, len(records), 0)
    return make


def _governor_sim(name: str, policy: str = "off", duration_s: float = 90.0):
    """A scenario of the governor's closed-loop simulator (`ondo bench governor`): the real
    scheduler serving bursty long-context traffic on the twin's plant, the governor under
    `policy`. Its 20 Hz GPU telemetry, one engine record per poll (the queues), its
    finished requests and its decisions become the records."""
    def make(params: TwinParams) -> TraceRecords:
        from ondo.control.sim.scenarios import run_policy, scenario

        result = run_policy(scenario(name).shortened(duration_s), policy)
        s, dt = result.series, result.poll_period_s
        sm_max = params.sm_max_mhz
        records: list[Any] = []
        prev: GpuSample | None = None
        for k, t in enumerate(s["t_s"]):
            g = GpuSample(0, "sim", float(t), float(t), dt, None, float(s["temp_c"][k]),
                          float(s["mem_temp_c"][k]), float(s["power_w"][k]),
                          float(s["power_instant_w"][k]), float(s["energy_j"][k]),
                          float(s["sm_mhz"][k]), sm_max, None, int(s["throttle_reasons"][k]))
            g = dataclasses.replace(g, stale=stale_columns(prev, g))
            records.append(prev := g)
            running, waiting = int(s["num_running"][k]), int(s["num_waiting"][k])
            if running or waiting:
                records.append(EngineSample(k, float(t) - dt, float(t), float(t), 0, running,
                                            running, running, 0, 1, 0, 0, waiting, running, 0,
                                            0.0, 0.0, 0.0, 0.0, source="sim"))
        for i in range(len(result.arrival_s)):
            first, last = result.first_token_s[i], result.last_token_s[i]
            if math.isfinite(first) and math.isfinite(last):
                records.append(RequestSample(f"sim-{i}", float(result.arrival_s[i]), None,
                                             float(first), float(last), float(last), 0,
                                             int(result.output_tokens[i]), "stop", "sim"))
        records += [GovernorRecord(d.t_monotonic_s, d.t_wall_s, d.policy, d.reason, d.limits,
                                   d.inputs, d.forecast) for d in result.decisions]
        return _with(TraceRecords(f"governor simulator: {name}, policy {policy}", "export",
                                  [], {}, 0, 0), records, f"{name}, {policy}")
    return make


INCIDENTS: tuple[Incident, ...] = (
    Incident("power-cap-step", "power_cap_sustained", "set_power_budget", "power-cap-sustained", STEP,
             "as recorded: 100 s of matmuls on the 700 W cap", _as_is(STEP)),
    Incident("power-cap-prbs", "power_cap_sustained", "set_power_budget", "power-cap-sustained", PRBS,
             "as recorded: random matmul, copy and idle segments", _as_is(PRBS)),
    Incident("transient-caps-serving", "throttle_started", "no_action", "transient-throttle", SERVING_H200,
             "as recorded: ondo serving W1 load steps, short power caps", _as_is(SERVING_H200)),
    Incident("hot-inlet-step", "thermal_margin_low", "page_human", "high-inlet", STEP,
             "die and HBM readings 30 °C higher throughout, as a hot inlet would make them",
             _map_gpu(STEP, "inlet +30 °C", _offset_temps(30.0, 30.0))),
    Incident("thermal-margin-step", "thermal_margin_low", "set_temperature_target", "thermal-margin-low", STEP,
             "as recorded, under an operator's 35 °C die margin (--detector margin_low_c=35)",
             _as_is(STEP), (("margin_low_c", 35.0), ("margin_ok_c", 37.0))),
    Incident("degraded-cooling-plant", "thermal_margin_low", "set_power_budget", "degraded-cooling", "twin plant",
             "the fitted H100 plant with 1.7x its thermal resistances, 150 s of compute load",
             _plant("plant", "thermal resistances x1.7", resistance_factor=1.7)),
    Incident("hot-inlet-plant", "thermal_margin_low", "page_human", "high-inlet", "twin plant",
             "the fitted H100 plant at a 28 °C hotter inlet, 150 s of compute load",
             _plant("plant", "inlet +28 °C", inlet_rise_c=28.0)),
    Incident("hbm-hot-serving", "hbm_margin_low", "cap_running_sequences", "hbm-hot", SERVING_H100,
             "HBM readings 38 °C higher (die as recorded)",
             _map_gpu(SERVING_H100, "HBM +38 °C", _offset_temps(0.0, 38.0))),
    Incident("preemption-storm-serving", "preemption", "cap_running_sequences", "preemption-storm",
             SERVING_H100, "20 s of steps with 64 running, KV 97 % used, a preemption every "
             "third step", _map_engine(SERVING_H100, "preempting", _preempting)),
    Incident("swap-thrash-serving", "swap_storm", "cap_running_sequences", "swap-thrashing", SERVING_H100,
             "20 s of steps whose swap pool jumps between 0 and 60 % of the KV cache",
             _map_engine(SERVING_H100, "swapping", _swapping)),
    Incident("kv-undersized-serving", "kv_cache_pressure", "drain_and_restart", "kv-cache-undersized", SERVING_H100,
             "25 s with the KV cache 98.5 % used by 4 running sequences",
             _map_engine(SERVING_H100, "KV full", _kv_full)),
    Incident("ttft-backlog-serving", "slo_violation", "page_human", "queue-backlog-slo", SERVING_H100,
             "80 requests waiting for 20 s; 40 finished requests with a 6 s TTFT",
             _map_engine(SERVING_H100, "backlog", _backlog, _requests(6.0, 0.03))),
    Incident("tpot-slo-serving", "slo_violation", "set_token_budget", "tpot-slo-breach", SERVING_H100,
             "40 finished requests with a 0.4 s time per output token",
             _map_engine(SERVING_H100, "slow decode", lambda s, t: s,
                         _requests(0.3, 0.4))),
    Incident("governor-overlimit-serving", "slo_violation", "set_governor_policy", "governor-overlimiting",
             SERVING_H100, "a governor decision capping 256 tokens and 8 seats, then a "
             "backlog and 6 s TTFTs",
             _map_engine(SERVING_H100, "governor limits", _backlog, _governor_then_requests)),
    Incident("stale-power-step", "sensor_stale", "page_human", "sensor-stale-or-failed", STEP,
             "power and energy readings frozen for 20 s during the load",
             _map_gpu(STEP, "power frozen", _frozen_power(40.0, 60.0))),
    Incident("nvml-temp-failing-step", "sensor_failed", "page_human", "sensor-stale-or-failed", STEP,
             "the temperature read failing for 10 s during the load",
             _map_gpu(STEP, "temp_c failing", _failed_temp(50.0, 60.0))),
    Incident("sim-hot-inlet", "thermal_margin_low", "page_human", "high-inlet",
             "governor simulator", "hot-inlet scenario (inlet +25 °C), governor off, 90 s",
             _governor_sim("hot-inlet")),
    Incident("sim-degraded-cooling", "thermal_margin_low", "page_human", "high-inlet",
             "governor simulator", "degraded-cooling scenario (heatsink x1.5 at a 48 °C "
             "inlet), governor off, 90 s", _governor_sim("degraded-cooling")),
    Incident("sim-power-budget-450w", "power_budget_exceeded", "set_governor_policy",
             "power-budget-exceeded", "governor simulator",
             "power-budget-450w scenario with the governor off, the detectors watching the "
             "450 W budget, 90 s", _governor_sim("power-budget-450w"),
             (("power_budget_w", 450.0),)),
    Incident("noisy-neighbour-prbs", "power_cap_sustained", "page_human", "noisy-neighbour", PRBS,
             "the GPU as recorded beside an engine that is idle but for a decode every 2 s",
             _idle_engine_on(PRBS)),
)


def incident(name: str) -> Incident:
    for i in INCIDENTS:
        if i.name == name:
            return i
    raise KeyError(f"no incident {name!r}; known: {', '.join(i.name for i in INCIDENTS)}")
