"""Service-level objectives over finished requests: TTFT and TPOT.

Per metric, the requests finished within the last `slo_window_s` are kept; the signal is the
share of them that missed the objective (zero until at least `slo_min_violations` did). It
opens at `slo_violating_fraction` and closes once below `slo_ok_fraction` for
`slo_release_s`, so a slow stretch is one event, not one per slow request.
"""

from __future__ import annotations

from collections import deque

from ondo.events.config import DetectorConfig
from ondo.events.detectors.common import cleared, opened, request_ref
from ondo.events.hysteresis import CLEAR, CLOSED, OPENED, Hysteresis
from ondo.events.schema import EventDraft, EventKind
from ondo.telemetry.schema import RequestSample

MAX_EVIDENCE = 5


class SloMetric:
    def __init__(self, config: DetectorConfig, metric: str, slo_s: float) -> None:
        self.metric, self.slo_s, self.window_s = metric, slo_s, config.slo_window_s
        self.min_violations = config.slo_min_violations
        self.machine = Hysteresis(config.slo_violating_fraction, config.slo_ok_fraction, 0.0,
                                  config.slo_release_s)
        self.window: deque[tuple[float, float, str]] = deque()  # (finish, value, request id)
        self.violating = 0
        self.worst_fraction = 0.0

    def _prune(self, t_s: float) -> None:
        while self.window and self.window[0][0] <= t_s - self.window_s:
            _, value, _ = self.window.popleft()
            self.violating -= value > self.slo_s

    def _fraction(self) -> float:
        if self.violating < self.min_violations or not self.window:
            return 0.0
        return self.violating / len(self.window)

    def feed(self, t_s: float, t_wall_s: float, value: float | None,
             request_id: str) -> list[EventDraft]:
        self._prune(t_s)
        if value is not None:
            self.window.append((t_s, value, request_id))
            self.violating += value > self.slo_s
        return self._update(t_s, t_wall_s)

    def tick(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        if not self.window and self.machine.state == CLEAR:
            return []
        self._prune(t_s)
        return self._update(t_s, t_wall_s)

    def _update(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        fraction = self._fraction()
        transition = self.machine.update(t_s, fraction)
        if self.machine.active:
            self.worst_fraction = max(self.worst_fraction, fraction)
        subject = {"metric": self.metric}
        if transition is OPENED:
            slow = sorted((w for w in self.window if w[1] > self.slo_s), key=lambda w: -w[1])
            worst = slow[0]
            return [opened(EventKind.SLO_VIOLATION, t_s, t_wall_s, subject,
                           {"metric": self.metric, "slo_s": self.slo_s,
                            "window_s": self.window_s, "requests": len(self.window),
                            "violating": self.violating, "fraction": fraction,
                            "worst_s": worst[1], "worst_request_id": worst[2],
                            "since_s": self.machine.onset_s},
                           tuple(request_ref(w[2]) for w in slow[:MAX_EVIDENCE]))]
        if transition is CLOSED:
            worst, self.worst_fraction = self.worst_fraction, 0.0
            return [cleared(EventKind.SLO_VIOLATION, t_s, t_wall_s, subject,
                            self.machine.onset_s, self.machine.since_s,
                            {"worst_fraction": worst})]
        return []


class SloDetector:
    def __init__(self, config: DetectorConfig) -> None:
        self.ttft = SloMetric(config, "ttft", config.slo_ttft_s)
        self.tpot = SloMetric(config, "tpot", config.slo_tpot_s)

    def feed(self, r: RequestSample) -> list[EventDraft]:
        t = r.finish_monotonic_s
        return (self.ttft.feed(t, r.t_wall_s, r.ttft_s, r.request_id)
                + self.tpot.feed(t, r.t_wall_s, r.tpot_s, r.request_id))

    def tick(self, t_s: float, t_wall_s: float) -> list[EventDraft]:
        return self.ttft.tick(t_s, t_wall_s) + self.tpot.tick(t_s, t_wall_s)
