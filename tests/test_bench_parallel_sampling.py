"""bench/parallel_sampling.py on the CPU: the drained mode really drains, the others run
ahead, and sharing holds far fewer blocks than independent requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import parallel_sampling  # noqa: E402


def test_smoke_run_drains_only_in_the_drained_mode(tmp_path):
    out = tmp_path / "w5.json"
    assert parallel_sampling.main(["--smoke", "--rounds", "1", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    runs = {mode: rows[0] for mode, rows in summary["runs"].items()}
    assert runs["shared_drained"]["steps_ahead"] == 0
    for mode in ("shared_ahead", "unshared"):
        assert runs[mode]["steps_ahead"] >= runs[mode]["steps"] - 2
    # 4 prompts x n = 8, 16 tokens out: every run produces all of them.
    assert {r["output_tokens"] for r in runs.values()} == {4 * 8 * 16}
    assert summary["kv_blocks_fraction_vs_unshared"] < 0.55
