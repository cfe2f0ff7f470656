"""The GPU benchmark's power-budget setting mirrored in the closed-loop simulator.

`bench/governor_gpu.py` holds W1 (256 requests in flight, lengths uniform in [100, 1024])
under a 500 W budget on an H200 that draws ~643 W unconstrained at ~21,300 output tokens/s.
The mirror replays that setting in virtual time, so that a change of control law is judged
before a GPU run:

- the GPU: the twin fitted on the H200 serving trace (as `--fit-twin-on` fits it); the
  H100-fitted step times scaled by `step_time_scale` (0.7: W1 then runs at the H200's
  ~21,400 tokens/s, shorter steps that each load the plant harder) and the engine compute
  gain by `plant_gain` (0.25: W1 at full load then draws ~645 W, as measured);
- what the governor knows: the same fit with the gain `twin_gain` (0.31: a model 25 % off
  in the busy power, which the predictive policy's online calibration has to absorb);
- a server's latencies: a decision reaches the engine `limits_delay_s` later, a step's
  sample reaches the governor `sample_delay_s` later;
- the server process starved of CPU (`stalls.py`): stalls every `stall_every_s` on average,
  each `stall_min_s` to `stall_max_s` long (log-uniform), step samples worked off at
  `catch_up` of the stalled time, no request admitted meanwhile. The GPU runs showed it:
  the benchmark's process, which also drove the 256 streams, had its NVML poller fall
  1-1.7 s behind 27 times and lost 29 % of the expected readings in one run;
- the load: a closed loop of `concurrency` requests, each finished one replaced at once.

With these, the mirror reproduces the GPU runs: off at 21,400 tokens/s and 643 W; reactive
near 1 % of readings over 500 W with a handful of decisions; the previous predictive law
with 4-11 % over, a mean power near 453 W, a p99 near 520 W and 60-70 decisions
(docs/governor.md). Without stalls (`stall_every_s=None`) the previous law looked fine.

Scored from `settle_s` on, at the telemetry rate (20 Hz, the readings a stall loses are
lost), as the GPU benchmark scores: the share of NVML 1 s average readings over the budget,
output tokens/s, mean and p99 power, decisions.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ondo.control.objectives import GpuFacts, resolve_objectives
from ondo.control.predictive import PredictiveTuning
from ondo.control.reactive import ReactiveTuning
from ondo.control.sim.arrivals import BurstyArrivals
from ondo.control.sim.calibration import h100_step_time
from ondo.control.sim.scenarios import qwen3_06b_cost_shape
from ondo.control.sim.simulator import ClosedLoopSimulator, SimConfig, SimResult
from ondo.control.sim.stalls import StallSchedule
from ondo.twin.params import TwinParams
from ondo.twin.plant import Load

REPO = Path(__file__).resolve().parents[3]
H200_TRACE = REPO / "data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv"


@dataclass(frozen=True)
class MirrorSettings:
    trace: str = str(H200_TRACE)
    fit_until_s: float = 60.0
    budget_w: float | None = 500.0
    seconds: float = 45.0
    settle_s: float = 5.0
    step_time_scale: float = 0.7  # the H100-fitted step times times this: the H200's pace
    plant_gain: float = 0.25
    twin_gain: float = 0.31
    limits_delay_s: float = 0.1
    sample_delay_s: float = 0.05
    concurrency: int = 256
    stall_every_s: float | None = 3.0  # server-process stalls (stalls.py): mean interval
    stall_min_s: float = 0.2
    stall_max_s: float = 1.7
    catch_up: float = 0.25
    seed: int = 0  # of the stalls

    def stalls(self) -> StallSchedule | None:
        if self.stall_every_s is None:
            return None
        return StallSchedule.random(self.stall_every_s, (self.stall_min_s, self.stall_max_s),
                                    self.seconds, self.seed, self.catch_up)

    def check(self) -> None:
        """ValueError naming the setting that is out of range."""
        if not self.seconds > self.settle_s:
            raise ValueError("--seconds must be larger than --settle-s")
        if min(self.plant_gain, self.twin_gain) <= 0:
            raise ValueError("--plant-gain and --twin-gain must be > 0")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.step_time_scale <= 0:
            raise ValueError("--step-time-scale must be > 0")
        if self.stall_every_s is not None and not (
                self.stall_every_s > 0 and 0 < self.stall_min_s <= self.stall_max_s):
            raise ValueError("--stall-every-s must be > 0 and 0 < --stall-min-s <= "
                             "--stall-max-s")
        if self.catch_up < 0:
            raise ValueError("--catch-up must be >= 0")


@lru_cache(maxsize=4)
def fitted_h200(trace: str, fit_until_s: float) -> TwinParams:
    """The twin fitted on the H200 serving trace, as `governor_gpu.py --fit-twin-on` fits it."""
    from ondo.twin.engine_load import fit_engine_load, refit_thermal
    from ondo.twin.params import h100_params
    from ondo.twin.traces import read_trace

    window = read_trace(trace).window(float("-inf"), fit_until_s)
    fitted, _ = refit_thermal(h100_params(), [window])
    fitted, _ = fit_engine_load(fitted, [window])
    return fitted


def mirror_simulator(s: MirrorSettings, policy: str,
                     reactive: ReactiveTuning | None = None,
                     predictive: PredictiveTuning | None = None) -> ClosedLoopSimulator:
    fitted = fitted_h200(s.trace, s.fit_until_s)
    gain = fitted.engine_compute_gain
    plant = fitted.replace(engine_compute_gain=gain * s.plant_gain)
    twin = fitted.replace(engine_compute_gain=gain * s.twin_gain)
    objectives = resolve_objectives(GpuFacts.from_params(twin), power_budget_w=s.budget_w)
    # W1's lengths; the arrival times are not used in a closed loop.
    requests = BurstyArrivals(1.0, 1.0, 1.0, 1.0, seed=0).trace(4000.0)
    step_time = h100_step_time()
    k = s.step_time_scale
    step_time = dataclasses.replace(step_time, host_s=step_time.host_s * k,
                                    per_seq_s=step_time.per_seq_s * k,
                                    memory_factor=step_time.memory_factor * k,
                                    compute_factor=step_time.compute_factor * k)
    config = SimConfig(qwen3_06b_cost_shape(), step_time, plant, twin_params=twin,
                       initial_load=Load(0.5, 0.6), limits_delay_s=s.limits_delay_s,
                       engine_sample_delay_s=s.sample_delay_s, stalls=s.stalls())
    return ClosedLoopSimulator(config, requests, policy, objectives, reactive=reactive,
                               predictive=predictive, concurrency=s.concurrency)


def score(s: MirrorSettings, result: SimResult) -> dict[str, float]:
    """The GPU benchmark's figures for one run, from `settle_s` on."""
    series = result.series
    keep = series["t_s"] >= s.settle_s
    power = series["power_w"][keep]
    tokens = series["output_tokens"][keep]
    budget = np.inf if s.budget_w is None else s.budget_w
    return {
        "output_tokens_per_s": float(tokens[-1] - tokens[0]) / (s.seconds - s.settle_s),
        "over_budget_fraction": float(np.mean(power > budget)),
        "mean_power_w": float(power.mean()),
        "p99_power_w": float(np.percentile(power, 99)),
        "decisions": sum(d.t_monotonic_s >= s.settle_s for d in result.decisions),
    }


def run_mirror(s: MirrorSettings, policy: str, reactive: ReactiveTuning | None = None,
               predictive: PredictiveTuning | None = None) -> tuple[dict, SimResult]:
    """(the figures, with the run's CPU seconds; the full result)."""
    s.check()
    sim = mirror_simulator(s, policy, reactive, predictive)
    t0 = time.process_time()
    result = sim.run(s.seconds)
    return {**score(s, result), "cpu_s": time.process_time() - t0}, result
