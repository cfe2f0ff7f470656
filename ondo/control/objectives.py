"""What the governor holds: a power budget, temperature targets, a latency SLO.

- `power_budget_w`: held on NVML's 1 s average power, below the board's own limit (a rack
  that oversubscribes its power feed, as in POLCA). None: the board limit only.
- `temp_target_c` / `hbm_temp_target_c`: the die and HBM sensor readings to stay at or below,
  by default a margin below the GPU's thresholds (SW thermal slowdown, HBM max).
- `tpot_slo_s`: p99 time per output token; within it the governor keeps batches as large as
  it can, since a larger batch reads the weights once for more tokens (more tokens per joule).

An objective the GPU cannot meet (a budget under its idle power, a target under the inlet
temperature) is refused with an `ObjectiveError` that names the flag which set it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ondo.twin.params import TwinParams
from ondo.twin.plant import Load, steady_state

DEFAULT_TEMP_MARGIN_C = 5.0


class ObjectiveError(ValueError):
    """An objective that cannot be met; `flag` names the setting to change."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass(frozen=True)
class Objectives:
    power_budget_w: float | None = None
    temp_target_c: float | None = None
    hbm_temp_target_c: float | None = None
    tpot_slo_s: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GpuFacts:
    """The GPU's limits and resting point, which objectives are checked against."""

    power_limit_w: float  # the board's own limit (its power-cap controller acts there)
    sw_thermal_c: float  # max operating temperature: SW thermal slowdown starts here
    hw_slowdown_c: float
    hbm_max_c: float
    ambient_c: float  # inlet temperature
    idle_power_w: float  # at rest at that inlet
    idle_die_c: float
    idle_hbm_c: float

    @classmethod
    def from_params(cls, params: TwinParams, ambient_c: float | None = None) -> GpuFacts:
        amb = params.ambient_c if ambient_c is None else ambient_c
        rest = steady_state(params, Load(), amb)
        return cls(params.power_limit_w, params.sw_thermal_c, params.hw_slowdown_c,
                   params.mem_max_c, amb, float(rest.power_instant_w), float(rest.die_c),
                   float(rest.hbm_c))


def resolve_objectives(
    facts: GpuFacts,
    *,
    power_budget_w: float | None = None,
    temp_target_c: float | None = None,
    temp_margin_c: float | None = None,
    hbm_temp_target_c: float | None = None,
    tpot_slo_ms: float | None = None,
) -> Objectives:
    """Objectives from the serve flags, defaults filled in and checked against the GPU.

    Temperature targets default to `temp_margin_c` (5 °C) below the SW thermal slowdown
    (die) and the HBM maximum."""
    margin = DEFAULT_TEMP_MARGIN_C if temp_margin_c is None else temp_margin_c
    if margin < 0:
        raise ObjectiveError("--temp-margin-c", f"{margin:g} °C must be >= 0")
    die_flag = "--temp-target-c" if temp_target_c is not None else "--temp-margin-c"
    hbm_flag = "--hbm-temp-target-c" if hbm_temp_target_c is not None else "--temp-margin-c"
    die = temp_target_c if temp_target_c is not None else facts.sw_thermal_c - margin
    hbm = hbm_temp_target_c if hbm_temp_target_c is not None else facts.hbm_max_c - margin
    if power_budget_w is not None:
        if not power_budget_w > facts.idle_power_w:
            raise ObjectiveError(
                "--power-budget-w",
                f"a budget of {power_budget_w:g} W is not above the GPU's idle power "
                f"({facts.idle_power_w:.0f} W at a {facts.ambient_c:.0f} °C inlet): it cannot be "
                "held by shaping the load")
    for flag, target, idle, what in ((die_flag, die, facts.idle_die_c, "die"),
                                     (hbm_flag, hbm, facts.idle_hbm_c, "HBM")):
        if target <= facts.ambient_c:
            raise ObjectiveError(flag, f"a {what} target of {target:g} °C is not above the inlet "
                                       f"temperature ({facts.ambient_c:.1f} °C)")
        if target <= idle:
            raise ObjectiveError(flag, f"a {what} target of {target:g} °C is not above what the "
                                       f"{what} reads at idle ({idle:.1f} °C at a "
                                       f"{facts.ambient_c:.1f} °C inlet)")
    if tpot_slo_ms is not None and not tpot_slo_ms > 0:
        raise ObjectiveError("--tpot-slo-ms", f"{tpot_slo_ms:g} ms must be > 0")
    return Objectives(power_budget_w, die, hbm, None if tpot_slo_ms is None else tpot_slo_ms / 1e3)
