"""Detectors over the twin's snapshots and the governor's decisions, both read by field name
(any object with the fields will do):

- a twin snapshot: gpu_index, t_monotonic_s, t_wall_s, forecast_horizon_s, die_peak_c,
  hbm_peak_c, power_peak_w, time_to_throttle_s, time_to_power_cap_s (None: not within the
  horizon). Live, the twin publishes them; `ondo events replay` computes them itself
  (`ondo/events/replay_twin.py`).
- a governor decision: t_monotonic_s, t_wall_s, policy, reason, limits, inputs, forecast.
"""

from __future__ import annotations

import math
from typing import Any

from ondo.events.config import DetectorConfig
from ondo.events.detectors.common import cleared, opened, twin_ref
from ondo.events.detectors.gpu import THERMAL_REASON_BITS, margin_detector
from ondo.events.hysteresis import CLOSED, OPENED, Hysteresis
from ondo.events.schema import EventDraft, EventKind
from ondo.telemetry.schema import ThrottleReason

TWIN_FIELDS = ("gpu_index", "t_monotonic_s", "time_to_throttle_s", "forecast_horizon_s")
GOVERNOR_FIELDS = ("t_monotonic_s", "policy", "reason", "limits", "inputs", "forecast")


def is_twin_snapshot(record: Any) -> bool:
    return all(hasattr(record, f) for f in TWIN_FIELDS)


def is_governor_decision(record: Any) -> bool:
    return all(hasattr(record, f) for f in GOVERNOR_FIELDS)


def _opt(x: Any) -> float | None:
    return None if x is None else float(x)


class ThrottlePrediction:
    """A forecast throttle within `predict_lead_s` opens; none within
    `predict_release_lead_s` for `predict_release_s` closes. While the GPU already throttles
    for that reason the forecast says nothing new, so the state holds."""

    def __init__(self, config: DetectorConfig, gpu: int, reason: str, field: str,
                 bits: int) -> None:
        self.gpu, self.reason, self.field, self.bits = gpu, reason, field, bits
        self.machine = Hysteresis(config.predict_lead_s, config.predict_release_lead_s, 0.0,
                                  config.predict_release_s, rising=False)

    def feed(self, snap: Any, throttling_bits: int, basis: str) -> list[EventDraft]:
        if throttling_bits & self.bits:
            return []
        t, wall = float(snap.t_monotonic_s), float(snap.t_wall_s)
        value = getattr(snap, self.field, None)
        transition = self.machine.update(t, math.inf if value is None else float(value))
        subject = {"gpu": self.gpu, "reason": self.reason}
        ref = (twin_ref(self.gpu, t),)
        if transition is OPENED:
            return [opened(EventKind.THROTTLE_PREDICTED, t, wall, subject,
                           {"reason": self.reason, "time_to_throttle_s": float(value),
                            "horizon_s": float(snap.forecast_horizon_s),
                            "die_peak_c": _opt(getattr(snap, "die_peak_c", None)),
                            "hbm_peak_c": _opt(getattr(snap, "hbm_peak_c", None)),
                            "power_peak_w": _opt(getattr(snap, "power_peak_w", None)),
                            "basis": basis}, ref)]
        if transition is CLOSED:
            return [cleared(EventKind.THROTTLE_PREDICTED, t, wall, subject,
                            self.machine.onset_s, self.machine.since_s, {}, ref)]
        return []


class TwinDetectors:
    """Per GPU: thermal and power-cap throttle predictions, forecast die and HBM margins."""

    def __init__(self, config: DetectorConfig, gpu: int, basis: str = "live twin") -> None:
        self.basis = basis
        self.predictions = (
            ThrottlePrediction(config, gpu, "thermal", "time_to_throttle_s", THERMAL_REASON_BITS),
            ThrottlePrediction(config, gpu, "sw_power_cap", "time_to_power_cap_s",
                               ThrottleReason.SW_POWER_CAP.value),
        )
        ref = lambda snap: twin_ref(gpu, float(snap.t_monotonic_s))  # noqa: E731
        self.margins = (
            margin_detector(config, gpu, False, "forecast",
                            lambda snap: _opt(getattr(snap, "die_peak_c", None)), ref),
            margin_detector(config, gpu, True, "forecast",
                            lambda snap: _opt(getattr(snap, "hbm_peak_c", None)), ref),
        )

    def feed(self, snap: Any, throttling_bits: int) -> list[EventDraft]:
        out: list[EventDraft] = []
        for p in self.predictions:
            out += p.feed(snap, throttling_bits, self.basis)
        t, wall = float(snap.t_monotonic_s), float(snap.t_wall_s)
        for m in self.margins:
            out += m.feed(t, wall, snap)
        return out


def governor_event(decision: Any) -> EventDraft:
    t = float(decision.t_monotonic_s)
    return EventDraft(
        EventKind.GOVERNOR_DECISION, t, float(getattr(decision, "t_wall_s", 0.0)),
        {"policy": str(decision.policy)},
        {"policy": str(decision.policy), "reason": str(decision.reason),
         "limits": dict(decision.limits), "inputs": dict(decision.inputs),
         "forecast": dict(decision.forecast)})
