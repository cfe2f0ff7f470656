"""The step timeline: its arithmetic on known steps, and its instrumentation on a real
engine (CPU), with a clock whose events take the host's time where CUDA's would take the
GPU's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ondo import LLM
from ondo.bench.device_limits import DeviceLimits
from ondo.bench.shapes import shape_folder
from ondo.bench.step_timeline import (
    HOST_PHASES,
    StepRecord,
    StepTimeline,
    by_rows,
    execute_outliers,
    format_bands,
    summarize,
)
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


def _sized(i: int, t: float, rows: int, tokens: int, gpu_ms: float, execute_ms: float = 1.0) -> StepRecord:
    """A step of `rows` sequences: host work 3 ms (prepare 1, execute `execute_ms`, sample
    the rest), GPU busy `gpu_ms` (forward `gpu_ms` - 0.5, sampling 0.5)."""
    ms = 1e-3
    e = execute_ms * ms
    host = {"prepare": (t, t + ms), "execute": (t + ms, t + ms + e), "wait": (t + 2 * ms, t + 2 * ms),
            "sample": (t + ms + e, t + 3 * ms)}
    fwd = (gpu_ms - 0.5) * ms
    gpu = {"A": t, "B": t + fwd, "C": t + fwd, "D": t + fwd + 0.5 * ms}
    return StepRecord(i, host, gpu, rows=rows, tokens=tokens)


def test_a_run_split_by_batch_size():
    # Two prefill steps of 10 ms, three decode steps at 200 rows every 6 ms (GPU-bound: the
    # GPU is busy 6 ms of each), four at 20 rows every 3 ms (host-bound: GPU busy 1.5 ms),
    # and a last step, which has no period.
    plan = [(4, 4096, 10.0, 10.0)] * 2 + [(200, 200, 6.0, 6.0)] * 3 + [(20, 20, 1.5, 3.0)] * 4 \
        + [(20, 20, 1.5, 3.0)]
    steps, t = [], 0.0
    for i, (rows, tokens, gpu, period) in enumerate(plan):
        steps.append(_sized(i, t, rows, tokens, gpu))
        t += period * 1e-3
    bands = {b["band"]: b for b in by_rows(steps)}
    assert list(bands) == ["with prefill", "decode 17-32 rows", "decode 193-256 rows"]
    total = 2 * 10 + 3 * 6 + 4 * 3
    pre, small, big = bands["with prefill"], bands["decode 17-32 rows"], bands["decode 193-256 rows"]
    assert (pre["steps"], small["steps"], big["steps"]) == (2, 4, 3)
    assert pre["share_of_time"] == pytest.approx(20 / total)
    assert small["share_of_time"] == pytest.approx(12 / total)
    assert big["period_ms"] == pytest.approx(6.0) and small["period_ms"] == pytest.approx(3.0)
    assert big["host_busy_ms"] == pytest.approx(3.0)
    assert big["gpu_busy_fraction"] == pytest.approx(1.0)
    assert small["gpu_busy_fraction"] == pytest.approx(0.5) and small["gpu_busy_ms"] == pytest.approx(1.5)
    assert small["mean_rows"] == 20
    assert "bound_ms" not in big  # no device limits given


def test_each_band_is_held_against_its_roofline():
    # Copy 1 GB/s, 1 GFLOP/s: a step's bound is its bytes in GB or its FLOPs in GFLOP, in s.
    limits = DeviceLimits("test", copy_bytes_per_s=1e9, matmul_flops_per_s=1e9)
    steps, t = [], 0.0
    for i, (rows, tokens, period, flops, nbytes) in enumerate(
            [(4, 4096, 10.0, 8e6, 1e6)]  # prefill: FLOP-bound, 8 ms of a 10 ms period
            + [(200, 200, 6.0, 1e6, 3e6)] * 2 + [(200, 200, 6.0, 1e6, 4.5e6)]  # decode: byte-bound
            + [(200, 200, 6.0, 0.0, 0.0)]):  # the last step: no period, left out
        s = _sized(i, t, rows, tokens, 1.0)
        s.flops, s.bytes_moved = flops, nbytes
        steps.append(s)
        t += period * 1e-3
    bands = {b["band"]: b for b in by_rows(steps, limits=limits)}
    pre, big = bands["with prefill"], bands["decode 193-256 rows"]
    assert pre["bound_ms"] == pytest.approx(8.0) and pre["fraction_of_roofline"] == pytest.approx(0.8)
    assert pre["ms_over_bound"] == pytest.approx(2.0)
    assert big["bound_ms"] == pytest.approx((3 + 3 + 4.5) / 3)
    assert big["fraction_of_roofline"] == pytest.approx(10.5 / 18)
    assert big["ms_over_bound"] == pytest.approx(18 - 10.5)
    assert "of bound" in format_bands(list(bands.values()))


def test_the_slow_launches_are_found_and_told_apart_by_a_change_in_rows():
    rows = [256, 256, 255, 255, 255, 254, 254, 253, 253, 253]
    execute = [1.0, 1.0, 4.0, 1.0, 1.0, 5.0, 1.1, 1.0, 0.9, 3.5]
    steps = [_sized(0, 0.0, 4, 4096, 10.0, execute_ms=50.0)]  # a prefill: not a decode launch
    steps += [_sized(i + 1, 0.01 * (i + 1), r, r, 5.0, execute_ms=e)
              for i, (r, e) in enumerate(zip(rows, execute))]
    o = execute_outliers(steps)
    assert o["steps"] == 10 and o["median_ms"] == pytest.approx(1.0)
    assert o["count"] == 3 and o["mean_ms"] == pytest.approx((4.0 + 5.0 + 3.5) / 3)
    assert o["with_rows_changed"] == 2 and o["steps_with_rows_changed"] == 3
    assert o["share_of_execute_time"] == pytest.approx(12.5 / sum(execute))
    assert [e["step"] for e in o["examples"]] == [3, 6, 10]
    assert o["examples"][0]["previous_rows"] == 256


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
        # The step's cost from its own rows: the weights once, the linear layers and the LM
        # head over its tokens, and attention over contexts of 21 to 25 + 24 tokens.
        shape = engine.runner.cost_shape
        dense = 2.0 * shape.linear_params * s.tokens + 2.0 * shape.head_params * s.rows
        per_pair = 4.0 * shape.num_attention_heads * shape.head_dim * shape.num_layers
        assert dense + per_pair * s.tokens * 20 < s.flops < dense + per_pair * s.tokens * 50
        weights = (shape.linear_params + shape.head_params) * shape.dtype_bytes
        kv = shape.kv_bytes_per_token
        assert weights + kv * s.rows * 20 < s.bytes_moved < weights + kv * s.rows * 50 + 1e6
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


def test_the_benchmark_records_a_whole_run(tmp_path, capsys):
    from bench.step_timeline import main

    out = tmp_path / "whole.json"
    assert main(["--smoke", "--whole", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["whole_run"] and r["unfinished_after"] == 0
    bands = r["by_rows"]
    assert bands[0]["band"] == "with prefill" and bands[0]["steps"] >= 1
    # Every step but the last has a period; the bands hold them all.
    assert sum(b["steps"] for b in bands) == r["steps"] - 1
    assert sum(b["share_of_time"] for b in bands) == pytest.approx(1.0)
    o = r["execute_outliers"]
    assert o["steps"] == sum(b["steps"] for b in bands if b["band"] != "with prefill") + 1
    printed = capsys.readouterr().out
    assert "with prefill" in printed and "execute: median" in printed
