"""Engine start-up time (load dummy weights, profile, compile, capture CUDA graphs), in a
fresh process, with its phases. Run twice: the first run on a new machine compiles with
cold caches; the second finds Inductor's and Triton's on-disk caches warm.

    python3 bench/startup.py --model-shape qwen3-0.6b
"""

from __future__ import annotations

import argparse
import json
import time

from ondo import LLM
from ondo.bench.shapes import shape_folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(shape_folder(args.model_shape), load_format="dummy", dtype="bfloat16",
              max_model_len=args.max_model_len, gpu_memory_utilization=0.9)
    wall = time.perf_counter() - t0
    engine = llm.engine
    print(json.dumps({"model": args.model_shape, "startup_s": engine.startup_s, "wall_s": wall,
                      "phases_s": engine.startup_phases_s, "cuda_graphs": len(engine.runner.graphs)}))


if __name__ == "__main__":
    main()
