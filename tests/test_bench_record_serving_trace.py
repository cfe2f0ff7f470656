"""The serving-trace recorder's schedule (bench/record_serving_trace.py), on a fake clock and a
fake engine: load phases stop on time, idle phases leave the engine alone."""

import argparse
from types import SimpleNamespace

import pytest

from bench.record_serving_trace import (
    DEFAULT_SCHEDULE,
    Phase,
    PhaseRecord,
    parse_schedule,
    phase_power,
    run_schedule,
)
from ondo.bench.workloads import Request, Workload

STEP_S = 0.02


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


class FakeEngine:
    """Each step takes STEP_S and finishes the oldest request after `steps_per_request` steps."""

    def __init__(self, clock: FakeClock, steps_per_request: int = 7) -> None:
        self.clock = clock
        self.steps_per_request = steps_per_request
        self.running: dict[str, int] = {}
        self.aborted: list[str] = []
        self.step_times_s: list[float] = []

    def add_request(self, request_id, prompt=None, params=None, prompt_token_ids=None,
                    arrival_time_s=None, stream=True):
        assert request_id not in self.running and not stream
        self.running[request_id] = 0

    def step(self):
        self.clock.now_s += STEP_S
        self.step_times_s.append(self.clock.now_s)
        outs = [_output(r, "abort") for r in self.aborted]
        self.aborted = []
        for rid in list(self.running):
            self.running[rid] += 1
            if self.running[rid] >= self.steps_per_request:
                del self.running[rid]
                outs.append(_output(rid, "length"))
        return outs

    def abort_request(self, request_id):
        del self.running[request_id]
        self.aborted.append(request_id)
        return True

    def unfinished_request_ids(self):
        return list(self.running)

    def has_unfinished_requests(self):
        return bool(self.running or self.aborted)


def _output(request_id: str, reason: str):
    return SimpleNamespace(request_id=request_id, finished=True,
                           outputs=[SimpleNamespace(finish_reason=reason)])


def _batch() -> Workload:
    return Workload("W1", "test", [Request([5, 6, 7], 4) for _ in range(8)])


def test_default_schedule_is_two_load_steps_in_130_s():
    phases = parse_schedule(DEFAULT_SCHEDULE)
    assert [p.kind for p in phases] == ["idle", "load", "idle", "load", "idle"]
    assert sum(p.duration_s for p in phases) == 130.0


@pytest.mark.parametrize("text", ["idle:10,busy:5", "load:0", "load", "idle:x"])
def test_a_malformed_schedule_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_schedule(text)


@pytest.fixture()
def ran():
    clock = FakeClock()
    engine = FakeEngine(clock)
    phases = [Phase("idle", 1.0), Phase("load", 3.0), Phase("idle", 2.0), Phase("load", 1.5)]
    records = run_schedule(phases, engine, _batch, clock=clock, sleep=clock.sleep)
    return clock, engine, records


def test_phases_end_at_the_schedule_times_from_its_start(ran):
    clock, _, records = ran
    start = 1000.0
    ends = [r.end_monotonic_s - start for r in records]
    # A load phase overruns by the steps that drain its aborted requests (two here).
    assert ends == pytest.approx([1.0, 4.0, 6.0, 7.5], abs=3 * STEP_S)
    assert records[2].end_monotonic_s - start == pytest.approx(6.0)  # idle catches up exactly


def test_load_phases_run_batches_back_to_back_and_abort_what_is_left(ran):
    _, engine, records = ran
    load = records[1]
    # 8 requests of 7 steps at 20 ms: a batch lasts 0.14 s; 3 s holds 21 and part of a 22nd.
    assert load.batches == 22
    assert load.finished_requests == 21 * 8
    assert load.aborted_requests == 8
    assert not engine.has_unfinished_requests()


def test_idle_phases_never_step_the_engine(ran):
    _, engine, records = ran
    for idle in (records[0], records[2]):
        assert idle.engine_steps == 0
        assert not any(idle.start_monotonic_s < t <= idle.end_monotonic_s
                       for t in engine.step_times_s)


def test_phase_power_is_the_mean_reading_and_the_energy_counter_slope():
    rec = PhaseRecord("load", start_monotonic_s=10.0, end_monotonic_s=12.0)
    rows = [{"t_monotonic_s": 9.9, "power_w": 100.0, "energy_j": 0.0}]
    rows += [{"t_monotonic_s": 10.0 + 0.5 * i, "power_w": 400.0 + 10 * i, "energy_j": 450.0 * i}
             for i in range(4)]  # 10.0 .. 11.5
    got = phase_power(rec, rows)
    assert got["mean_power_w"] == pytest.approx(415.0)
    assert got["energy_mean_power_w"] == pytest.approx(900.0)  # 1350 J over 1.5 s
    assert got["gpu_rows"] == 4
