"""The load the GPU ran over a recent interval, from the engine's steps (or a trace's phase
segments), for the online twin: time-weighted means of the compute feature's load shape and
of the memory activity.

Steps are added in the order they end. With scheduling ahead a step's span overlaps the one
before it; only the time it adds counts, so the covered time is never counted twice. Time no
step covers is idle (zero load).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

KEEP_S = 30.0  # history kept behind the newest step


class LoadWindow:
    def __init__(self, shape: Callable[[float], float], keep_s: float = KEEP_S) -> None:
        """`shape`: the compute activity's load shape (adapt_params.compute_feature at full
        clock), applied step by step since it is not linear."""
        self.shape = shape
        self.keep_s = keep_s
        self._steps: deque[tuple[float, float, float, float]] = deque()  # start, end, c, m
        self.covered_until_s = -np.inf

    def add(self, start_s: float, end_s: float, compute_activity: float,
            memory_activity: float) -> None:
        start_s = max(start_s, self.covered_until_s)
        if not end_s > start_s:
            return
        c = self.shape(float(np.clip(compute_activity, 0.0, 1.0)))
        m = float(np.clip(memory_activity, 0.0, 1.0))
        self._steps.append((start_s, end_s, c, m))
        self.covered_until_s = end_s
        while self._steps and self._steps[0][1] < end_s - self.keep_s:
            self._steps.popleft()

    def mean(self, t0_s: float, t1_s: float) -> tuple[float, float]:
        """(mean compute shape, mean memory activity) over (t0_s, t1_s]."""
        c, m, _ = self._integrals(t0_s, t1_s)
        span = t1_s - t0_s
        return (c / span, m / span) if span > 0 else self.at(t1_s)

    def _integrals(self, t0_s: float, t1_s: float) -> tuple[float, float, float]:
        """Integrals over (t0_s, t1_s] of the compute shape, the memory activity and the
        time under load."""
        c = m = busy = 0.0
        for start, end, sc, sm in reversed(self._steps):
            if end <= t0_s:
                break
            overlap = min(end, t1_s) - max(start, t0_s)
            if overlap > 0:
                c += overlap * sc
                m += overlap * sm
                busy += overlap if (sc > 0 or sm > 0) else 0.0
        return c, m, busy

    def steady(self, t_s: float, window_s: float, settle_s: float, busy_tol: float,
               load_tol: float) -> bool:
        """Whether the last window_s ran the load of the last settle_s: the share of time
        under load within busy_tol, each activity within load_tol (no load step in
        progress; the mix of steps within a busy stretch may vary)."""
        c, m, busy = self._integrals(t_s - window_s, t_s)
        c_l, m_l, busy_l = self._integrals(t_s - settle_s, t_s)
        return (abs(busy / window_s - busy_l / settle_s) <= busy_tol
                and abs(c / window_s - c_l / settle_s) <= load_tol
                and abs(m / window_s - m_l / settle_s) <= load_tol)

    def at(self, t_s: float) -> tuple[float, float]:
        """The load of the step in progress at t_s (zero if none)."""
        for start, end, sc, sm in reversed(self._steps):
            if start <= t_s < end:
                return sc, sm
            if end <= t_s:
                break
        return 0.0, 0.0

    def busy(self, t0_s: float, t1_s: float) -> bool:
        """Whether any load ran in (t0_s, t1_s]."""
        for start, end, c, m in reversed(self._steps):
            if end <= t0_s:
                return False
            if start < t1_s and (c > 0 or m > 0):
                return True
        return False

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, compute shape, memory activity) of the steps kept, in time order."""
        if not self._steps:
            return (np.zeros(0),) * 4  # type: ignore[return-value]
        start, end, c, m = (np.array(col) for col in zip(*self._steps))
        return start, end, c, m


def load_at(steps: tuple[np.ndarray, ...], t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(compute shape, memory activity) of the step in progress at each t_s; zero between
    steps (`steps` as `LoadWindow.arrays` gives them)."""
    start, end, c, m = steps
    t = np.asarray(t_s, dtype=float)
    if len(start) == 0:
        return np.zeros_like(t), np.zeros_like(t)
    i = np.clip(np.searchsorted(start, t, side="right") - 1, 0, len(start) - 1)
    inside = (t >= start[i]) & (t < end[i])
    return np.where(inside, c[i], 0.0), np.where(inside, m[i], 0.0)
