"""A serving trace with the twin's own plant as the GPU: engine steps of a decode-heavy mix
(now and then a prefill step), NVML-shaped readings every poll, on one clock, as the records
`ondo twin adapt` replays. The plant is the truth, so a test knows the constants the online
twin should find, and can make a GPU the packaged fits have never seen.

    records = serving_records(truth_params, [(20, 0.0), (60, 0.9), (30, 0.3)], seed=1)

A schedule entry is (seconds, busy fraction): the engine steps back to back at 1.0, with gaps
that leave that fraction of the time under load otherwise, and not at all at 0.0.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from ondo.events.trace_input import TraceRecords
from ondo.telemetry.schema import EngineSample, GpuSample, stale_columns
from ondo.twin.engine_load import plant_activity
from ondo.twin.params import TwinParams
from ondo.twin.plant import GpuPlant, Load, steady_state

STEP_S = 0.015
PLANT_DT_S = 0.005
PREFILL_SHARE = 0.1


def _step_load(rng: random.Random) -> tuple[float, float, int]:
    """(compute, memory activity in the engine's units, prefill tokens) of one step."""
    if rng.random() < PREFILL_SHARE:
        return rng.uniform(0.10, 0.22), rng.uniform(0.05, 0.10), 2048
    return rng.uniform(0.012, 0.03), rng.uniform(0.38, 0.47), 0


def engine_steps(schedule: list[tuple[float, float]], seed: int = 0
                 ) -> list[tuple[float, float, float, float, int]]:
    """(start, end, compute, memory, prefill tokens) of every step of the schedule."""
    rng = random.Random(seed)
    steps = []
    t0 = 0.0
    for duration_s, busy in schedule:
        t = t0
        while busy > 0 and t + STEP_S <= t0 + duration_s:
            c, m, prefill = _step_load(rng)
            step_s = STEP_S * rng.uniform(0.6, 1.4)
            steps.append((t, t + step_s, c, m, prefill))
            # Gaps random too, so that the polls do not alias with the steps.
            t += step_s + step_s * (1 / busy - 1) * rng.uniform(0.0, 2.0)
        t0 += duration_s
    return steps


def serving_records(truth: TwinParams, schedule: list[tuple[float, float]],
                    ambient_c: float | None = None, seed: int = 0, poll_s: float = 0.05,
                    name: str = "synthetic") -> TraceRecords:
    amb = truth.ambient_c if ambient_c is None else ambient_c
    steps = engine_steps(schedule, seed)
    plant = GpuPlant(truth, amb, state=steady_state(truth, Load(), amb))
    end_s = sum(d for d, _ in schedule)
    records: list[tuple[float, int, GpuSample | EngineSample]] = []
    for i, (start, end, c, m, prefill) in enumerate(steps):
        records.append((end, 1, EngineSample(
            i, start, end, end, prefill, 0 if prefill else 128, 128, 128, 100, 1000, 0, 0, 0,
            128, 0, 0.0, 0.0, c, m, num_waiting_tokens=0)))
    starts = np.array([s[0] for s in steps])
    k_poll = int(round(poll_s / PLANT_DT_S))
    previous: GpuSample | None = None
    n = int(round(end_s / PLANT_DT_S))
    for k in range(n):
        t = k * PLANT_DT_S
        j = int(np.searchsorted(starts, t, side="right")) - 1
        c = m = 0.0
        if j >= 0 and t < steps[j][1]:
            a_c, a_m = plant_activity(truth, steps[j][2], steps[j][3])
            c, m = float(a_c), float(a_m)
        r = plant.step(PLANT_DT_S, Load(c, m), amb)
        if (k + 1) % k_poll:
            continue
        now = (k + 1) * PLANT_DT_S
        s = GpuSample(0, "replay", now, now, poll_s, None, float(r.temp_c), float(r.mem_temp_c),
                      r.power_w, r.power_instant_w, r.energy_j, r.sm_mhz, truth.sm_max_mhz,
                      r.mem_mhz, r.throttle_reasons, r.util_pct)
        s = replace(s, stale=stale_columns(previous, s))
        previous = s
        records.append((now, 0, s))
    records.sort(key=lambda x: (x[0], x[1]))
    out = [r for _, _, r in records]
    gpu_rows = sum(isinstance(r, GpuSample) for r in out)
    return TraceRecords(name, "export", out, {}, gpu_rows, len(out) - gpu_rows)
