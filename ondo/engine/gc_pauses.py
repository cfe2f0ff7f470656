"""Python's cyclic garbage collector and the engine: its pauses, counted, and a smaller heap
for it to walk.

A full (generation 2) collection walks every tracked object in the process: after the
imports and the model build that is millions of them, and one pass stops the engine's
loop for tenths of a second in the middle of serving. `freeze_startup_heap` collects
once and moves everything alive after start-up out of the collector's sight
(`gc.freeze`), so later collections walk only what serving allocates. Only a process
that keeps its engine for its whole life calls it (the engine process, a benchmark).
"""

from __future__ import annotations

import gc
import time
from typing import Any


def freeze_startup_heap() -> int:
    """Collect, then exempt every surviving object from later collections; the count frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Undo `freeze_startup_heap` before the process ends, so that interpreter shutdown
    frees those objects as usual (native extensions report what stays unfreed)."""
    gc.unfreeze()


class GcPauses:
    """Counts and times the collector's passes while started (gc.callbacks)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = 0.0
        self._t0 = 0.0

    def start(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        pause = time.perf_counter() - self._t0
        generation = info["generation"]
        self.count[generation] += 1
        self.total_s[generation] += pause
        self.max_s = max(self.max_s, pause)

    def summary(self) -> dict[str, float]:
        return {"collections": sum(self.count), "full_collections": self.count[2],
                "total_s": round(sum(self.total_s), 4), "full_s": round(self.total_s[2], 4),
                "max_s": round(self.max_s, 4)}
