"""The power budget's side of the predictive law: two bounds on the load level, both held on
NVML's 1 s average power, and a margin that adapts to what that average shows.

- **The held level** (the operating point): the level whose power is P(u) = B - m, B the
  budget, m = `margin_w` + the adaptive margin, at the recent load's mix, filtered over
  `hold_tau_s` (NVML's window: step to step the mix moves the level, the 1 s average
  integrates it), then held in a band: the level in force moves only when the filtered one
  is `cut_band` under it or `rise_band` over it, and at most once per `dwell_s`.
- **The window bound** (the brake). tau seconds ahead the 1 s average is
  (H(tau) + tau P(u)) / 1 s, H(tau) the energy already in the window (the energy counter's
  refreshes, then the level in force's power since the last one), so the next move keeps
  P(u) <= (B - m_w - H(tau)) / tau for tau in `window_taus`, at the planned load (the queue's
  prefill included): a cut within the period when the average is headed over the budget.
  Its margin m_w (`window_margin_w`, `burst_margin_w` while the queue plans more than the
  recent load: a forecast of a change is less sure than one of more of the same) is under
  the held level's, and it leaves the level alone for a cut under `window_band`: it acts on
  excursions, not on the operating point's noise.
- **The adaptive margin** a: a quantile tracker on the 1 s average. Each tick with a recent
  reading over B raises a at `over_rise_w_per_s`, each one under lowers it at
  `over_rise_w_per_s * q / (1 - q)`, a clipped to [0, `max_extra_margin_w`]: it settles
  where a share q (`over_share`) of the readings are over the budget, or at 0 where fewer
  are, whatever the model's error. It widens the held level's margin only, so where the
  readings go over, the operating point moves away from the brake as well.

Why this does not chatter (docs/governor.md): the held level changes at most once a second
and only by more than its band, so the 1 s average has seen one change before the next is
judged; the brake sits apart from the operating point by the difference of the margins and
its band; the adaptive margin moves by watts per second of readings, slower than both, so
the loops do not interact (separation of time scales), and it cannot wind up past its clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ondo.control.inputs import GovernorInputs
from ondo.control.thermal_model import LoadPower


@dataclass(frozen=True)
class BudgetTuning:
    margin_w: float = 15.0  # the level held aims this far under the budget
    window_margin_w: float = 10.0  # the window bound (the brake) this far
    burst_margin_w: float = 15.0  # and this far when the queue plans more than the recent load
    window_taus: tuple[float, ...] = (0.5,)
    # The brake leaves the level in force where it would cut it by less than this (half a
    # grid step: tau = 0.5 s of it moves the window's average by a quarter of the step's
    # power, ~3 W, less than the brake's own margin).
    window_band: float = 0.0125
    hold_tau_s: float = 1.0  # the held level's filter
    # The held level in force moves when the filtered one is this far under it, or this far
    # over it (a band: the power may sit up to cut_band of the level's span over the target,
    # so that band is the narrower), and at most once per dwell_s.
    cut_band: float = 0.01
    rise_band: float = 0.025
    dwell_s: float = 1.0
    over_share: float = 0.01  # the adaptive margin's target share of readings over the budget
    over_rise_w_per_s: float = 10.0
    max_extra_margin_w: float = 30.0
    min_level: float = 0.1


class BudgetBounds:
    """The window bound and the held level, per tick (see the module's docstring)."""

    def __init__(self, tuning: BudgetTuning | None = None) -> None:
        self.tuning = tuning or BudgetTuning()
        self.extra_margin_w = 0.0
        self._filtered: float | None = None
        self.held: float | None = None  # the held level in force
        self._held_since_s = -math.inf
        self._budget_w: float | None = None
        self._armed = False  # the average has been under the budget since it was set

    def reset(self) -> None:
        """No budget: nothing to hold (the adaptive margin stays: the GPU is the same)."""
        self._filtered = self.held = self._budget_w = None
        self._held_since_s = -math.inf
        self._armed = False

    def track_readings(self, power_w: float | None, budget_w: float, dt_s: float,
                       fresh: bool) -> None:
        """The adaptive margin, from the 1 s average at this tick (`fresh`: a recent reading;
        a stale one would count the same second again), once the average has first come
        under the budget (the way down from an unconstrained load, when a budget is set, is
        not the law's overshoot)."""
        if budget_w != self._budget_w:  # a new budget: the way down to it is no overshoot
            self._budget_w, self._armed = budget_w, False
        if power_w is None or not fresh or dt_s <= 0:
            return
        if not self._armed:
            self._armed = power_w <= budget_w
            return
        t = self.tuning
        rate = t.over_rise_w_per_s if power_w > budget_w else (
            -t.over_rise_w_per_s * t.over_share / (1.0 - t.over_share))
        self.extra_margin_w = min(t.max_extra_margin_w,
                                  max(0.0, self.extra_margin_w + rate * dt_s))

    def levels(self, inputs: GovernorInputs, budget_w: float, planned: LoadPower,
               sustained: LoadPower, level: float, dt_s: float) -> tuple[float, float]:
        """(highest level for the next move, highest level to hold) under the budget;
        `level`: the one in force."""
        t = self.tuning
        now = inputs.t_monotonic_s
        tail_w = float(sustained.total_w(level))
        # A forecast of a change (a burst in the queue) is less sure than one of more of the
        # same: the brake keeps a wider margin while the queue plans more than the recent load.
        burst = planned.busy_w > sustained.busy_w + 1.0
        margin_w = max(t.window_margin_w, t.burst_margin_w if burst else 0.0)
        window = math.inf
        for tau in t.window_taus:
            spent_j = window_energy_j(inputs, 1.0 - tau, tail_w)
            window = min(window, planned.level_for_power((budget_w - margin_w - spent_j) / tau))
        if window >= level - t.window_band:
            window = max(window, level)
        target_w = budget_w - t.margin_w - self.extra_margin_w
        raw = min(1.0, max(t.min_level, sustained.level_for_power(target_w)))
        if self._filtered is None:
            self._filtered = raw
        else:
            self._filtered += (1.0 - math.exp(-dt_s / t.hold_tau_s)) * (raw - self._filtered)
        f = self._filtered
        if self.held is None or (now - self._held_since_s >= t.dwell_s and (
                f < self.held - t.cut_band or f > self.held + t.rise_band)):
            self.held = self._filtered
            self._held_since_s = now
        return min(window, self.held), self.held


def window_energy_j(inputs: GovernorInputs, span_s: float, tail_w: float) -> float:
    """Energy of the last span_s seconds, from the energy counter's refreshes (linear in
    between); since the last refresh, `tail_w`: the power of the level in force. Not the
    latest fast reading: under a duty cycle it is a busy or an idle instant, 500 W apart,
    and the window bound would follow that noise; nor the 1 s average, a second late."""
    if span_s <= 0:
        return 0.0
    now = inputs.t_monotonic_s
    hist = inputs.energy_history
    if len(hist) < 2:
        return span_s * (inputs.power_w if inputs.power_w is not None else tail_w)
    t_last, e_last = hist[-1]
    since = max(0.0, now - t_last)
    if since >= span_s:
        return span_s * tail_w
    start = t_last - (span_s - since)
    ts = np.array([t for t, _ in hist])
    es = np.array([e for _, e in hist])
    if start < ts[0]:  # older than the history: NVML's own average stands in
        e_start = es[0] - (ts[0] - start) * (inputs.power_w if inputs.power_w is not None
                                             else tail_w)
    else:
        e_start = float(np.interp(start, ts, es))
    return (e_last - e_start) + since * tail_w
