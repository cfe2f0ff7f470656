"""A simple first-order GPU plant, standing in for `ondo.twin.plant.GpuPlant` until it lands.

Power follows the load at once (instant power) and through NVML's ~1 s average; die and HBM
temperatures are first-order lags towards ambient + R·P; above the power limit the SM clock is
pulled down in proportion and the SW power cap bit is set, above the slowdown temperature the
SW thermal bit. Constants are rough H100 SXM figures from data/traces, not a fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ondo.telemetry.schema import ThrottleReason


class Load(Protocol):
    compute_activity: float
    memory_activity: float


class PlantReading(Protocol):
    temp_c: float
    mem_temp_c: float
    power_w: float
    power_instant_w: float
    energy_j: float
    sm_mhz: float
    mem_mhz: float
    throttle_reasons: int
    util_pct: float


class Plant(Protocol):
    """What the simulated source needs of a plant; `ondo.twin.plant.GpuPlant` has this shape."""

    def step(self, dt_s: float, load: Load, ambient_c: float) -> PlantReading: ...


@dataclass(frozen=True)
class FirstOrderReading:
    temp_c: float
    mem_temp_c: float
    power_w: float
    power_instant_w: float
    energy_j: float
    sm_mhz: float
    mem_mhz: float
    throttle_reasons: int
    util_pct: float


@dataclass
class FirstOrderPlant:
    idle_power_w: float = 70.0
    compute_power_w: float = 800.0  # extra draw at full compute, before the cap
    memory_power_w: float = 430.0  # extra draw at full memory traffic
    power_limit_w: float = 700.0
    power_avg_tau_s: float = 1.0  # NVML's moving average
    die_tau_s: float = 20.0
    die_r_c_per_w: float = 0.065
    hbm_tau_s: float = 30.0
    hbm_r_c_per_w: float = 0.045
    hbm_memory_r_c_per_w: float = 0.03  # HBM heats more from memory traffic
    slowdown_temp_c: float = 87.0
    max_sm_mhz: float = 1980.0
    mem_mhz: float = 2619.0
    temp_c: float = 30.0
    mem_temp_c: float = 32.0
    power_w: float = 70.0
    energy_j: float = 0.0

    def step(self, dt_s: float, load: Load, ambient_c: float) -> FirstOrderReading:
        c = min(1.0, max(0.0, load.compute_activity))
        m = min(1.0, max(0.0, load.memory_activity))
        demand_w = self.idle_power_w + self.compute_power_w * c + self.memory_power_w * m
        reasons = 0
        clock_scale = 1.0
        if demand_w > self.power_limit_w:
            reasons |= ThrottleReason.SW_POWER_CAP
            clock_scale = self.power_limit_w / demand_w
        if self.temp_c > self.slowdown_temp_c:
            reasons |= ThrottleReason.SW_THERMAL_SLOWDOWN
            clock_scale *= 0.8
        if c == 0.0 and m == 0.0:
            reasons |= ThrottleReason.GPU_IDLE
        instant_w = min(demand_w, self.power_limit_w)
        if reasons & ThrottleReason.SW_THERMAL_SLOWDOWN:
            instant_w *= 0.8

        self.energy_j += instant_w * dt_s
        self.power_w += (instant_w - self.power_w) * (1.0 - math.exp(-dt_s / self.power_avg_tau_s))
        die_target_c = ambient_c + self.die_r_c_per_w * instant_w
        self.temp_c += (die_target_c - self.temp_c) * (1.0 - math.exp(-dt_s / self.die_tau_s))
        hbm_target_c = (
            ambient_c
            + self.hbm_r_c_per_w * instant_w
            + self.hbm_memory_r_c_per_w * self.memory_power_w * m
        )
        self.mem_temp_c += (hbm_target_c - self.mem_temp_c) * (
            1.0 - math.exp(-dt_s / self.hbm_tau_s)
        )
        return FirstOrderReading(
            temp_c=self.temp_c,
            mem_temp_c=self.mem_temp_c,
            power_w=self.power_w,
            power_instant_w=instant_w,
            energy_j=self.energy_j,
            sm_mhz=self.max_sm_mhz * clock_scale,
            mem_mhz=self.mem_mhz,
            throttle_reasons=int(reasons),
            util_pct=100.0 * max(c, m),
        )
