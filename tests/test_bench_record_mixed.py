"""The mixed-load trace recorder (bench/record_mixed_serving_trace.py) on a fake clock and a
fake engine: arrivals follow each phase's rate, bursts arrive at once, idle stretches step
nothing, and what is left at the end is aborted."""

import argparse
import random

import pytest

from bench.record_mixed_serving_trace import (
    DEFAULT_SCHEDULE,
    arrival_offsets,
    parse_mixed,
    run_mixed,
)
from ondo.bench.workloads import Request
from tests.test_bench_record_serving_trace import STEP_S, FakeClock, FakeEngine


def test_the_default_schedule_runs_eight_minutes_of_rates_bursts_and_idles():
    phases = parse_mixed(DEFAULT_SCHEDULE)
    assert sum(p.duration_s for p in phases) == 480.0
    assert {p.kind for p in phases} == {"idle", "rate", "ramp", "burst"}
    assert sum(p.duration_s for p in phases if p.kind == "idle") >= 120.0
    rates = [r for p in phases for r in (p.rate0_per_s, p.rate1_per_s) if p.kind != "idle"]
    assert max(rates) / min(r for r in rates if r > 0) >= 10


@pytest.mark.parametrize("text", ["idle:10,busy:5", "rate:10", "ramp:10@5", "burst:5@x",
                                  "rate:0@3", "rate:10@-1", "idle:10@3"])
def test_a_malformed_schedule_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_mixed(text)


def test_arrivals_follow_each_phase():
    phases = parse_mixed("idle:100,rate:200@5,ramp:200@0-10,burst:50@64")
    t = arrival_offsets(phases, random.Random(1))
    assert t == sorted(t)
    assert not [x for x in t if x < 100]
    steady = [x for x in t if 100 <= x < 300]
    assert len(steady) == pytest.approx(1000, rel=0.1)  # 5/s for 200 s
    ramp = [x for x in t if 300 <= x < 500]
    assert len(ramp) == pytest.approx(1000, rel=0.1)  # 0 -> 10/s: 5/s on average
    early, late = [x for x in ramp if x < 400], [x for x in ramp if x >= 400]
    assert len(late) > 2.5 * len(early)  # the rate rises
    assert t.count(500.0) == 64


def test_run_mixed_feeds_arrivals_open_loop_and_leaves_idle_alone():
    clock = FakeClock()
    engine = FakeEngine(clock, steps_per_request=5)
    phases = parse_mixed("idle:1,rate:2@20,idle:2,burst:1@12")
    arrivals = arrival_offsets(phases, random.Random(3))
    records = run_mixed(phases, engine, lambda: Request([5, 6, 7], 4), arrivals,
                        clock=clock, sleep=clock.sleep)
    assert [r.kind for r in records] == ["idle", "rate", "idle", "burst"]
    assert records[1].arrivals == len([a for a in arrivals if 1 <= a < 3])
    assert records[3].arrivals == 12
    start = 1000.0
    idle_steps = [t for t in engine.step_times_s if start + 3.2 < t <= start + 5.0]
    assert not idle_steps  # idle 3-5 s: the rate's requests drain by 3.2 s, then nothing ran
    assert sum(r.finished_requests for r in records) == len(arrivals)  # 5 steps each, all done
    assert not engine.has_unfinished_requests()
    assert records[-1].end_monotonic_s >= start + 6.0
    assert engine.step_times_s[-1] <= start + 6.0 + 6 * STEP_S
