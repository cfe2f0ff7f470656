"""Host time of one eager forward pass (a prefill step): how long the host spends
launching it against how long the GPU runs it, with the fused kernels compiled
(ONDO_FUSE=1) or plain PyTorch (ONDO_FUSE=0), and where the host time goes (cProfile).

    ONDO_FUSE=1 python3 bench/host_overhead.py --tokens 8192
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

from ondo import LLM
from ondo.bench.shapes import shape_folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 1024])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--top", type=int, default=18, help="functions listed from each profile")
    args = ap.parse_args()
    llm = LLM(shape_folder(args.model_shape), load_format="dummy", dtype="bfloat16", max_model_len=2048,
              gpu_memory_utilization=0.5, enforce_eager=True)
    runner = llm.engine.runner
    result = {"fuse": os.environ.get("ONDO_FUSE", "1"), "model": args.model_shape}
    for n in args.tokens:
        batch = runner._dummy_batch(n)
        launch, total = [], []
        with torch.inference_mode():
            for _ in range(args.repeat + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                launch.append(t1 - t0)
                total.append(t2 - t0)
            prof = cProfile.Profile()
            prof.enable()
            runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
            prof.disable()
            torch.cuda.synchronize()
        result[f"tokens_{n}"] = {"host_launch_ms": 1e3 * min(launch[2:]), "wall_ms": 1e3 * min(total[2:])}
        for order in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(order).print_stats(args.top)
            print(f"--- {n} tokens, fuse={result['fuse']}, by {order}\n" + s.getvalue()[-6000:], flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
