"""Every threshold and dwell time of the detectors, with its unit. Limits default to the
GPU's NVML facts as the twin's parameters hold them (`ondo/twin/params.py`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ondo.twin.params import TwinParams, h100_params

# Settings that divide or bound a window, where zero means nothing.
_POSITIVE = {"power_budget_w", "die_limit_c", "hbm_limit_c", "gap_periods", "kv_pressure_on",
             "backlog_waiting", "swap_window_s", "swap_storm_fraction", "slo_ttft_s",
             "slo_tpot_s", "slo_window_s", "slo_violating_fraction"}


@dataclass(frozen=True)
class DetectorConfig:
    # Throttle episodes: the GPU's own report opens one at once; clear this long ends it.
    throttle_release_s: float = 1.0
    # SW power cap held this long: throughput is power-bound.
    power_cap_sustain_s: float = 5.0
    # Power budget: an operator's share of power (a rack's, a facility's), below the GPU's
    # own limit, which the power cap already watches; None: no budget. NVML's ~1 s average
    # above budget_w for rise_s opens, below budget_w * (1 - band) for release_s closes.
    power_budget_w: float | None = None
    power_budget_band: float = 0.02
    power_budget_rise_s: float = 1.0
    power_budget_release_s: float = 2.0
    # Thermal margins (limit - temperature), measured and forecast.
    die_limit_c: float = 87.0  # NVML max operating temperature (SW thermal slowdown)
    hbm_limit_c: float = 95.0  # NVML HBM max
    margin_low_c: float = 5.0  # opens at or below this margin
    margin_ok_c: float = 7.0  # closes at or above this margin
    margin_rise_s: float = 1.0
    margin_release_s: float = 5.0
    # Twin forecasts: a throttle within lead_s opens; none within release_lead_s closes.
    predict_lead_s: float = 5.0
    predict_release_lead_s: float = 7.5
    predict_release_s: float = 3.0
    # Sensors: a refreshed reading unchanged this long is stale; failed reads open at once.
    stale_after_s: float = 2.0
    sensor_release_s: float = 2.0
    # Telemetry gaps: a GPU series gap longer than max(gap_periods * period, gap_min_s).
    gap_periods: float = 5.0
    gap_min_s: float = 0.25
    gap_merge_s: float = 5.0  # at most one gap event per GPU per this long (the rest counted)
    # Engine: KV-cache usage, waiting queue, preemption bursts, swap traffic.
    kv_pressure_on: float = 0.95
    kv_pressure_off: float = 0.85
    kv_pressure_rise_s: float = 1.0
    kv_pressure_release_s: float = 2.0
    backlog_waiting: int = 32
    backlog_rise_s: float = 2.0
    backlog_release_s: float = 2.0
    preemption_release_s: float = 2.0
    swap_window_s: float = 10.0
    swap_storm_fraction: float = 0.5  # of the KV cache moved over the host link per window
    swap_release_s: float = 5.0
    # Service-level objectives, over the requests finished in a sliding window.
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    slo_window_s: float = 30.0
    slo_min_violations: int = 3
    slo_violating_fraction: float = 0.10
    slo_ok_fraction: float = 0.05
    slo_release_s: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise ValueError(f"detector setting {f.name}={value!r} is not a number")
            if value < 0 or (value == 0 and f.name in _POSITIVE):
                raise ValueError(f"detector setting {f.name}={value} must be "
                                 f"{'> 0' if f.name in _POSITIVE else '>= 0'}")
        for low, high in (("kv_pressure_off", "kv_pressure_on"), ("margin_low_c", "margin_ok_c"),
                          ("predict_lead_s", "predict_release_lead_s"),
                          ("slo_ok_fraction", "slo_violating_fraction")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"detector setting {low}={getattr(self, low)} must not exceed "
                                 f"{high}={getattr(self, high)}")

    def replace(self, **changes) -> DetectorConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_params(cls, params: TwinParams | None = None, **changes) -> DetectorConfig:
        """Limits from a GPU's twin parameters (the packaged H100's by default)."""
        p = params or h100_params()
        base = cls(die_limit_c=p.sw_thermal_c, hbm_limit_c=p.mem_max_c)
        return base.replace(**changes)
