"""The collector's pauses are counted, and a frozen start-up heap is not walked again."""

from __future__ import annotations

import gc

from ondo.engine.gc_pauses import GcPauses, freeze_startup_heap, thaw_heap


def test_pauses_are_counted_by_generation():
    pauses = GcPauses().start()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.stop()
    gc.collect()  # stopped: not counted
    summary = pauses.summary()
    assert summary["full_collections"] == 1 and summary["collections"] == 2
    assert 0 < summary["full_s"] <= summary["total_s"] and summary["max_s"] > 0


def test_frozen_startup_objects_leave_the_collectors_walk_until_thawed():
    startup = [[i] for i in range(20_000)]  # alive, tracked containers
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(startup)
        # The count is live: a frozen object another thread frees meanwhile leaves it.
        assert len(startup) <= gc.get_freeze_count() <= frozen
        walked = {id(o) for o in gc.get_objects()}
        assert id(startup[0]) not in walked and id(startup[-1]) not in walked
        later = [1, 2]
        assert id(later) in {id(o) for o in gc.get_objects()}
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    assert id(startup[0]) in {id(o) for o in gc.get_objects()}
