"""In-process fan-out of telemetry samples to the store, the exporter, the twin, the governor
and the console. Publishing never blocks: callbacks must be quick, and subscriber queues are
bounded and drop their oldest sample (counted) when the reader falls behind."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Sample = Any  # GpuSample | EngineSample
Callback = Callable[[Sample], None]


class DropOldestQueue:
    """A bounded FIFO whose `put` never blocks: when full, the oldest item is dropped and counted."""

    def __init__(self, maxsize: int) -> None:
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize
        self._items: deque[Sample] = deque()
        self._cond = threading.Condition()
        self.dropped = 0
        self.added = 0  # items ever put, counted under the lock

    def put(self, item: Sample) -> None:
        with self._cond:
            self.added += 1
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Sample | None:
        """The oldest item, or None if none arrived within `timeout` seconds."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            return self._items.popleft()

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[Sample]:
        """Up to `max_items` oldest items; waits up to `timeout` for the first one."""
        with self._cond:
            if not self._items:
                self._cond.wait_for(lambda: bool(self._items), timeout)
            n = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def put_back(self, items: list[Sample]) -> int:
        """Return unconsumed `items` to the front; drops (and returns the count of) the oldest
        ones that no longer fit."""
        with self._cond:
            room = self.maxsize - len(self._items)
            keep = items[len(items) - room :] if room < len(items) else items
            lost = len(items) - len(keep)
            self.dropped += lost
            self._items.extendleft(reversed(keep))
            self._cond.notify()
            return lost

    def drain(self) -> list[Sample]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class Subscription:
    def __init__(self, hub: TelemetryHub, queue: DropOldestQueue | None, callback: Callback | None,
                 kinds: tuple[type, ...] | None) -> None:
        self._hub = hub
        self.queue = queue
        self.callback = callback
        self.kinds = kinds

    def wants(self, sample: Sample) -> bool:
        return self.kinds is None or isinstance(sample, self.kinds)

    def close(self) -> None:
        self._hub.unsubscribe(self)


class TelemetryHub:
    """Publish/subscribe for samples of every source."""

    def __init__(self) -> None:
        self._subs: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()
        self.published = 0
        self.callback_errors = 0

    def subscribe(
        self,
        callback: Callback | None = None,
        *,
        maxsize: int = 1024,
        kinds: tuple[type, ...] | None = None,
    ) -> Subscription:
        """With `callback`: called in the publisher's thread for each sample (it must not block).
        Without: the subscription's bounded `queue` receives them. `kinds` filters by type."""
        queue = None if callback is not None else DropOldestQueue(maxsize)
        sub = Subscription(self, queue, callback, kinds)
        with self._lock:
            self._subs = (*self._subs, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    @property
    def dropped(self) -> int:
        """Samples dropped from subscriber queues that fell behind."""
        return sum(s.queue.dropped for s in self._subs if s.queue is not None)

    def publish(self, sample: Sample) -> None:
        self.published += 1
        for sub in self._subs:  # a snapshot: tuples are replaced, never mutated
            if not sub.wants(sample):
                continue
            if sub.queue is not None:
                sub.queue.put(sample)
                continue
            try:
                sub.callback(sample)  # type: ignore[misc]
            except Exception:
                self.callback_errors += 1
                log.exception("telemetry subscriber %r failed; sample skipped for it", sub.callback)
