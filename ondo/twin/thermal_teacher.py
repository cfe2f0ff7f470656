"""Recursive prediction-error learning of the thermal constants (R, C, the HBM heat split):
they are taught by how well they forecast the last WINDOW_S seconds, not by single readings.

Every TEACH_PERIOD_S, while the power has moved enough to identify them, the network is run
open-loop over the last WINDOW_S (in BIN_S bins: the measured power and the memory activity
of each bin as input) from the state filter's estimate at the window's start, with the
present constants and with each nudged by a small step; the readings the filter accepted in
each bin against those runs give the residuals r and their Jacobian J. One Gauss-Newton step
in recursive (Kalman) form, with the constants' covariance P as the prior:

    P+ = (P^-1 + J'J / RESIDUAL_VAR_C2)^-1,   theta+ = theta + P+ J' r / RESIDUAL_VAR_C2

then the step is capped (MAX_STEP per constant), theta projected into its bounds and P's
variances capped at the prior's. RESIDUAL_VAR_C2 stands for the model error and for the
overlap of successive windows (each bin is seen WINDOW_S / TEACH_PERIOD_S times).

A window's open-loop error is the multi-step forecast error the twin exists to keep small,
and it is insensitive to what single readings get wrong in the first tenths of a second of a
load step (power ramps, the clock finding the cap, integer rounding), which a per-reading
filter would take as information about the slow constants.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ondo.twin.adapt_params import (
    DRIFT_VAR_PER_S,
    HI,
    I_HBM_IDLE,
    I_SHARE,
    LO,
    PRIOR_VAR,
    THERMAL,
)
from ondo.twin.fit import N_THERMAL, thermal_ab
from ondo.twin.params import TwinParams
from ondo.twin.state_filter import discretize

BIN_S = 0.1
WINDOW_S = 30.0
MIN_WINDOW_S = 4.0  # teaching starts once this much of a window is in
MAX_WINDOW_S = 60.0
TEACH_PERIOD_S = 1.0
RESIDUAL_VAR_C2 = 100.0
NUDGE = 1e-3  # finite-difference step, in theta's units (logs for R and C)
# Largest step one teaching may take: 0.2 in ln R, ln C (a factor 1.22), 20 W, 0.1.
NUISANCE = np.array([2, 3, N_THERMAL])  # sink, board, inlet: fitted per window, not kept
MAX_STEP = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 20.0, 0.1])
_LO, _HI = LO[THERMAL], HI[THERMAL]
_PRIOR_VAR = PRIOR_VAR[THERMAL]
_DRIFT_VAR_PER_S = DRIFT_VAR_PER_S[THERMAL]


@dataclass
class _Bin:
    start_s: float
    energy_j: float = 0.0  # integral of the measured power over the bin's covered part
    memory_s: float = 0.0  # integral of the memory activity
    covered_s: float = 0.0
    die_sum: float = 0.0
    die_n: int = 0
    hbm_sum: float = 0.0
    hbm_n: int = 0


class ThermalTeacher:
    def __init__(self, theta0: np.ndarray, var0: np.ndarray | None = None) -> None:
        """theta: the THERMAL entries of adapt_params' vector."""
        self.theta = np.clip(np.asarray(theta0, dtype=float), _LO, _HI)
        var = _PRIOR_VAR if var0 is None else np.minimum(var0, _PRIOR_VAR)
        self.p = np.diag(var)
        self.teachings = 0
        self._bins: deque[_Bin] = deque(maxlen=int(MAX_WINDOW_S / BIN_S) + 2)
        # (t, filter state, its variances) after each poll, by time
        self._starts: deque[tuple[float, np.ndarray, np.ndarray]] = deque()
        self._last_teach_s = -math.inf

    def record(self, t0_s: float, t1_s: float, power_w: float, memory_activity: float,
               die_c: float | None, hbm_c: float | None, x_after: np.ndarray,
               var_after: np.ndarray) -> None:
        """One poll: the power and memory activity held over (t0_s, t1_s], the readings the
        state filter accepted at t1_s (None: none), and its state (and the variances of it)
        after them."""
        t = t0_s
        while t < t1_s:
            b = self._bin_at(t)
            end = min(t1_s, b.start_s + BIN_S)
            b.energy_j += power_w * (end - t)
            b.memory_s += memory_activity * (end - t)
            b.covered_s += end - t
            t = end if end > t else t1_s
        b = self._bin_at(t1_s if t1_s > t0_s else t0_s)
        if die_c is not None:
            b.die_sum, b.die_n = b.die_sum + die_c, b.die_n + 1
        if hbm_c is not None:
            b.hbm_sum, b.hbm_n = b.hbm_sum + hbm_c, b.hbm_n + 1
        self._starts.append((t1_s, np.array(x_after), np.array(var_after)))
        horizon = t1_s - MAX_WINDOW_S - 2 * BIN_S
        while len(self._starts) > 1 and self._starts[1][0] <= horizon:
            self._starts.popleft()

    def _bin_at(self, t_s: float) -> _Bin:
        start = math.floor(t_s / BIN_S) * BIN_S
        if t_s == start and t_s > 0:
            start -= BIN_S  # (a, b]: a time on a boundary closes the bin before it
        if not self._bins or self._bins[-1].start_s < start - 1e-9:
            self._bins.append(_Bin(start))
        for b in reversed(self._bins):
            if abs(b.start_s - start) < 1e-9:
                return b
        return self._bins[-1]

    def drift(self, dt_s: float) -> None:
        self.p[np.diag_indices(len(self.theta))] += _DRIFT_VAR_PER_S * dt_s
        self._cap()

    def teach(self, t_s: float, params_of: Callable[[np.ndarray], TwinParams],
              memory_w: float) -> bool:
        """One teaching step if one is due and the window is full; True if theta moved.
        `params_of`: the twin's constants for a thermal theta; `memory_w`: the power map's."""
        if t_s - self._last_teach_s < TEACH_PERIOD_S:
            return False
        n_bins = int(round(WINDOW_S / BIN_S))
        if not self._starts:
            return False
        first_state_s = self._starts[0][0]
        bins = [b for b in list(self._bins)[-n_bins - 1:-1]
                if b.covered_s > 0.5 * BIN_S and b.start_s >= first_state_s - 1e-9]
        if len(bins) * BIN_S < MIN_WINDOW_S:
            return False
        found = self._state_at(bins[0].start_s)
        if found is None:
            return False
        start, start_var = found
        self._last_teach_s = t_s
        n = len(self.theta)
        sets = [self.theta] + [self.theta + NUDGE * e for e in np.eye(n)]
        starts = [start] * (n + 1)
        for i in NUISANCE:  # the window's starting sink, board and inlet
            x = start.copy()
            x[i] += NUDGE
            sets.append(self.theta)
            starts.append(x)
        pred = _simulate(sets, starts, params_of, memory_w, bins)  # (sets, bins, 2)
        die = np.array([b.die_sum / b.die_n if b.die_n else np.nan for b in bins])
        hbm = np.array([b.hbm_sum / b.hbm_n if b.hbm_n else np.nan for b in bins])
        meas = np.stack([die, hbm], axis=1)
        ok = np.isfinite(meas)
        if ok.sum() < len(bins):
            return False
        r = (meas - pred[0])[ok]
        jac = ((pred[1:] - pred[0]) / NUDGE)[:, ok].T  # (residuals, n_theta + nuisance)
        prior = np.zeros((n + len(NUISANCE), n + len(NUISANCE)))
        prior[:n, :n] = np.linalg.inv(self.p)
        prior[n:, n:] = np.diag(1.0 / np.maximum(start_var[NUISANCE], 1e-4))
        p_new = np.linalg.inv(prior + jac.T @ jac / RESIDUAL_VAR_C2)
        step = (p_new @ jac.T @ r / RESIDUAL_VAR_C2)[:n]
        step = np.clip(step, -MAX_STEP, MAX_STEP)
        self.theta = np.clip(self.theta + step, _LO, _HI)
        self.p = p_new[:n, :n]
        self._cap()
        self.teachings += 1
        return True

    def _state_at(self, t_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        best = None
        for t, x, var in self._starts:
            if t > t_s + 1e-9:
                break
            best = (x, var)
        return best

    def _cap(self) -> None:
        d = np.diag(self.p)
        scale = np.sqrt(np.minimum(1.0, _PRIOR_VAR / np.maximum(d, 1e-300)))
        self.p = 0.5 * (self.p + self.p.T) * np.outer(scale, scale)


def _simulate(sets: list[np.ndarray], starts: list[np.ndarray],
              params_of: Callable[[np.ndarray], TwinParams], memory_w: float,
              bins: list[_Bin]) -> np.ndarray:
    """Die and HBM sensor at each bin's end, open loop from each start, per theta set."""
    phis, gams = [], []
    for theta in sets:
        phi, gam = discretize(*thermal_ab(params_of(theta)), BIN_S)
        phis.append(phi)
        gams.append(gam)
    phi, gam = np.stack(phis), np.stack(gams)
    th = np.stack(sets)
    n = len(sets)
    x = np.stack([st[:N_THERMAL] for st in starts])
    inlet = np.array([st[N_THERMAL] for st in starts])
    out = np.empty((n, len(bins), 2))
    for k, b in enumerate(bins):
        power = b.energy_j / b.covered_s
        m = b.memory_s / b.covered_s
        hbm_w = th[:, I_HBM_IDLE] + th[:, I_SHARE] * memory_w * m
        u = np.stack([power - hbm_w, hbm_w, inlet], axis=1)
        x = np.einsum("jab,jb->ja", phi, x) + np.einsum("jab,jb->ja", gam, u)
        out[:, k] = x[:, 4:6]
    return out
