"""Host against GPU per step, in the steady state of a workload (W1 by default): the
host's phases and the GPU's forward and sampling on one clock, the GPU's idle time and
the host phases it waited on (`ondo/bench/step_timeline.py`); optionally a torch.profiler
trace of a few of the same steps for a kernel-level view.

    PYTHONPATH=. python3 bench/step_timeline.py --model-shape qwen3-0.6b --workload W1 \\
        --out $OUT/step_timeline.json [--profile-steps 6 --trace $OUT/w1_trace.json]
    PYTHONPATH=. python3 bench/step_timeline.py --smoke     # CPU, tiny model, host phases only

The steady window: after `--skip-steps` steps (the prefills of the first requests are
done by then), `--steps` steps are recorded while all requests still run. `--whole`
records the workload from its first step to its last instead, and splits it by batch
size (`by_rows`), after the same warm-up pass as `ondo bench throughput` (on a GPU; not
with `--no-warm-up`): which of host and GPU bounds the steps of each size, each size's
share of the run's time, and (on a GPU) how far each size's steps are from their roofline
bound and how much of the run's time each loses to it; with it, the launches that took
far longer than the median (`execute_outliers`).

    PYTHONPATH=. python3 bench/step_timeline.py --model-shape llama3.1-8b --workload W1 --whole
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ondo.bench.allocator_counts import allocator_counts, counts_between
from ondo.bench.device_limits import measure_device_limits
from ondo.bench.shapes import SHAPES, shape_folder
from ondo.bench.step_timeline import (
    StepTimeline,
    by_rows,
    execute_outliers,
    format_bands,
    format_steps,
    summarize,
)
from ondo.bench.workloads import make_workload, warm_up_workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--workload", default="W1", choices=("W1", "W2", "W3"))
    ap.add_argument("--skip-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="then this many steps under torch.profiler (0: none)")
    ap.add_argument("--trace", default=None, help="the profiler's Chrome trace here")
    ap.add_argument("--table-rows", type=int, default=25, help="rows of the profiler's table")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--whole", action="store_true",
                    help="record every step of the workload (no --skip-steps, --steps) and split "
                         "the run by batch size")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="with --whole on a GPU: record from the engine's very first step, without "
                         "the warm-up pass `ondo bench throughput` makes")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    for flag in ("skip_steps", "steps"):
        if getattr(args, flag) < (2 if flag == "steps" else 0):
            ap.error(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    from ondo import LLM

    scale = 1.0
    if args.smoke:
        args.model_shape, args.skip_steps, args.steps, scale = "tiny-llama", 3, 8, 1 / 32
        args.max_model_len = 2048
    folder = shape_folder(args.model_shape)
    cuda = torch.cuda.is_available() and not args.smoke
    # The roofline's copy and matmul rates, measured before the KV cache takes the memory.
    limits = measure_device_limits(torch.device("cuda")) if cuda and args.whole else None
    llm = LLM(folder, load_format="dummy", dtype="bfloat16" if cuda else "float32",
              max_model_len=args.max_model_len, seed=0, device="cuda" if cuda else "cpu")
    engine = llm.engine
    vocab = SHAPES[args.model_shape]["vocab_size"]
    if args.whole and cuda and not args.no_warm_up:
        # As `ondo bench throughput` does before its timed runs: the steps recorded then
        # carry no first-time cost (compiles, first replays, the allocators' first blocks).
        warm = warm_up_workload(vocab)
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm.requests], warm.params())
    workload = make_workload(args.workload, vocab, scale=scale)
    for i, (r, p) in enumerate(zip(workload.requests, workload.params())):
        engine.add_request(f"timeline-{i}", prompt_token_ids=r.prompt_token_ids, params=p,
                           stream=False)
    for _ in range(0 if args.whole else args.skip_steps):
        engine.step()
    timeline = StepTimeline(engine)
    allocator_before = allocator_counts()
    t0 = time.perf_counter()
    calls = 0
    with timeline.recording():
        while (engine.has_unfinished_requests() if args.whole else calls < args.steps):
            engine.step()
            calls += 1
    wall = time.perf_counter() - t0
    allocator = counts_between(allocator_before, allocator_counts())
    running = engine.scheduler.num_unfinished
    result = {"model_shape": args.model_shape, "workload": args.workload,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "date": time.strftime("%Y-%m-%d"), "skip_steps": 0 if args.whole else args.skip_steps,
              "whole_run": args.whole, "async_scheduling": engine.async_scheduling,
              "unfinished_after": running, "wall_ms_per_step": 1e3 * wall / calls,
              **summarize(timeline.steps)}
    if allocator is not None:  # cudaMalloc, retries (a device-wide sync each), cudaHostAlloc
        result["cuda_allocator"] = allocator
        print("allocators over the recorded steps: " + ", ".join(f"{k} {v:g}" for k, v in allocator.items()),
              flush=True)
    print(format_steps(timeline.steps[len(timeline.steps) // 2:]), flush=True)
    if args.whole:
        if limits is not None:
            result["copy_bytes_per_s"] = limits.copy_bytes_per_s
            result["matmul_flops_per_s"] = limits.matmul_flops_per_s
        result["by_rows"] = by_rows(timeline.steps, limits=limits)
        result["execute_outliers"] = execute_outliers(timeline.steps)
        print(format_bands(result["by_rows"]), flush=True)
        o = result["execute_outliers"]
        print(f"execute: median {o['median_ms']:.2f} ms; {o['count']} of {o['steps']} steps over "
              f"{o['factor']:g}x it (mean {o['mean_ms']:.2f} ms, {100 * o['share_of_execute_time']:.0f} % "
              f"of all execute time), {o['with_rows_changed']} of them after a change in rows "
              f"({o['steps_with_rows_changed']} such steps in all)", flush=True)
    if args.profile_steps and args.whole:
        print("--profile-steps skipped: a whole run leaves no step to profile", flush=True)
    elif args.profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                engine.step()
            if cuda:
                torch.cuda.synchronize()
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.table_rows, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(args.trace)
    while engine.has_unfinished_requests():
        engine.step()
    print(json.dumps({"step_timeline": result}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
