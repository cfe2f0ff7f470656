"""The governor's benchmark scenarios, on the simulated H100 serving the Qwen3-0.6B shape.

Every scenario replays the same kind of traffic: a seeded bursty trace of long-context
requests (prompts of 1,500-3,500 tokens, outputs of 300-1,000; calm spells of 6 requests/s
and bursts of 20/s, 9.5/s on average against the ~9/s the GPU serves, so a queue builds
in the heavier stretches), on a GPU that has been serving before the run starts (the plant
starts at rest under a busy load), with the default temperature targets (5 °C under the SW
thermal slowdown for the die, under the HBM maximum for the HBM) and, where named, a power
budget. Figures are scored from WARMUP_S on.

- `nominal`: the fitted inlet (32 °C) and cooling. Nothing binds: what the governor costs
  when it has nothing to do.
- `hot-inlet`: the inlet 25 °C hotter (57 °C): the die target binds.
- `degraded-cooling`: the heatsink's resistance to the air (heatsink to board to inlet) x1.5,
  as a failed fan does, at a 48 °C inlet. At the fitted inlet the die would stay more than
  10 °C under its target at this load, and nothing would bind.
- `power-budget-450w`: a 450 W budget on NVML's 1 s average (the load draws 500-600 W).

The fitted H100 puts 0.049 °C/W between die and air and this model's serving load peaks
near 620 W, so the GPU's own thermal slowdown (87 °C) lies beyond every scenario's reach by
a few degrees; what the governor holds is the operator's target below it, and the GPU's
throttle is the backstop it should never need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from ondo.control.objectives import GpuFacts, Objectives, resolve_objectives
from ondo.control.predictive import PredictiveTuning
from ondo.control.reactive import ReactiveTuning
from ondo.control.sim.arrivals import BurstyArrivals, SimRequest
from ondo.control.sim.calibration import h100_serving_params, h100_step_time
from ondo.control.sim.simulator import ClosedLoopSimulator, SimConfig, SimResult
from ondo.engine.step_cost import CostShape
from ondo.twin.params import TwinParams
from ondo.twin.plant import Load

POLICIES = ("off", "reactive", "predictive")
SUMMARY_FIELDS = ("throttled_s", "over_target_s", "over_budget_s", "output_tokens_per_s",
                  "ttft_p99_s", "tpot_p99_s", "joules_per_output_token")

TRAFFIC = BurstyArrivals(calm_rate_per_s=6.0, burst_rate_per_s=20.0, mean_calm_s=12.0,
                         mean_burst_s=4.0, prompt_tokens=(1500, 3500),
                         output_tokens=(300, 1000), seed=0)
WARM_LOAD = Load(compute_activity=0.3, memory_activity=0.4)  # serving before the run
WARMUP_S = 10.0  # the figures start here: the power window and the twin settle first


@lru_cache(maxsize=1)
def qwen3_06b_cost_shape() -> CostShape:
    from ondo.bench.shapes import SHAPES
    from ondo.model.config import ModelConfig

    return CostShape.from_config(ModelConfig.from_hf_dict(SHAPES["qwen3-0.6b"]), dtype_bytes=2)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    inlet_rise_c: float = 0.0  # over the fitted inlet
    inlet_c: float | None = None  # or this inlet outright
    heatsink_resistance_factor: float = 1.0
    power_budget_w: float | None = None
    duration_s: float = 180.0
    traffic: BurstyArrivals = TRAFFIC

    def params(self) -> TwinParams:
        p = h100_serving_params()
        f = self.heatsink_resistance_factor
        if f != 1.0:
            p = p.replace(sink_board_c_per_w=p.sink_board_c_per_w * f,
                          board_amb_c_per_w=p.board_amb_c_per_w * f)
        return p

    def inlet(self) -> float:
        return self.inlet_c if self.inlet_c is not None else (
            h100_serving_params().ambient_c + self.inlet_rise_c)

    def objectives(self) -> Objectives:
        return resolve_objectives(GpuFacts.from_params(self.params(), self.inlet()),
                                  power_budget_w=self.power_budget_w)

    def shortened(self, duration_s: float) -> Scenario:
        return dataclasses.replace(self, duration_s=duration_s)

    def requests(self, seed: int | None = None) -> list[SimRequest]:
        traffic = self.traffic if seed is None else dataclasses.replace(self.traffic, seed=seed)
        return traffic.trace(self.duration_s)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("nominal", "fitted inlet and cooling: nothing binds"),
    Scenario("hot-inlet", "inlet +25 °C", inlet_rise_c=25.0),
    Scenario("degraded-cooling", "heatsink resistance x1.5 at a 48 °C inlet",
             inlet_c=48.0, heatsink_resistance_factor=1.5),
    Scenario("power-budget-450w", "a 450 W budget on NVML's 1 s average", power_budget_w=450.0),
)}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


def run_policy(sc: Scenario, policy: str, seed: int | None = None,
               reactive: ReactiveTuning | None = None,
               predictive: PredictiveTuning | None = None) -> SimResult:
    params = sc.params()
    config = SimConfig(qwen3_06b_cost_shape(), h100_step_time(), params, ambient_c=sc.inlet(),
                       initial_load=WARM_LOAD)
    sim = ClosedLoopSimulator(config, sc.requests(seed), policy, sc.objectives(),
                              reactive=reactive, predictive=predictive)
    return sim.run(sc.duration_s)


def run_scenario(sc: Scenario, policies: tuple[str, ...] = POLICIES,
                 seed: int | None = None) -> tuple[dict, dict[str, SimResult]]:
    """(the benchmark's JSON object, each policy's full result)."""
    results = {p: run_policy(sc, p, seed) for p in policies}
    report = {"scenario": sc.name, "policies": {
        p: {k: r.summary(WARMUP_S)[k] for k in SUMMARY_FIELDS} for p, r in results.items()}}
    return report, results
