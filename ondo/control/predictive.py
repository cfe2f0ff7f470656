"""The predictive policy: model-predictive control of the engine's load level.

Every `period_s` (0.2 s), with u the load level (the engine's duty cycle):

1. Load ahead (feed-forward). The engine's recent busy load, in the plant's units (each
   step through the twin's engine load map, then averaged), by kind of step, and its
   queue: if W prompt tokens wait (as many as free seats and KV blocks let in) and prefill
   ran at R tokens/s, the next second spends phi = min(1, W / R) of its busy time in
   prefill, more than the share s it just did, so the planned busy load is
   recent + (phi - s)+ (prefill - decode). A burst is in the queue before it is in any
   power reading.
2. Power of a level: P(u) = P_idle + b + g u f (P_busy - P_idle), the twin's power model at
   the present clock and estimated die temperature, f = 1 while work waits or runs (else
   the measured busy share); offset b and gain g estimated online from NVML's 1 s average
   (`thermal_model.PowerCalibration`).
3. Power budget B (less `power_margin_w`) on NVML's 1 s average: tau seconds ahead the
   average is (H(tau) + tau P(u)) / 1 s, H(tau) the energy already in the window (the
   energy counter's), so P(u) <= (B - H(tau)) / tau for tau in `window_taus` bounds the
   next move, and P(u) <= B the level held after it.
4. Temperatures: plans (u1 for `first_s`, then u2 to `horizon_s`) over a grid of levels,
   all forecast at once from the twin's estimated state (die, HBM, heatsink, board,
   sensors, inlet) with the twin's thermal network (`thermal_model.py`), the busy steps'
   ripple added; a plan is feasible if no forecast reading exceeds its target (less
   `temp_margin_c`) and both moves keep the power bounds.
5. The feasible plan with the largest u1 (then u2) wins and u1 is applied; next period the
   problem is solved again from the new estimate (receding horizon). Cuts apply at once;
   releases wait `release_hold_s`, rise at most `max_rise_per_s` and by `release_step`.

Why it is stable (docs/governor.md has the time constants): the forecast starts from the
estimator's state, not from the lagging readings, so the heat stored in heatsink and board
(the 16 s mode) is in it; every accepted plan holds the targets over a horizon twice the
slow mode with a level it can keep, so the next solve starts where a feasible plan exists
(recursive feasibility): no overshoot to correct, no limit cycle; the power bound acts
within a period on a 1 s average, exactly, from the energy counter; the calibration's
offset is integral action, slow next to the period, and its gain keeps the loop gain the
one the law assumes. It shapes what the engine asks of the GPU and leaves the last
milliseconds to the GPU's own controllers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ondo.control.inputs import GovernorInputs
from ondo.control.objectives import Objectives
from ondo.control.policy import (
    MIN_LEVEL,
    EngineConfig,
    TpotShaper,
    Verdict,
    limits_for,
)
from ondo.control.thermal_model import (
    LoadPower,
    PowerCalibration,
    forecast_plans,
    load_power,
)
from ondo.twin.params import TwinParams


@dataclass(frozen=True)
class PredictiveTuning:
    period_s: float = 0.2
    first_s: float = 1.0  # the first move of a plan
    horizon_s: float = 30.0
    dt_s: float = 0.5
    power_margin_w: float = 15.0
    temp_margin_c: float = 0.0
    window_taus: tuple[float, ...] = (0.5, 1.0)
    max_rise_per_s: float = 0.5
    level_step: float = 0.025  # the grid of levels the plans are made of
    release_step: float = 0.05  # smallest release applied (cuts apply whatever their size)
    release_hold_s: float = 0.6  # a release waits until a higher level held this long
    prefill_lookahead_s: float = 1.0
    kv_full: float = 0.9  # KV cache use above which waiting prompts wait for blocks
    min_level: float = MIN_LEVEL


class PredictivePolicy:
    name = "predictive"

    def __init__(self, params: TwinParams, config: EngineConfig,
                 tuning: PredictiveTuning | None = None) -> None:
        self.params = params
        self.tuning = tuning or PredictiveTuning()
        self.period_s = self.tuning.period_s
        t = self.tuning
        n = int(round((1.0 - t.min_level) / t.level_step)) + 1
        self.levels = np.round(np.linspace(t.min_level, 1.0, n), 4)
        self.level = 1.0
        self.calibration = PowerCalibration()
        self.shaper = TpotShaper(config)
        self._last_s: float | None = None
        self._rise_from_s: float | None = None

    # -- the load ahead --------------------------------------------------------------
    def _planned_load(self, inputs: GovernorInputs,
                      config: EngineConfig) -> tuple[tuple[float, float], float]:
        """(planned busy activity (e_c, e_m), natural busy share f) for the next second."""
        e = inputs.engine
        recent = (e.compute_activity, e.memory_activity)
        planned = recent
        seats = (self.shaper.seats or config.max_num_seqs) - e.num_running
        admissible = seats > 0 and e.kv_usage < self.tuning.kv_full
        if e.num_waiting_tokens > 0 and e.prefill_compute_activity > 0 and admissible:
            # More of the next second in prefill than of the last: the difference in the mix.
            # Only what free seats let in starts now (and nothing while the KV cache is full):
            # the rest waits for running requests to finish.
            startable = e.num_waiting_tokens * min(1.0, seats / max(e.num_waiting, 1))
            rate = max(e.prefill_tokens_per_s, 1.0)
            phi = min(1.0, startable / (rate * self.tuning.prefill_lookahead_s))
            extra = max(0.0, phi - e.prefill_share)
            planned = (
                max(0.0, recent[0] + extra * (e.prefill_compute_activity
                                              - e.decode_compute_activity)),
                max(0.0, recent[1] + extra * (e.prefill_memory_activity
                                              - e.decode_memory_activity)))
        if e.num_waiting > 0 or e.num_running > 0:
            f = 1.0
        else:
            f = min(1.0, e.busy_fraction / max(self.level, MIN_LEVEL))
        return planned, f

    # -- the power budget ----------------------------------------------------------------
    def _window_energy_j(self, inputs: GovernorInputs, span_s: float) -> float:
        """Energy of the last span_s seconds, from the energy counter's refreshes (linear in
        between); since the last refresh, the latest fast power reading."""
        if span_s <= 0:
            return 0.0
        now = inputs.t_monotonic_s
        hist = inputs.energy_history
        fast_w = inputs.power_instant_w if inputs.power_instant_w is not None else (
            inputs.power_w or 0.0)
        if len(hist) < 2:
            return span_s * (inputs.power_w or fast_w)
        t_last, e_last = hist[-1]
        since = max(0.0, now - t_last)
        if since >= span_s:
            return span_s * fast_w
        start = t_last - (span_s - since)
        ts = np.array([t for t, _ in hist])
        es = np.array([e for _, e in hist])
        if start < ts[0]:  # older than the history: NVML's own average stands in
            e_start = es[0] - (ts[0] - start) * (inputs.power_w or fast_w)
        else:
            e_start = float(np.interp(start, ts, es))
        return (e_last - e_start) + since * fast_w

    def _power_levels(self, inputs: GovernorInputs, budget_w: float | None,
                      planned: LoadPower, sustained: LoadPower) -> tuple[float, float]:
        """(highest level for the next move, highest level to hold) under the budget."""
        if budget_w is None:
            return 1.0, 1.0
        cap = budget_w - self.tuning.power_margin_w
        first = math.inf
        for tau in self.tuning.window_taus:
            bound_w = (cap * 1.0 - self._window_energy_j(inputs, 1.0 - tau)) / tau
            first = min(first, planned.level_for_power(bound_w))
        return first, sustained.level_for_power(cap)

    # -- the decision ----------------------------------------------------------------
    def decide(self, inputs: GovernorInputs, objectives: Objectives,
               config: EngineConfig) -> Verdict:
        t = self.tuning
        now = inputs.t_monotonic_s
        dt = t.period_s if self._last_s is None else now - self._last_s
        self._last_s = now
        shaping = self.shaper.update(inputs.tpot_p99_s, objectives.tpot_slo_s, now)
        twin = inputs.twin
        if twin is None or inputs.power_w is None:
            return Verdict(self._limits(), "waiting for the twin's first estimate")
        p = self.params
        sm = inputs.sm_mhz or p.sm_max_mhz
        e = inputs.engine
        kinds = ((e.prefill_compute_activity, e.prefill_memory_activity),
                 (e.decode_compute_activity, e.decode_memory_activity))
        raw = load_power(p, e.compute_activity, e.memory_activity, sm, twin.die_c, kinds)
        if dt > 0:
            self.calibration.update(inputs.power_w, raw.idle_w,
                                    e.busy_fraction_1s * (raw.busy_w - raw.idle_w), dt)
        recent = self.calibration.apply(raw)
        (pc, pm), f = self._planned_load(inputs, config)
        planned = self.calibration.apply(load_power(p, pc, pm, sm, twin.die_c, kinds))
        if planned.busy_w < recent.busy_w:
            planned = recent
        planned, sustained = _at_share(planned, f), _at_share(recent, f)
        u_pow_first, u_pow_hold = self._power_levels(inputs, objectives.power_budget_w,
                                                     planned, sustained)
        # The first move on the fine grid, the level held after it on one twice as coarse.
        u1s, u2s = np.meshgrid(self.levels, self.levels[::-2][::-1], indexing="ij")
        u1s, u2s = u1s.ravel(), u2s.ravel()
        z0 = np.array([twin.die_c, twin.hbm_c, twin.sink_c, twin.board_c, twin.die_sensor_c,
                       twin.hbm_sensor_c])
        temps = forecast_plans(p, z0, twin.ambient_c, planned, u1s, u2s, t.first_s,
                               t.horizon_s, t.dt_s)
        die_peak, hbm_peak = temps[0].max(axis=0), temps[1].max(axis=0)
        die_ok = die_peak <= _target(objectives.temp_target_c, t.temp_margin_c)
        hbm_ok = hbm_peak <= _target(objectives.hbm_temp_target_c, t.temp_margin_c)
        pow_ok = (u1s <= u_pow_first + 1e-9) & (u2s <= u_pow_hold + 1e-9)
        ok = die_ok & hbm_ok & pow_ok
        if ok.any():
            idx = int(np.flatnonzero(ok)[np.lexsort((u2s[ok], u1s[ok]))[-1]])
            reason = _binding(u1s, u2s, idx, die_ok, hbm_ok, pow_ok)
        else:  # nothing holds: the least load, and say which objective is out of reach
            idx = int(np.argmin(u1s + u2s))
            missed = [n for n, m in (("die temperature", die_ok), ("HBM temperature", hbm_ok),
                                     ("power budget", pow_ok)) if not m[idx]]
            reason = f"{' and '.join(missed)} out of reach at the lowest level"
        self._move(float(u1s[idx]), now, dt)
        if shaping and self.level >= 1.0:
            reason += "; TPOT SLO shapes the batch"
        full = int(np.flatnonzero((u1s == 1.0) & (u2s == 1.0))[0])
        forecast = {
            "horizon_s": t.horizon_s,
            "die_peak_c": round(float(die_peak[idx]), 2),
            "hbm_peak_c": round(float(hbm_peak[idx]), 2),
            "power_w": round(float(planned.total_w(self.level)), 1),
            "full_load_die_peak_c": round(float(die_peak[full]), 2),
            "full_load_hbm_peak_c": round(float(hbm_peak[full]), 2),
            "full_load_power_w": round(float(planned.total_w(1.0)), 1),
            "plan_levels": [float(u1s[idx]), float(u2s[idx])],
            "power_offset_w": round(self.calibration.offset_w, 1),
            "power_gain": round(self.calibration.gain, 3),
        }
        return Verdict(self._limits(), reason, forecast)

    def _move(self, target: float, now_s: float, dt_s: float) -> None:
        """Cuts at once; releases at most `max_rise_per_s`, and only once they add up to
        `release_step` or reach full load (fewer, larger changes of limits)."""
        t = self.tuning
        if target < self.level:
            self.level = max(t.min_level, target)
            self._rise_from_s = None
            return
        if target == self.level:
            return
        if self._rise_from_s is None:
            self._rise_from_s = now_s - dt_s
        held = now_s - self._rise_from_s
        step = min(target, self.level + t.max_rise_per_s * held)
        if held >= t.release_hold_s and (step >= 1.0 or step - self.level >= t.release_step - 1e-9):
            self.level = min(1.0, _floor_to(step, t.level_step) if step < 1.0 else 1.0)
            self._rise_from_s = None

    def _limits(self):
        return limits_for(self.level, self.shaper.seats, self.shaper.chunk)


def _at_share(lp: LoadPower, f: float) -> LoadPower:
    """The load at level u when the engine, unpaced, would step only f of the time."""
    return LoadPower(lp.idle_w, lp.idle_w + f * (lp.busy_w - lp.idle_w), lp.hbm_idle_w,
                     lp.hbm_idle_w + f * (lp.hbm_busy_w - lp.hbm_idle_w), lp.die_c,
                     lp.die_step_w, lp.hbm_step_w)


def _floor_to(u: float, step: float) -> float:
    return round(step * np.floor(u / step + 1e-9), 4)


def _target(target_c: float | None, margin_c: float) -> float:
    return math.inf if target_c is None else target_c - margin_c


def _binding(u1s: np.ndarray, u2s: np.ndarray, idx: int, die_ok: np.ndarray,
             hbm_ok: np.ndarray, pow_ok: np.ndarray) -> str:
    """Which objective stops the next higher first move (or none)."""
    if u1s[idx] >= 1.0:
        return "no objective binds"
    higher = u1s == np.min(u1s[u1s > u1s[idx]])
    names = [n for n, m in (("die temperature", die_ok), ("HBM temperature", hbm_ok),
                            ("power budget", pow_ok)) if not (m & higher).any()]
    return f"{' and '.join(names) or 'forecast'} binds"
