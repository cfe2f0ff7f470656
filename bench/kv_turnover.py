"""Offline throughput as the KV cache turns over: one `LLM`, consecutive fresh request sets.

The first sets land in never-used blocks, handed out in order; once the cached blocks of
finished requests fill the cache, every new block evicts the least recently freed one,
and a sequence's blocks end up scattered over the whole cache. Each set prints its
output tokens/s, the engine's step gaps by kind, and how scattered the block tables of
the set's last running step were (the share of neighbouring entries that are not
consecutive block ids).

    python3 bench/kv_turnover.py --sets 6 --num-prompts 400
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ondo.bench.serve import make_requests
from ondo.bench.shapes import SHAPES, shape_folder
from ondo.engine.gc_pauses import freeze_startup_heap
from ondo.engine.sampling_params import SamplingParams


def scatter(block_tables: list[list[int]]) -> float:
    pairs = [(a, b) for table in block_tables for a, b in zip(table, table[1:])]
    return sum(b != a + 1 for a, b in pairs) / max(len(pairs), 1)


def main() -> int:
    from ondo import LLM

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    args = ap.parse_args()
    vocab = SHAPES[args.model_shape]["vocab_size"]
    llm = LLM(shape_folder(args.model_shape), load_format="dummy", dtype="bfloat16",
              max_model_len=2048, max_num_seqs=256)
    engine = llm.engine
    bm = engine.block_manager
    seen: list[float] = []

    def record(_stats) -> None:
        running = engine.scheduler.running
        if len(running) >= 128 and not seen:
            seen.append(scatter([s.block_table for s in running]))

    engine.add_step_listener(record)
    freeze_startup_heap()
    for k in range(args.sets):
        requests = make_requests(None, "random", args.num_prompts, args.input_len, args.output_len,
                                 args.range_ratio, 100 + k, vocab)
        seen.clear()
        timing0 = dict(engine.step_timing_s)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": r.prompt} for r in requests],
                            [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                             for r in requests])
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        steps = engine.step_timing_s["steps"] - timing0["steps"]
        host = {k: round((v - timing0[k]) / steps * 1e3, 3) for k, v in engine.step_timing_s.items()
                if k != "steps"}
        print(json.dumps({"set": k, "output_tokens_per_s": round(tokens / elapsed), "steps": steps,
                          "host_ms_per_step": host, "cached_blocks": bm.num_cached_blocks,
                          "total_blocks": bm.num_total_blocks,
                          "block_table_scatter": round(seen[0], 3) if seen else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
