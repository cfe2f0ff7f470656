"""A thread that calls `tick()` on a fixed period, for the NVML and simulated sources."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_HZ = 100.0
# Further behind than this, the schedule restarts from now instead of catching up in a burst.
MAX_LAG_S = 1.0


def period_from_hz(hz: float) -> float:
    if not 0 < hz <= MAX_HZ:
        raise ValueError(f"sampling rate must be in (0, {MAX_HZ}] Hz, got {hz}")
    return 1.0 / hz


class PollingThread:
    """Runs `tick` every `period_s` on a deadline schedule (no drift) until `stop()`."""

    def __init__(self, tick: Callable[[], None], period_s: float, name: str) -> None:
        self._tick = tick
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.ticks = 0
        self.missed_ticks = 0
        self.tick_errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # a source bug must not end the pipeline
                self.tick_errors += 1
                log.exception("telemetry tick failed")
            self.ticks += 1
            next_t += self.period_s
            lag_s = time.monotonic() - next_t
            if lag_s > MAX_LAG_S:
                skipped = int(lag_s / self.period_s)
                self.missed_ticks += skipped
                next_t += skipped * self.period_s
                log.warning("telemetry poller %.1f s behind; skipped %d ticks", lag_s, skipped)
            self._stop.wait(max(0.0, next_t - time.monotonic()))
