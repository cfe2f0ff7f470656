"""The scheduler's host time per step with every running sequence decoding, with and
without the decode fast path (`BlockManager.has_slot_for_next_token`): no model, no GPU.

    python3 bench/schedule_cost.py [--rows 256] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from ondo.engine.block_manager import BlockManager
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler import Scheduler
from ondo.engine.sequence import Sequence


class _GeneralPathOnly(BlockManager):
    """Every decode token through the general path's allocation checks."""

    def has_slot_for_next_token(self, seq: Sequence) -> bool:
        return False


def median_schedule_ms(rows: int, steps: int, fast_path: bool, prompt_len: int = 200) -> float:
    """Median `schedule()` time once every sequence has finished its prompt."""
    manager = BlockManager if fast_path else _GeneralPathOnly
    bm = manager(num_gpu_blocks=rows * (prompt_len + steps) // 16 + rows, num_cpu_blocks=0, block_size=16)
    sched = Scheduler(bm, max_num_seqs=rows, max_num_batched_tokens=max(8192, rows), preemption_mode="recompute")
    for i in range(rows):
        prompt = list(range(1000 * i + 1, 1000 * i + prompt_len + 1))
        sched.add(Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=steps + 1), float(i)))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        elapsed = time.perf_counter() - t0
        decoding = all(item.num_new_tokens == 1 for item in out.scheduled)
        for item in out.scheduled:  # what the engine does after the forward pass
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                item.seq.token_ids.append(7)
        if decoding and len(out.scheduled) == rows:
            times.append(elapsed)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    fast = median_schedule_ms(args.rows, args.steps, fast_path=True)
    general = median_schedule_ms(args.rows, args.steps, fast_path=False)
    print(f"{args.rows} decode rows: schedule() {fast:.3f} ms with the fast path, {general:.3f} ms without")
    print(json.dumps({"benchmark": "schedule_cost", "rows": args.rows, "fast_path_ms": fast,
                      "general_path_ms": general}))


if __name__ == "__main__":
    main()
