"""bench/decode_graph_splits.py: a decode graph's split fixed at capture against the split
set at each replay, on the Triton interpreter (the timings mean nothing on a CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import decode_graph_splits  # noqa: E402


def test_the_replay_split_fills_the_splits_the_capture_left_idle(tmp_path):
    out = tmp_path / "splits.json"
    rows = decode_graph_splits.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    (r,) = rows
    # 12 rows of 600 tokens replay the graph of 16 rows, captured for 2,048 tokens (4 kv
    # heads, 132 SMs, 32-token tiles on the interpreter): 5 splits of 416 tokens, 2 of them
    # with work; the replay's own split is 224 tokens: 3 splits with work.
    assert (r["graph_rows"], r["grid_splits"]) == (16, 5)
    assert (r["captured_live_splits"], r["replay_live_splits"]) == (2, 3)
    assert r["max_abs_diff"] < 1e-5  # fp32: only the summation order differs
    assert r["captured_us"] > 0 and r["replay_us"] > 0


def test_a_step_replays_the_smallest_graph_that_holds_it():
    assert [decode_graph_splits.graph_rows(n) for n in (1, 2, 3, 7, 8, 9, 40, 256)] == [2, 2, 4, 8, 8, 16, 48, 256]
