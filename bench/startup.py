"""Engine start-up time (load dummy weights, profile, compile, capture CUDA graphs, with
the warm-up and capture seconds of each kind of graph), in a fresh process, with its
phases: besides the engine's own (`phases_s`), the imports before it (`imports_s`: torch,
Triton and ondo) and the seconds torch.compile spent in all (`compile_s`, Dynamo and
Inductor, inside the profile and graph phases). Run twice: the first run on a new machine
compiles with cold caches; the second finds Inductor's and Triton's on-disk caches warm.

    python3 bench/startup.py --model-shape qwen3-0.6b
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time

T_START = time.perf_counter()


def compile_seconds() -> float:
    """Seconds torch.compile spent in this process (Dynamo's own account; 0 if none)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--profile", metavar="PSTATS",
                    help="cProfile the engine's start into this file (on Python 3.12 the calls of "
                         "its other threads show too) and print the functions with the most "
                         "cumulative time, and Dynamo's compile times")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="start on a copy of the shape without its tokenizer files (token ids "
                         "only): what loading the tokenizer beside the engine costs")
    args = ap.parse_args()
    import torch  # noqa: F401  (timed: the imports are a phase of a start)

    from ondo import LLM
    from ondo.bench.shapes import shape_folder

    imports_s = time.perf_counter() - T_START
    folder = shape_folder(args.model_shape)
    if args.no_tokenizer:
        bare = tempfile.mkdtemp(prefix="ondo-startup-")
        shutil.copy(os.path.join(folder, "config.json"), bare)
        folder = bare
    profiler = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    llm = LLM(folder, load_format="dummy", dtype="bfloat16",
              max_model_len=args.max_model_len, gpu_memory_utilization=0.9)
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(70)
        from torch._dynamo.utils import compile_times
        print(compile_times(repr="str"), file=sys.stderr)
    engine = llm.engine
    runner = engine.runner
    capture: dict[str, dict[str, float]] = {}
    for kind, _size, warm_up_s, capture_s in runner.graph_capture_times_s:
        c = capture.setdefault(kind, {"graphs": 0, "warm_up_s": 0.0, "capture_s": 0.0, "max_capture_s": 0.0})
        c["graphs"] += 1
        c["warm_up_s"] += warm_up_s
        c["capture_s"] += capture_s
        c["max_capture_s"] = max(c["max_capture_s"], capture_s)
    print(json.dumps({"model": args.model_shape, "tokenizer": not args.no_tokenizer,
                      "startup_s": engine.startup_s, "wall_s": wall,
                      "imports_s": imports_s, "compile_s": compile_seconds(),
                      "phases_s": engine.startup_phases_s, "cuda_graphs": len(runner.graphs),
                      "mixed_cuda_graphs": len(runner.mixed_graphs),
                      "graph_capture": {k: {n: round(v, 3) for n, v in c.items()} for k, c in capture.items()}}))


if __name__ == "__main__":
    main()
