"""The events-overhead benchmark (`ondo bench throughput --events-pairs N`) at a tiny scale on
the CPU: a real engine on a tiny checkpoint, the telemetry pipeline (the simulated GPU where
NVML is missing) with and without the detectors and the log. Figures are not asserted (that
is the benchmark's job on a GPU); the harness's bookkeeping is."""

from __future__ import annotations

import functools
import tempfile

import pytest

from ondo.bench.events_run import format_table, fresh_prompts, run_events_overhead
from ondo.bench.throughput import run_ondo
from ondo.bench.workloads import Request, Workload
from tests.tiny_checkpoints import tiny_hf_model


@functools.cache
def tiny_path() -> str:
    path = tempfile.mkdtemp(prefix="ondo_tiny_events_")
    tiny_hf_model("LlamaConfig", {}).save_pretrained(path)
    return path


BASE = Workload("W1", "tiny", [Request([7 * i + j + 10 for j in range(8)], 24) for i in range(4)])


def tiny_workload(run: int) -> Workload:
    return fresh_prompts(BASE, run, 128)


def test_events_overhead_harness_runs_pairs_and_verifies_each_log(tmp_path) -> None:
    from ondo import LLM

    llm = LLM(tiny_path(), block_size=4, max_model_len=64, num_kv_blocks=64)
    result = run_events_overhead(llm, tiny_workload, None, 50.0, 2, str(tmp_path), run_ondo)
    assert [(r["pair"], r["events"]) for r in result["runs"]] == [
        (0, False), (0, True), (1, False), (1, True)]
    for r in result["runs"]:
        assert r["engine_steps"] >= 24 and r["store_dropped"] == 0
    assert len({r["engine_steps"] for r in result["runs"]}) == 1  # the same work every run
    assert tiny_workload(1).requests[0].prompt_token_ids != BASE.requests[0].prompt_token_ids
    with_events = [r for r in result["runs"] if r["events"]]
    assert all(r["log_verifies"] and r["records_dropped"] == 0 for r in with_events)
    assert all(0.0 < r["detector_cpu_fraction"] < 1.0 for r in with_events)
    off = sorted(r["output_tokens_per_s"] for r in result["runs"] if not r["events"])
    assert result["telemetry_only_output_tokens_per_s"] == pytest.approx(sum(off) / 2)
    assert result["events_overhead_fraction"] == pytest.approx(
        1 - result["with_events_output_tokens_per_s"] / result["telemetry_only_output_tokens_per_s"])
    assert not list(tmp_path.glob("*.db"))  # the databases are removed
    assert "median:" in format_table(result)
