"""Which GPU binds: of the GPUs one engine runs on, the one closest to (or furthest over) one
of its limits. The engine steps all its GPUs together, so one set of scheduler limits serves
them all, and it must be the one the most constrained GPU needs.

For each GPU and each constraint, the slack is the fraction of the limit still left:

    slack = (limit - value) / limit        (negative: over the limit)

with the die and HBM temperatures (the higher of the reading and the twin's forecast peak,
where a twin snapshot is there) against their targets, and NVML's 1 s average power against
the budget; a constraint without an objective is taken against the GPU's own limit (its
thermal slowdown, its HBM maximum, its power limit), so that the hottest GPU binds even with
no objective set. The binding GPU is the one with the least slack over all its constraints
(ties: the lower index). Deciding only: pure in its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ondo.control.inputs import GovernorInputs
from ondo.control.objectives import Objectives
from ondo.twin.params import TwinParams

NO_READINGS = "no readings"


@dataclass(frozen=True)
class Binding:
    gpu_index: int
    constraint: str  # "die temperature", "HBM temperature", "power budget", or NO_READINGS
    slack: float  # fraction of the limit left (negative: over it); +inf with no readings


def constraint_slacks(inputs: GovernorInputs, objectives: Objectives,
                      params: TwinParams) -> list[tuple[str, float]]:
    """(constraint, slack) for each constraint this GPU has a reading for."""
    twin = inputs.twin
    die = _highest(inputs.die_sensor_c, None if twin is None else twin.die_peak_c)
    hbm = _highest(inputs.hbm_sensor_c, None if twin is None else twin.hbm_peak_c)
    checks = (
        ("die temperature", die, objectives.temp_target_c or params.sw_thermal_c),
        ("HBM temperature", hbm, objectives.hbm_temp_target_c or params.mem_max_c),
        ("power budget", inputs.power_w, objectives.power_budget_w or params.power_limit_w),
    )
    return [(name, (limit - value) / limit) for name, value, limit in checks
            if value is not None and limit > 0]


def binding_gpu(inputs_by_gpu: Mapping[int, GovernorInputs], objectives: Objectives,
                params: TwinParams) -> Binding:
    """The GPU with the least slack (the first index where none has readings yet)."""
    if not inputs_by_gpu:
        raise ValueError("binding_gpu needs the inputs of at least one GPU")
    best = Binding(min(inputs_by_gpu), NO_READINGS, math.inf)
    for index in sorted(inputs_by_gpu):
        for name, slack in constraint_slacks(inputs_by_gpu[index], objectives, params):
            if slack < best.slack:
                best = Binding(index, name, slack)
    return best


def _highest(reading: float | None, forecast: float | None) -> float | None:
    values = [v for v in (reading, forecast) if v is not None and math.isfinite(v)]
    return max(values) if values else None
