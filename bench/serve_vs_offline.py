"""The serving throughput-latency curve against the offline figure for the same requests.

Builds request sets (random token-id prompts, seeded), runs them offline through
`LLM.generate`, then starts `ondo serve` on the same model and sends requests of the same
kind with `ondo bench serve` at increasing Poisson rates up to a burst; the last rate
gets the very requests that ran offline, --repeat times on fresh sets (the median ratio
is the figure). Prints a JSON line per run and the whole; writes the JSON to --out.

Where the time goes: each run also reports the engine's side of it (from the engine's own
step records: offline through a step listener, the server through --telemetry-db), so a
gap between the client's figure and the engine's is delivery, and a gap between the
engine's figures is the engine starved or slowed; and the CPU share of each process
(client, server, engine) over the run.

    python3 bench/serve_vs_offline.py --model-shape qwen3-0.6b --rates 4 8 16 inf --out curve.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sqlite3
import statistics
import sys
import time

import torch

from ondo.bench.serve import BenchServeArgs, bench_serve, make_requests
from ondo.bench.server_process import start_dummy_server
from ondo.bench.shapes import SHAPES, shape_folder
from ondo.engine.gc_pauses import GcPauses, freeze_startup_heap, thaw_heap
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.step_stats import StepStats

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


Step = tuple[float, float, int, int, int, int]  # start, end, output tokens, running, prefill tokens, batch


def engine_view(steps: list[Step], t0: float, t1: float) -> dict:
    """The engine's side of a run from its steps that ended within [t0, t1] (monotonic
    clock, shared by all processes): throughput over its busy time, how fast the batch
    filled, and where the time went (gap since the previous step's end, by kind of step)."""
    steps = [s for s in steps if t0 <= s[1] <= t1 and (s[2] or s[4])]  # steps with work
    if not steps:
        return {}
    first, last = steps[0][0], steps[-1][1]
    tokens = sum(s[2] for s in steps)
    peak = max(s[3] for s in steps)
    at_peak = next(s[1] for s in steps if s[3] >= 0.95 * peak)
    kinds: dict[str, list[float]] = {"with_prefill": [], "decode_full": [], "decode_partial": []}
    for prev, s in zip(steps, steps[1:]):
        kind = "with_prefill" if s[4] else "decode_full" if s[5] >= 0.95 * peak else "decode_partial"
        kinds[kind].append(s[1] - prev[1])
    return {"engine_steps": len(steps), "engine_output_tokens": tokens,
            "engine_first_step_after_s": first - t0, "engine_busy_s": last - first,
            "engine_output_tokens_per_s": tokens / (last - first),
            "engine_peak_running": peak, "engine_time_to_peak_running_s": at_peak - first,
            "engine_mean_step_ms": 1e3 * (last - first) / len(steps),
            "delivery_lag_s": t1 - last,
            "step_gaps": {k: {"steps": len(v), "total_s": round(sum(v), 3),
                              "median_ms": round(1e3 * statistics.median(v), 2) if v else 0.0}
                          for k, v in kinds.items()}}


def resolved(choice: str, fast: str, plain: str) -> str:
    """What uvicorn runs for `choice`: "auto" is `fast` where it is installed."""
    if choice != "auto":
        return choice
    return fast if importlib.util.find_spec(fast) is not None else plain


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def offline(folder: str, request_sets: list, engine_flags: dict) -> list[tuple[float, dict]]:
    """Output tokens/s and the engine's view, per request set, all through one `LLM`."""
    from ondo import LLM

    llm = LLM(folder, load_format="dummy", dtype="bfloat16", **engine_flags)
    first = request_sets[0]
    # Warm-up on other prompts (the fused kernels compile here, and nothing is cached).
    llm.generate([{"prompt_token_ids": [t + 1 for t in r.prompt]} for r in first[:32]],
                 [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                  for r in first[:32]])
    torch.cuda.synchronize()
    steps: list[Step] = []

    def record(s: StepStats) -> None:
        steps.append((s.start_monotonic_s, s.end_monotonic_s, s.num_output_tokens, s.num_running,
                      s.num_prefill_tokens, s.batch_size))

    llm.engine.add_step_listener(record)
    freeze_startup_heap()  # as the engine process of `ondo serve` does
    results = []
    for requests in request_sets:
        prompts = [{"prompt_token_ids": r.prompt} for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                  for r in requests]
        gc_pauses = GcPauses().start()
        t0, cpu0 = time.monotonic(), time.process_time()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        gc_pauses.stop()
        view = engine_view(steps, t0, time.monotonic())
        view["cpu_share_offline_process"] = (time.process_time() - cpu0) / elapsed
        view["gc"] = gc_pauses.summary()
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results.append((tokens / elapsed, view))
        print(f"offline: {tokens / elapsed:.0f} output tokens/s; engine view: {json.dumps(view)}",
              flush=True)
    thaw_heap()
    timing = llm.engine.step_timing_s  # warm-up included; compare with the server's exit log
    print("offline engine host time per step, ms:",
          {k: round(v / timing["steps"] * 1e3, 3) for k, v in timing.items() if k != "steps"}, flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--rates", nargs="+", default=["8", "16", "32", "inf"])
    ap.add_argument("--repeat", type=int, default=3,
                    help="the last rate (saturation) runs this many times, each on request sets "
                         "of its own that offline also runs; the median ratio is the figure")
    ap.add_argument("--telemetry", choices=("db", "off"), default="db",
                    help="db: the server stores its telemetry (the engine's view comes from it); "
                         "off: the server runs no telemetry at all (no engine view)")
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="the server's event loop (ondo serve --loop)")
    ap.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                    help="the server's HTTP parser (ondo serve --http)")
    ap.add_argument("--out", default="serve_curve.json")
    args = ap.parse_args()

    vocab = SHAPES[args.model_shape]["vocab_size"]
    folder = shape_folder(args.model_shape)
    engine_flags = {"max_model_len": args.max_model_len, "max_num_seqs": 256}
    # Each run gets prompts of its own (seed = its index), so that no run finds the previous
    # runs' prompts in the server's prefix cache; offline runs the saturation runs' sets.
    runs = [(seed, rate) for seed, rate in enumerate(args.rates[:-1])]
    runs += [(len(runs) + k, args.rates[-1]) for k in range(args.repeat)]
    saturation_seeds = [seed for seed, _ in runs[-args.repeat:]]
    request_sets = [make_requests(None, "random", args.num_prompts, args.input_len, args.output_len,
                                  args.range_ratio, seed, vocab) for seed in saturation_seeds]
    offline_runs = offline(folder, request_sets, engine_flags)
    offline_by_seed = dict(zip(saturation_seeds, offline_runs))
    # Below saturation the ratio is to the median offline figure (it is not the target).
    offline_median = statistics.median(tps for tps, _ in offline_runs)

    db = os.path.splitext(args.out)[0] + "-engine-steps.db"
    if os.path.exists(db):
        os.remove(db)
    flags = ["--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
             "--max-num-seqs", "256", "--max-waiting-requests", str(4 * args.num_prompts),
             "--loop", args.loop, "--http", args.http]
    flags += ["--telemetry-db", db] if args.telemetry == "db" else ["--telemetry", "off"]
    proc, url = start_dummy_server(folder, args.port, flags)
    rows = []
    try:
        engine_pids = child_pids(proc.pid)
        for seed, rate in runs:
            t0, client0 = time.monotonic(), time.process_time()
            server0 = cpu_seconds(proc.pid)
            engine0 = sum(cpu_seconds(p) for p in engine_pids)
            summary = bench_serve(BenchServeArgs(
                base_url=url, num_prompts=args.num_prompts, request_rate=float(rate),
                input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                seed=seed, token_id_vocab=vocab))
            t1 = time.monotonic()
            summary["request_rate"] = rate
            offline_tps = offline_by_seed[seed][0] if seed in offline_by_seed else offline_median
            summary["offline_output_tokens_per_s"] = offline_tps
            summary["fraction_of_offline"] = summary.get("output_throughput", 0.0) / offline_tps
            summary["cpu_share"] = {
                "client": (time.process_time() - client0) / (t1 - t0),
                "server": (cpu_seconds(proc.pid) - server0) / (t1 - t0),
                "engine": (sum(cpu_seconds(p) for p in engine_pids) - engine0) / (t1 - t0)}
            if args.telemetry == "db":
                time.sleep(1.5)  # the telemetry store writes the last steps
                with sqlite3.connect(db) as conn:
                    steps = conn.execute("SELECT start_monotonic_s, end_monotonic_s, num_output_tokens, "
                                         "num_running, num_prefill_tokens, batch_size FROM engine_steps "
                                         "ORDER BY end_monotonic_s").fetchall()
                summary["engine_view"] = engine_view(steps, t0, t1)
            rows.append(summary)
            print(json.dumps({k: v for k, v in summary.items()
                              if not isinstance(v, (list, dict)) or k in ("cpu_share", "engine_view")}),
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    saturation = [r["fraction_of_offline"] for r in rows[-args.repeat:]]
    result = {"model": args.model_shape, "device": torch.cuda.get_device_name(),
              "date": time.strftime("%Y-%m-%d"), "offline_output_tokens_per_s": offline_median,
              "offline_runs": [{"output_tokens_per_s": tps, "engine_view": view}
                               for tps, view in offline_runs],
              "saturation_fraction_of_offline": {"runs": saturation,
                                                 "median": statistics.median(saturation)},
              "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
              "range_ratio": args.range_ratio, "server_loop": resolved(args.loop, "uvloop", "asyncio"),
              "server_http": resolved(args.http, "httptools", "h11"),
              "curve": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    print("saturation, fraction of offline:", json.dumps(result["saturation_fraction_of_offline"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
