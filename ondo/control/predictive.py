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
   the measured busy share) times the pacing ratio rho (the busy share a paced engine
   achieves over the share commanded, averaged over `pacing_tau_s`); offset b and gain g
   estimated online from NVML's 1 s average against the engine's busy share over the same
   window (`thermal_model.PowerCalibration`). Both are learnt only from fresh inputs: the
   GPU's newest reading and the engine's newest step no older than `fresh_s` (past the gap
   a paced engine leaves). A starved server process delivers step samples late and in
   bunches; until the bunch is in, the busy share looks low while the power does not, and
   learning from that drove the gain to its floor and the level into a limit cycle.
3. Power budget (`power_budget.py`): the held level P(u_hold) = B - margin (filtered over
   NVML's window, moved at most once a second and only out of a band; the margin widened by
   a quantile tracker on the readings over B) and the window bound, a brake on the next
   move from the energy already in NVML's window; the first move is bounded by both.
4. Temperatures: plans (u1 for `first_s`, then u2 to `horizon_s`) over a grid of levels,
   all forecast at once from the twin's estimated state (die, HBM, heatsink, board,
   sensors, inlet) with the twin's thermal network (`thermal_model.py`), the busy steps'
   ripple added; a plan is feasible if no forecast reading exceeds its target (less
   `temp_margin_c`) and both moves keep the power bounds.
5. The feasible plan with the largest u1 (then u2) wins and u1 is applied; next period the
   problem is solved again from the new estimate (receding horizon). Cuts apply at once;
   releases wait `release_hold_s`, rise at most `max_rise_per_s` and by `release_step`.
   The full-load plan is forecast first: where it holds, the grid is not solved.

Why it is stable (docs/governor.md has the time constants): the forecast starts from the
estimator's state, not from the lagging readings, so the heat stored in heatsink and board
(the 16 s mode) is in it; every accepted plan holds the targets over a horizon twice the
slow mode with a level it can keep, so the next solve starts where a feasible plan exists
(recursive feasibility): no overshoot to correct, no limit cycle; under a budget the held
level moves at most once per NVML window, the brake acts only on excursions past the
operating point, and the adaptive margin is slower than both; the calibration's offset is
integral action, slow next to the period, learnt from aligned, fresh inputs only, and its
gain and the pacing ratio keep the loop gain the one the law assumes; releases never
follow stale inputs. It shapes what the engine asks of the GPU and leaves the last
milliseconds to the GPU's own controllers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

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
from ondo.control.power_budget import BudgetBounds, BudgetTuning
from ondo.control.thermal_model import (
    LoadPower,
    PowerCalibration,
    forecast_plans,
    full_load_peaks,
    load_power,
)
from ondo.engine.scheduler_limits import DEFAULT_SLICE_S
from ondo.twin.params import TwinParams


@dataclass(frozen=True)
class PredictiveTuning:
    period_s: float = 0.2
    first_s: float = 1.0  # the first move of a plan
    horizon_s: float = 30.0
    dt_s: float = 0.5
    budget: BudgetTuning = BudgetTuning()  # the held level, the window bound, the margins
    calibration_start_s: float = 0.5  # the calibration waits for the engine load's averages
    offset_walk_w: float = 10.0  # the calibration's offset: a random walk of this per sqrt(s)
    fresh_s: float = 0.2  # inputs older than this (past the pacing gap) are stale
    pacing_tau_s: float = 3.0  # the pacing ratio's averaging time
    temp_margin_c: float = 0.0
    max_rise_per_s: float = 0.5
    level_step: float = 0.025  # the grid of levels the plans are made of
    release_step: float = 0.05  # smallest release applied (cuts apply whatever their size)
    release_hold_s: float = 0.6  # a release waits until a higher level held this long
    prefill_lookahead_s: float = 1.0
    kv_full: float = 0.9  # KV cache use above which waiting prompts wait for blocks
    min_level: float = MIN_LEVEL
    # Nothing can bind: the full-load plan at the GPU's own power limit holds every target by
    # this much, and no budget under that limit nor TPOT SLO is set. The policy then ticks
    # at `unbound_period_s` and plans nothing but that bound.
    unbound_margin_c: float = 1.0
    unbound_period_s: float = 1.0


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
        self.calibration = PowerCalibration(offset_walk_w=self.tuning.offset_walk_w)
        self.shaper = TpotShaper(config)
        self._last_s: float | None = None
        self._rise_from_s: float | None = None
        self.budget = BudgetBounds(self.tuning.budget)
        self._started_s = 0.0
        self.pacing_ratio = 1.0  # busy share the engine achieves / the share commanded
        self._unbound: tuple[float, Objectives, dict] | None = None  # (until, for, forecast)
        self._shares: deque[tuple[float, float]] = deque()  # (since, u f) as commanded

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
    def _window_share(self, end_s: float, window_s: float = 1.0) -> float:
        """u f, the share of the plant's busy load the law commanded, averaged over the power
        window ending at end_s (the reading's): set against the engine's measured share over
        the same window, it gives the pacing ratio (whatever separates the commanded level
        from what the engine steps: pacing gaps, a command's latency)."""
        start = end_s - window_s
        while len(self._shares) > 1 and self._shares[1][0] <= start:
            self._shares.popleft()
        if not self._shares:
            return 1.0
        total, t_prev, share_prev = 0.0, start, self._shares[0][1]
        for since, share in self._shares:
            if since >= end_s:
                break
            if since > start:
                total += (since - t_prev) * share_prev
                t_prev = since
            share_prev = share
        total += max(0.0, end_s - t_prev) * share_prev
        return total / window_s

    def _fresh(self, inputs: GovernorInputs) -> bool:
        """Both streams recent: the GPU's newest reading and the engine's newest step (past
        the gap a paced engine leaves between slices). A starved server process delivers
        them late and in bunches; until the bunch is in, the last second's busy share and
        the power reading describe different seconds."""
        t = self.tuning
        gpu_age = inputs.gpu_sample_age_s
        if gpu_age is not None and gpu_age > t.fresh_s:
            return False
        e = inputs.engine
        age = inputs.engine_sample_age_s
        if age is None or (e.num_running == 0 and e.num_waiting == 0):
            return True  # an idle engine sends nothing: nothing is late
        gap = DEFAULT_SLICE_S * (1.0 - self.level) / max(self.level, MIN_LEVEL)
        return bool(age <= t.fresh_s + gap)  # plain bool: the decision record is JSON

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
        unbound = self._nothing_can_bind(inputs, objectives)
        self.period_s = t.period_s if unbound is None else t.unbound_period_s
        if unbound is not None:
            return Verdict(self._limits(), "no objective binds at the GPU's power limit",
                           unbound)
        p = self.params
        sm = inputs.sm_mhz or p.sm_max_mhz
        e = inputs.engine
        kinds = ((e.prefill_compute_activity, e.prefill_memory_activity),
                 (e.decode_compute_activity, e.decode_memory_activity))
        raw = load_power(p, e.compute_activity, e.memory_activity, sm, twin.die_c, kinds)
        (pc, pm), f = self._planned_load(inputs, config)
        if not self._shares:  # the second before this policy: what the engine measured
            self._shares.append((now - 1.0, e.busy_fraction_1s))
            self._started_s = now
        window_end = inputs.power_window_end_s if inputs.power_window_end_s is not None else now
        commanded = self._window_share(window_end)
        measured = (inputs.busy_share_power_window if inputs.busy_share_power_window is not None
                    else e.busy_fraction_1s)
        fresh = self._fresh(inputs)
        if fresh and dt > 0 and now - self._started_s >= t.calibration_start_s:
            self.calibration.update(inputs.power_w, raw.idle_w,
                                    measured * (raw.busy_w - raw.idle_w), dt)
            if commanded < 0.999:  # paced: how much of the commanded share the engine steps
                w = 1.0 - math.exp(-dt / t.pacing_tau_s)
                ratio = min(1.2, max(0.5, measured / max(commanded, 1e-3)))
                self.pacing_ratio += w * (ratio - self.pacing_ratio)
        f *= self.pacing_ratio
        recent = self.calibration.apply(raw)
        planned = self.calibration.apply(load_power(p, pc, pm, sm, twin.die_c, kinds))
        if planned.busy_w < recent.busy_w:
            planned = recent
        planned, sustained = _at_share(planned, f), _at_share(recent, f)
        u_pow_first, u_pow_hold = 1.0, 1.0
        if objectives.power_budget_w is None:
            self.budget.reset()
        else:
            self.budget.track_readings(inputs.power_w, objectives.power_budget_w, dt, fresh)
            u_pow_first, u_pow_hold = self.budget.levels(inputs, objectives.power_budget_w,
                                                         planned, sustained, self.level, dt)
        z0 = np.array([twin.die_c, twin.hbm_c, twin.sink_c, twin.board_c, twin.die_sensor_c,
                       twin.hbm_sensor_c])

        def plans(u1s: np.ndarray, u2s: np.ndarray):
            temps = forecast_plans(p, z0, twin.ambient_c, planned, u1s, u2s, t.first_s,
                                   t.horizon_s, t.dt_s)
            die_peak, hbm_peak = temps[0].max(axis=0), temps[1].max(axis=0)
            return (u1s, u2s, die_peak, hbm_peak,
                    die_peak <= _target(objectives.temp_target_c, t.temp_margin_c),
                    hbm_peak <= _target(objectives.hbm_temp_target_c, t.temp_margin_c),
                    (u1s <= u_pow_first + 1e-9) & (u2s <= u_pow_hold + 1e-9))

        # Full load first: where it holds every objective the grid would choose it too, and
        # one plan costs a fraction of the grid's CPU time (the server's event loop shares it).
        u1s, u2s, die_peak, hbm_peak, die_ok, hbm_ok, pow_ok = plans(np.ones(1), np.ones(1))
        if not (die_ok & hbm_ok & pow_ok).all():
            # The first move on the fine grid, the level held after it on one twice as coarse.
            held = self.levels[::-2][::-1]
            u1s, u2s, die_peak, hbm_peak, die_ok, hbm_ok, pow_ok = plans(
                *self._power_rows(u_pow_first, u_pow_hold, held))
            best = (u1s == u1s[0]) & (u2s == u2s[0])
            if not (die_ok & hbm_ok & pow_ok)[best].any():  # a temperature binds: the grid
                g1, g2 = np.meshgrid(self.levels, held, indexing="ij")
                u1s, u2s, die_peak, hbm_peak, die_ok, hbm_ok, pow_ok = plans(g1.ravel(),
                                                                             g2.ravel())
        ok = die_ok & hbm_ok & pow_ok
        if ok.any():
            idx = int(np.flatnonzero(ok)[np.lexsort((u2s[ok], u1s[ok]))[-1]])
            reason = _binding(u1s, u2s, idx, die_ok, hbm_ok, pow_ok)
        else:  # nothing holds: the least load, and say which objective is out of reach
            idx = int(np.argmin(u1s + u2s))
            missed = [n for n, m in (("die temperature", die_ok), ("HBM temperature", hbm_ok),
                                     ("power budget", pow_ok)) if not m[idx]]
            reason = f"{' and '.join(missed)} out of reach at the lowest level"
        self._move(float(u1s[idx]), now, dt, fresh)
        self._shares.append((now, self.level * f / self.pacing_ratio))
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
            "pacing_ratio": round(self.pacing_ratio, 3),
            "extra_margin_w": round(self.budget.extra_margin_w, 1),
            "budget_levels": [round(u_pow_first, 3), round(u_pow_hold, 3)],
            "fresh": fresh,
        }
        return Verdict(self._limits(), reason, forecast)

    def _nothing_can_bind(self, inputs: GovernorInputs,
                          objectives: Objectives) -> dict | None:
        """The cheap bound, first: the forecast of full load at the most any load can draw
        (the GPU's power limit), from the twin's state, rechecked every
        `unbound_period_s` and whenever the objectives change. Where it holds every
        temperature target with `unbound_margin_c` to spare, and no budget under the power
        limit nor a TPOT SLO is set, nothing the engine runs can bind over the horizon: the
        planning (load model, calibration, plans) is skipped. Its forecast, else None."""
        t, p = self.tuning, self.params
        budget = objectives.power_budget_w
        if (budget is not None and budget < p.power_limit_w) or objectives.tpot_slo_s \
                is not None or self.level < 1.0:
            self._unbound = None
            return None
        now = inputs.t_monotonic_s
        if self._unbound is not None and now < self._unbound[0] and \
                self._unbound[1] == objectives:
            return self._unbound[2]
        twin = inputs.twin
        assert twin is not None
        worst = load_power(p, 1.0, 1.0, p.sm_max_mhz, twin.die_c)
        if worst.busy_w > p.power_limit_w:  # the GPU's own cap holds it there
            worst = replace(worst, busy_w=p.power_limit_w)
        z0 = np.array([twin.die_c, twin.hbm_c, twin.sink_c, twin.board_c, twin.die_sensor_c,
                       twin.hbm_sensor_c])
        die_peak, hbm_peak = full_load_peaks(p, z0, twin.ambient_c, worst, t.horizon_s, t.dt_s)
        if (die_peak > _target(objectives.temp_target_c, t.unbound_margin_c)
                or hbm_peak > _target(objectives.hbm_temp_target_c, t.unbound_margin_c)):
            self._unbound = None
            return None
        forecast = {"horizon_s": t.horizon_s, "power_w": round(worst.busy_w, 1),
                    "full_load_die_peak_c": round(die_peak, 2),
                    "full_load_hbm_peak_c": round(hbm_peak, 2), "plan_levels": [1.0, 1.0]}
        self._unbound = (now + t.unbound_period_s - 1e-6, objectives, forecast)
        return forecast

    def _power_rows(self, u_first: float, u_hold: float,
                    held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The plans that decide where only the power binds: first the highest plan the
        power bounds allow (u1*, u2*), then every plan with u1* or the next level up, then
        full load. Where (u1*, u2*) holds the temperatures it is the grid's own choice (no
        feasible plan has a larger u1, none with u1* a larger u2) and the next row says what
        binds, so the grid is solved only when a temperature binds."""
        rows = self.levels[self.levels <= u_first + 1e-9][-1:]
        up = self.levels[self.levels > u_first + 1e-9][:1]
        top = held[held <= u_hold + 1e-9][-1:]
        if not len(rows) or not len(top):  # under the lowest level: the grid says so
            g1, g2 = np.meshgrid(self.levels, held, indexing="ij")
            return g1.ravel(), g2.ravel()
        g1, g2 = np.meshgrid(np.concatenate([rows, up]), held, indexing="ij")
        return (np.concatenate([rows, g1.ravel(), [1.0]]),
                np.concatenate([top, g2.ravel(), [1.0]]))

    def _move(self, target: float, now_s: float, dt_s: float, fresh: bool) -> None:
        """Cuts at once; releases at most `max_rise_per_s`, and only once they add up to
        `release_step` or reach full load (fewer, larger changes of limits), and never on
        stale inputs."""
        t = self.tuning
        if target < self.level:
            self.level = max(t.min_level, target)
            self._rise_from_s = None
            return
        if target == self.level or not fresh:
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
