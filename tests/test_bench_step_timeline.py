"""The step timeline: its arithmetic on known steps, and its instrumentation on a real
engine (CPU), with a clock whose events take the host's time where CUDA's would take the
GPU's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ondo import LLM
from ondo.bench.shapes import shape_folder
from ondo.bench.step_timeline import HOST_PHASES, StepRecord, StepTimeline, summarize
from ondo.engine.sampling_params import SamplingParams


def _step(i: int, t: float) -> StepRecord:
    """Host: schedule 1 ms, prepare 1, execute 1, wait 2, postprocess 1, sample 1 (7 ms
    period). GPU: forward 3 ms from 0.5 ms after the upload, sampling 1 ms starting 1 ms
    after the forward ends."""
    ms = 1e-3
    host = {"schedule": (t - ms, t), "prepare": (t, t + ms), "execute": (t + ms, t + 2 * ms),
            "wait": (t + 2 * ms, t + 4 * ms), "postprocess": (t + 4 * ms, t + 5 * ms),
            "sample": (t + 5 * ms, t + 6 * ms)}
    gpu = {"A": t + 0.5 * ms, "B": t + 3.5 * ms, "C": t + 4.5 * ms, "D": t + 5.5 * ms}
    return StepRecord(i, host, gpu)


def test_summary_of_known_steps():
    steps = [_step(i, 7e-3 * i) for i in range(5)]
    s = summarize(steps)
    assert s["steps"] == 5 and s["period_ms"] == pytest.approx(7.0)
    assert s["host_ms"] == pytest.approx({"schedule": 1, "prepare": 1, "execute": 1, "wait": 2,
                                          "postprocess": 1, "sample": 1})
    g = s["gpu_ms"]
    assert g["forward"] == pytest.approx(3.0) and g["sample"] == pytest.approx(1.0)
    # Idle from the previous D (5.5 ms into its step) to this A (0.5 ms into this one): 2 ms;
    # from B to C: 1 ms. Busy 4 of every 7 ms.
    assert g["idle_before_step"] == pytest.approx(2.0)
    assert g["idle_before_sample"] == pytest.approx(1.0)
    assert s["gpu_busy_fraction"] == pytest.approx(4 / 7)
    # Per step, the gap before the step (5.5 → 7.5 ms on the previous step's clock) lies in
    # the previous sample's last 0.5 ms, the schedule (1 ms) and the prepare's first 0.5 ms;
    # the gap before sampling (3.5 → 4.5 ms) in the wait's last 0.5 ms and the postprocess's
    # first 0.5 ms.
    by = s["gpu_idle_ms_by_host_phase"]
    assert by == pytest.approx({"sample": 0.5, "schedule": 1.0, "prepare": 0.5, "wait": 0.5,
                                "postprocess": 0.5})
    assert s["gpu_idle_ms_other_host_work"] == pytest.approx(0.0)


def test_a_timeline_needs_two_steps():
    with pytest.raises(ValueError, match="at least 2 steps"):
        summarize([_step(0, 0.0)])


class HostClock:
    """Events stamped with the host's clock when recorded (a GPU that is never behind)."""

    class Event:
        def __init__(self) -> None:
            self.t = None

        def record(self) -> None:
            self.t = time.perf_counter()

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: HostClock.Event) -> float:
            return 1e3 * (other.t - self.t)

    def new_event(self) -> HostClock.Event:
        return HostClock.Event()

    def synchronize(self) -> None:
        pass


@pytest.fixture(scope="module")
def llm():
    return LLM(shape_folder("tiny-llama"), load_format="dummy", dtype="float32",
               max_model_len=512, seed=0, device="cpu")


def _generate(llm, n_steps_recorded: int, clock=None) -> tuple[list[list[int]], StepTimeline]:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ids = [f"t{i}-{id(clock)}" for i in range(6)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, prompt_token_ids=[100 + 7 * i + k for k in range(20 + i)],
                           params=params, stream=False)
    for _ in range(3):
        engine.step()
    timeline = StepTimeline(engine, clock=clock)
    done: dict[str, list[int]] = {}
    with timeline.recording():
        for _ in range(n_steps_recorded):
            for out in engine.step():
                done[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out.outputs[0].token_ids
    return [done[rid] for rid in ids], timeline


def test_the_timeline_records_each_step_and_leaves_the_engine_as_it_was(llm):
    plain, _ = _generate(llm, 2)  # two steps recorded, no clock: host phases only
    engine = llm.engine
    tokens, timeline = _generate(llm, 10, clock=HostClock())
    assert tokens == plain  # greedy: the instrumented run draws the same tokens
    for name in ("_launch", "_sample", "_finish"):
        assert name not in vars(engine)
    for name in ("prepare", "upload", "execute"):
        assert name not in vars(engine.runner)
    assert "schedule" not in vars(engine.scheduler)
    steps = timeline.steps
    assert len(steps) == 10
    for s in steps:
        assert set(s.host) == set(HOST_PHASES), s.host.keys()
        h = s.host
        assert h["schedule"][1] <= h["prepare"][0] <= h["execute"][0] <= h["sample"][0]
        assert h["wait"][1] <= h["postprocess"][0]
        g = s.gpu
        assert h["prepare"][0] <= g["A"] <= g["B"] <= g["C"] <= g["D"] <= h["sample"][1] + 1e-3
    s = summarize(steps)
    assert 0 < s["gpu_ms"]["forward"] <= s["host_ms"]["prepare"] + s["host_ms"]["execute"] + 1
    # The engine is synchronous on the CPU: after a step's draws the host waits, post-
    # processes, schedules and prepares the next before the "GPU" gets to it.
    assert {"schedule", "prepare"} <= set(s["gpu_idle_ms_by_host_phase"])
    assert 0 < s["gpu_busy_fraction"] < 1


def test_the_benchmark_runs_on_the_cpu(tmp_path, capsys):
    import json
    import runpy
    import sys

    out = tmp_path / "timeline.json"
    argv = sys.argv
    sys.argv = ["step_timeline.py", "--smoke", "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(Path(__file__).parents[1] / "bench" / "step_timeline.py"),
                           run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    r = json.loads(out.read_text())
    assert r["steps"] == 8 and r["device"] == "cpu" and "gpu_ms" not in r
    assert set(r["host_ms"]) == set(HOST_PHASES) and r["period_ms"] > 0
    assert "step " in capsys.readouterr().out
