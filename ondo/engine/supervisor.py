"""Restarting a dead engine process (the server outlives its engine).

When the engine process dies (killed, out of host memory, a device that cannot go on),
`AsyncLLM` fails the requests that were in it and tells the supervisor, which, on a
thread of its own, waits out the backoff of its `RestartPolicy`, starts a fresh engine
process, waits until it is ready and hands it over (`adopt`); the server takes requests
again from then on. A fresh engine that fails to start is the next death in the row.
When the policy gives up, `give_up(reason)` is called: the server exits non-zero, so
that systemd or Kubernetes restarts the whole of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ondo.engine.engine_process import EngineInfo, EngineProcess, EngineStartError
from ondo.engine.restart_policy import RestartBudget, RestartPolicy

log = logging.getLogger(__name__)


class EngineSupervisor:
    def __init__(self, policy: RestartPolicy, start: Callable[[], EngineProcess],
                 adopt: Callable[[EngineProcess, EngineInfo], None],
                 give_up: Callable[[str], None]) -> None:
        self.policy = policy
        self._budget = RestartBudget(policy)
        self._start = start
        self._adopt = adopt
        self._give_up = give_up
        self._started_s = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._starting: EngineProcess | None = None
        self.num_restarts = 0  # engines started after one died, and ready

    def engine_died(self, reason: str) -> None:
        """Called once per death (on the dead engine's reader thread); returns at once."""
        with self._lock:
            if self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._restart, args=(reason,),
                                            name="ondo-engine-restart", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """No more restarts; an engine still starting is stopped."""
        with self._lock:
            self._stop.set()
            starting = self._starting
        if starting is not None:
            starting.close(timeout_s=timeout_s)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _restart(self, reason: str) -> None:
        uptime_s = time.monotonic() - self._started_s
        while not self._stop.is_set():
            decision = self._budget.on_death(uptime_s)
            if not decision.restart:
                why = (f"the engine died {decision.attempt} times in a row (--engine-restarts="
                       f"{self.policy.max_restarts}); the last time: {reason}")
                log.critical("giving up on the engine: %s", why)
                self._give_up(why)
                return
            log.error("the engine died (%s); starting a fresh one in %.1f s (restart %d of at "
                      "most %d in a row)", reason, decision.delay_s, decision.attempt,
                      self.policy.max_restarts)
            if self._stop.wait(decision.delay_s):
                return
            t0 = time.monotonic()
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    core = self._starting = self._start()
                info = core.wait_ready()
            except EngineStartError as e:
                reason, uptime_s = f"a fresh engine could not start: {e}", 0.0
                continue
            finally:
                with self._lock:
                    self._starting = None
            with self._lock:
                if self._stop.is_set():
                    core.close(timeout_s=10.0)
                    return
                self._started_s = time.monotonic()
                self.num_restarts += 1
            log.warning("a fresh engine is ready after %.1f s (restart %d in all); serving again",
                        time.monotonic() - t0, self.num_restarts)
            self._adopt(core, info)
            return
