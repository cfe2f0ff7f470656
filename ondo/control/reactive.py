"""The reactive policy: what operators do today, a threshold on each sensor with hysteresis.

Every `period_s`, from the latest readings only (die and HBM sensors, NVML's 1 s average power):

    hot  = T_die >= T_target  or  T_hbm >= T_hbm_target  or  P_avg >= P_budget
    cool = T_die <= T_target - h_T  and  T_hbm <= T_hbm_target - h_T  and  P_avg <= P_budget - h_P
    hot,  and no cut in the last hold_s:        u <- max(u_min, beta * u)     (multiplicative cut)
    cool, for at least up_hold_s:               u <- min(1, u + alpha)        (additive release)

u is the engine's load level (duty cycle, `policy.py`), the same actuator the predictive
policy uses; only the law differs. Stability: between the thresholds nothing moves (the
hysteresis band absorbs the sensors' noise and quantisation), a cut is followed by a hold
long enough for the 1 s power average and the die (63 % of a step in ~4 s) to show it, and
the release is additive, slower than the cut (AIMD), so it settles into a limit cycle around
the threshold whose amplitude the band and the step sizes bound. Its weakness is the one it
was built with: it acts on readings that lag the load (the 1 s power average by up to a
second, temperatures by the heatsink's seconds), so every load step overshoots first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ondo.control.inputs import GovernorInputs
from ondo.control.objectives import Objectives
from ondo.control.policy import (
    MIN_LEVEL,
    EngineConfig,
    TpotShaper,
    Verdict,
    limits_for,
    quantize_level,
)


@dataclass(frozen=True)
class ReactiveTuning:
    period_s: float = 0.2
    decrease_factor: float = 0.8  # beta
    increase_step: float = 0.05  # alpha
    hold_s: float = 1.0
    up_hold_s: float = 1.0
    temp_hysteresis_c: float = 3.0
    power_hysteresis_w: float = 30.0
    min_level: float = MIN_LEVEL


class ReactivePolicy:
    name = "reactive"

    def __init__(self, config: EngineConfig, tuning: ReactiveTuning | None = None) -> None:
        self.tuning = tuning or ReactiveTuning()
        self.period_s = self.tuning.period_s
        self.level = 1.0
        self.shaper = TpotShaper(config)
        self._last_cut_s = -math.inf
        self._cool_since_s: float | None = None

    def decide(self, inputs: GovernorInputs, objectives: Objectives,
               config: EngineConfig) -> Verdict:
        t = self.tuning
        now = inputs.t_monotonic_s
        hot, cool = [], True
        for name, value, limit, band in (
            ("die temperature", inputs.die_sensor_c, objectives.temp_target_c,
             t.temp_hysteresis_c),
            ("HBM temperature", inputs.hbm_sensor_c, objectives.hbm_temp_target_c,
             t.temp_hysteresis_c),
            ("power budget", inputs.power_w, objectives.power_budget_w, t.power_hysteresis_w),
        ):
            if value is None or limit is None:
                continue
            if value >= limit:
                hot.append(name)
            if value > limit - band:
                cool = False
        reason = "below every threshold"
        if hot:
            self._cool_since_s = None
            reason = f"{' and '.join(hot)} at or over target"
            if now - self._last_cut_s >= t.hold_s:
                self.level = max(t.min_level, self.level * t.decrease_factor)
                self._last_cut_s = now
        elif cool:
            if self._cool_since_s is None:
                self._cool_since_s = now
            if now - self._cool_since_s >= t.up_hold_s and self.level < 1.0:
                self.level = min(1.0, self.level + t.increase_step)
                self._cool_since_s = now
                reason = "releasing: every reading below its band"
        else:
            self._cool_since_s = None
            reason = "inside the hysteresis band"
        shaping = self.shaper.update(inputs.tpot_p99_s, objectives.tpot_slo_s, now)
        if shaping and not hot:
            reason += "; TPOT SLO shapes the batch"
        level = quantize_level(self.level) if self.level < 1.0 else 1.0
        return Verdict(limits_for(level, self.shaper.seats, self.shaper.chunk), reason)
