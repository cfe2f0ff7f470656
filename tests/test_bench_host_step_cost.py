"""bench/host_step_cost.py: the engine's own step timing over steps where every row decodes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import host_step_cost  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from ondo import LLM

    folder = host_step_cost.tiny_model(str(tmp_path_factory.mktemp("tiny")))
    return LLM(folder, device="cpu", dtype="float32", max_num_seqs=8, max_model_len=256,
               async_scheduling=True).engine


@pytest.mark.parametrize("sampled", [False, True])
def test_phases_are_per_step_and_the_requests_are_gone_after(engine, sampled):
    steps_before = engine.step_timing_s["steps"]
    ms = host_step_cost.host_ms_per_step(engine, rows=8, steps=12, sampled=sampled, prompt_len=20)
    assert set(host_step_cost.PHASES) <= set(ms)
    assert ms["host"] == pytest.approx(sum(ms[p] for p in host_step_cost.HOST_PHASES))
    assert all(ms[p] >= 0 for p in host_step_cost.PHASES)
    assert 0 < ms["host"] < ms["wall"]  # per step, and part of the step's wall time
    assert ms["launch"] > 0  # the forward pass ran in every timed step
    # Prompts, warm-up and the 12 timed steps were counted; nothing is left running.
    assert engine.step_timing_s["steps"] - steps_before >= 12 + 8 + 1
    assert not engine.has_unfinished_requests()
