"""bench/decode_balance.py: W1's unequal contexts in one decode launch, in request order or
longest first, split or not, on the Triton interpreter (the timings mean nothing on a CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import decode_balance  # noqa: E402

from ondo.bench.workloads import make_workload  # noqa: E402


def test_the_contexts_are_w1s_at_the_first_step_with_that_many_requests_left():
    requests = make_workload("W1", 151936).requests
    assert decode_balance.w1_contexts(256, 151936) == [len(r.prompt_token_ids) + 1 for r in requests]
    # At most 6 requests are left from the step after the 7th longest output ends.
    first = sorted(r.max_tokens for r in requests)[-7] + 1
    tail = decode_balance.w1_contexts(6, 151936)
    assert tail == [len(r.prompt_token_ids) + first for r in requests if r.max_tokens >= first]
    assert 0 < len(tail) <= 6


def test_every_order_and_split_gives_the_reference_rows(tmp_path):
    out = tmp_path / "balance.json"
    rows = decode_balance.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    # Three orders x (the heuristic's split, 512 tokens).
    assert [(r["order"], r["heuristic"]) for r in rows] == [
        (order, heuristic) for order in ("request", "longest_first", "longest_first_heads_inner")
        for heuristic in (True, False)]
    for r in rows:
        assert r["max_abs_diff"] < 1e-5  # fp32: only the summation order differs
        assert r["context_min"] <= r["context_mean"] <= r["context_max"]
    split = rows[1]
    assert split["split_tokens"] == 512 and split["grid_splits"] == 8  # 4,096 / 512
