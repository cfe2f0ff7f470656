"""bench/schedule_cost.py: both paths time steps where every running sequence decodes."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import schedule_cost  # noqa: E402


def test_both_paths_time_full_decode_steps():
    for fast_path in (True, False):
        ms = schedule_cost.median_schedule_ms(rows=16, steps=40, fast_path=fast_path, prompt_len=20)
        assert 0 < ms < 1000


def test_the_general_path_only_manager_never_takes_the_fast_path():
    bm = schedule_cost._GeneralPathOnly(num_gpu_blocks=4, num_cpu_blocks=0, block_size=4)
    seq = schedule_cost.Sequence(0, "r0", [1, 2, 3], schedule_cost.SamplingParams(max_tokens=2), 0.0)
    assert bm.allocate_slots(seq, 3)
    seq.num_computed_tokens = 3
    assert not bm.has_slot_for_next_token(seq)
    assert schedule_cost.BlockManager.has_slot_for_next_token(bm, seq)  # the real answer
