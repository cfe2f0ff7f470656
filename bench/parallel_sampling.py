"""W5 (64 prompts, n = 8, input 512, output 256) on one engine, three ways, alternated over
rounds with fresh prompts each run: shared (n = 8, forked, prefix caching on) with steps
ahead (`LLMEngine.parallel_sampling_ahead`), shared with every step drained while a request
with n > 1 is unfinished (ONDO_PARALLEL_SAMPLING_AHEAD=0), and unshared (8 independent requests per prompt, caching off).
Output tok/s and steps scheduled ahead per run, and the shared / unshared ratios.

    python3 bench/parallel_sampling.py [--model-shape qwen3-0.6b] [--rounds 2] [--out FILE]
    python3 bench/parallel_sampling.py --smoke   # CPU, tiny model, small W5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ondo.bench.shapes import SHAPES, shape_folder
from ondo.bench.sharing import _timed_generate, unshared
from ondo.bench.sharing_workloads import w5_parallel_sampling

MODES = ("shared_ahead", "shared_drained", "unshared")


def run_mode(llm, mode: str, vocab: int, seed: int, num_prompts: int, output_tokens: int) -> dict:
    w5 = w5_parallel_sampling(vocab, seed, num_prompts=num_prompts, output_tokens=output_tokens)
    engine = llm.engine
    engine.block_manager.enable_prefix_caching = mode != "unshared"
    # Set only between runs: a request counts by it when added and when forgotten.
    engine.parallel_sampling_ahead = mode != "shared_drained"
    ahead_before, steps_before = engine.num_steps_ahead, engine.step_timing_s["steps"]
    result = _timed_generate(llm, unshared(w5) if mode == "unshared" else w5)
    engine.block_manager.enable_prefix_caching = True
    return {**result, "steps": int(engine.step_timing_s["steps"] - steps_before),
            "steps_ahead": engine.num_steps_ahead - ahead_before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 4 prompts x n=8, 16 tokens out")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    from ondo import LLM

    shape = "tiny-llama" if args.smoke else args.model_shape
    cuda = torch.cuda.is_available() and not args.smoke
    num_prompts, output_tokens = (4, 16) if args.smoke else (64, 256)
    llm = LLM(shape_folder(shape), load_format="dummy", dtype="bfloat16" if cuda else "float32",
              max_model_len=4096 if cuda else 1024, max_num_seqs=256 if cuda else 32,
              max_num_batched_tokens=8192 if cuda else 2048, seed=0, async_scheduling=True,
              **({"gpu_memory_utilization": 0.9} if cuda else {}))
    vocab = SHAPES[shape]["vocab_size"]
    run_mode(llm, "shared_ahead", vocab, 999, max(1, num_prompts // 8), output_tokens)  # warm-up
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for i, mode in enumerate(MODES):
            runs[mode].append(run_mode(llm, mode, vocab, 1 + 10 * r + i, num_prompts, output_tokens))
            row = runs[mode][-1]
            print(f"round {r} {mode:15s} {row['output_tokens_per_s']:9.0f} tok/s  {row['elapsed_s']:.2f} s  "
                  f"steps {row['steps']} (ahead {row['steps_ahead']})  peak blocks {row['peak_kv_blocks_used']}",
                  flush=True)
    tok_s = {m: statistics.median(x["output_tokens_per_s"] for x in runs[m]) for m in MODES}
    summary = {
        "benchmark": "parallel_sampling", "model": shape,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
        "median_output_tokens_per_s": tok_s,
        "shared_ahead_over_unshared": tok_s["shared_ahead"] / tok_s["unshared"],
        "shared_drained_over_unshared": tok_s["shared_drained"] / tok_s["unshared"],
        "kv_blocks_fraction_vs_unshared": (statistics.median(x["peak_kv_blocks_used"] for x in runs["shared_ahead"])
                                           / statistics.median(x["peak_kv_blocks_used"] for x in runs["unshared"])),
        "runs": runs,
    }
    print(f"shared ahead / unshared {summary['shared_ahead_over_unshared']:.3f}, "
          f"shared drained / unshared {summary['shared_drained_over_unshared']:.3f}, "
          f"block fraction {summary['kv_blocks_fraction_vs_unshared']:.2f}")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
