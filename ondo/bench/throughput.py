"""`ondo bench throughput`: offline throughput of ondo on W1-W3 against the device's roofline
and against transformers, on dummy weights of real architectures.

The roofline bound of a run sums, over the steps ondo's schedule took, the larger of
(bytes a step must move / measured copy bandwidth) and (FLOPs / measured matmul rate);
`fraction_of_roofline` = bound / measured wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ondo.bench.allocator_counts import allocator_counts, counts_between
from ondo.bench.arg_types import non_negative_int, positive_float, positive_int, sampling_hz
from ondo.bench.device_limits import DeviceLimits, measure_device_limits
from ondo.bench.shapes import SHAPES, shape_folder
from ondo.bench.sharing_workloads import MAX_REQUEST_TOKENS as SHARING_MAX_REQUEST_TOKENS
from ondo.bench.workloads import MAX_REQUEST_TOKENS, Workload, make_workload, warm_up_workload
from ondo.engine.step_stats import StepStats

if TYPE_CHECKING:
    from ondo import LLM

log = logging.getLogger(__name__)


@dataclass
class StepLog:
    """Per-step figures a run collects through the engine's step listener."""

    limits: DeviceLimits | None
    steps: int = 0
    bound_s: float = 0.0
    host_s: float = 0.0
    preemptions: int = 0
    peak_blocks: int = 0

    def __call__(self, s: StepStats) -> None:
        self.steps += 1
        self.preemptions += s.num_preemptions
        self.peak_blocks = max(self.peak_blocks, s.num_kv_blocks_used)
        if self.limits is not None:
            self.bound_s += self.limits.step_bound_s(s.flops, s.bytes_moved)


def run_ondo(llm, workload: Workload, limits: DeviceLimits | None,
             extra_listeners: list | None = None) -> dict:
    steps = StepLog(limits)
    listeners = [steps, *(extra_listeners or [])]
    for listener in listeners:
        llm.engine.add_step_listener(listener)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    timing_before = dict(llm.engine.step_timing_s)
    _sync()
    allocator_before = allocator_counts()
    start = time.perf_counter()
    try:
        outs = llm.generate(prompts, workload.params())
        _sync()
    finally:
        for listener in listeners:
            llm.engine.remove_step_listener(listener)
    elapsed = time.perf_counter() - start
    allocator = counts_between(allocator_before, allocator_counts())
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == workload.output_tokens, "every request must produce exactly max_tokens"
    row = {
        "elapsed_s": elapsed,
        "output_tokens": produced,
        "input_tokens": workload.input_tokens,
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + workload.input_tokens) / elapsed,
        "requests_per_s": len(workload.requests) / elapsed,
        "steps": steps.steps,
        "mean_step_ms": 1e3 * elapsed / max(steps.steps, 1),
        "preemptions": steps.preemptions,
        "peak_kv_blocks_used": steps.peak_blocks,
    }
    timing = {k: v - timing_before[k] for k, v in llm.engine.step_timing_s.items()}
    n = max(timing.pop("steps"), 1)
    row["host_ms_per_step"] = {k: 1e3 * v / n for k, v in timing.items()}
    if allocator is not None:  # CUDA: what the caching allocators did during the run
        row["cuda_allocator"] = allocator
    if limits is not None:
        row["roofline_bound_s"] = steps.bound_s
        row["fraction_of_roofline"] = steps.bound_s / elapsed
        row["roofline_output_tokens_per_s"] = produced / steps.bound_s
    return row


def run_baselines(folder: str, workload: Workload, subset: int, batch_sizes: list[int],
                  max_time_s: float, cb_requests: int, cb_max_tokens: int) -> dict:
    """transformers on the same weights' shape and workload, each run bounded in time: a
    static batch of the first `bs` requests for at most `max_time_s`; continuous batching
    on the first `cb_requests` requests with outputs capped at `cb_max_tokens`."""
    from ondo.bench.baselines import (
        continuous_batching_generate,
        load_hf_model,
        static_batch_generate,
    )

    device = torch.device("cuda")
    sub = workload.subset(subset)
    results: dict[str, float | str] = {}
    notes: dict[str, str] = {}
    model = load_hf_model(folder, device)
    best = 0.0
    for bs in batch_sizes:
        key = f"transformers_generate_bs{bs}"
        try:
            tps = static_batch_generate(model, sub, bs, max_time_s)
            results[key] = tps
            notes[key] = f"one static batch of the first {min(bs, len(sub.requests))} requests, " \
                         f"stopped after {max_time_s:.0f} s (generate's max_time)"
            best = max(best, tps)
        except Exception as e:  # an OOM at one batch size does not end the run
            notes[key] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.empty_cache()
    results["transformers_generate_best"] = best
    del model
    _free()
    cb = workload.subset(cb_requests)
    for impl in ("paged|sdpa", "sdpa_paged"):
        try:
            model = load_hf_model(folder, device, attn_implementation=impl)
            results["transformers_generate_batch"] = continuous_batching_generate(model, cb, cb_max_tokens)
            notes["transformers_generate_batch"] = (
                f"attn_implementation={impl!r}; the first {len(cb.requests)} requests, outputs capped "
                f"at {cb_max_tokens} tokens")
            del model
            break
        except Exception as e:
            notes[f"transformers_generate_batch[{impl}]"] = f"{type(e).__name__}: {e}"[:300]
        _free()
    _free()
    return {"baselines": results, "baseline_subset_requests": len(sub.requests),
            "baseline_notes": notes}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return name.replace(" ", "-")


def dummy_llm(folder: str, args: argparse.Namespace, **engine_args) -> LLM:
    """An LLM on dummy weights of the shape in `folder`, with the flags of add_engine_flags."""
    from ondo import LLM

    return LLM(folder, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
               gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, seed=0,
               enforce_eager=args.enforce_eager, **engine_args)


def check_run(args: argparse.Namespace, on_gpu: bool) -> None:
    """Refuses, before an engine starts, a run that could not finish: a --max-model-len
    shorter than a request it would send (the warm-up pass on a GPU and --sharing's runs
    take W1's requests too), or an --out-dir it cannot write its JSON to."""
    bounds = {name: MAX_REQUEST_TOKENS[name] for name in args.workload}
    if on_gpu or args.sharing:
        bounds["W1"] = MAX_REQUEST_TOKENS["W1"]
    if args.sharing:
        bounds.update(SHARING_MAX_REQUEST_TOKENS)
    name, need = max(bounds.items(), key=lambda item: item[1])
    if args.max_model_len < need:
        raise ValueError(f"--max-model-len {args.max_model_len} is shorter than {name}'s longest "
                         f"request ({need} tokens, prompt and output): give at least {need}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out-dir {args.out_dir}: {e.strerror or e}") from None
    if not os.access(args.out_dir, os.W_OK):
        raise OSError(f"--out-dir {args.out_dir}: permission denied")


def main(args: argparse.Namespace) -> int:
    logging.getLogger("ondo").setLevel(logging.INFO)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_run(args, device.type == "cuda")
    limits = measure_device_limits(device) if device.type == "cuda" else None
    if limits:
        log.info("device limits: copy %.0f GB/s, bf16 matmul %.0f TFLOP/s",
                 limits.copy_bytes_per_s / 1e9, limits.matmul_flops_per_s / 1e12)
    rows = []
    for shape in args.model_shape:
        folder = shape_folder(shape)
        t0 = time.perf_counter()
        llm = dummy_llm(folder, args)
        startup_s = time.perf_counter() - t0
        runner = llm.engine.runner
        workloads = [make_workload(w, SHAPES[shape]["vocab_size"], seed=0, scale=args.scale)
                     for w in args.workload if w in ("W1", "W2", "W3")]
        shape_rows = []
        if device.type == "cuda":
            # Warm-up: the fused kernels' first shapes compile here, not inside a timed run.
            warm = warm_up_workload(SHAPES[shape]["vocab_size"])
            t_warm = time.perf_counter()
            run_ondo(llm, warm, None)
            log.info("warm-up (%d requests) took %.1f s", len(warm.requests), time.perf_counter() - t_warm)
        if args.profile and device.type == "cuda":
            from ondo.bench.profile_steps import profile_steps

            for wl in workloads:
                warm = 3 if wl.name == "W3" else 40  # W1/W2: past the prefills, into decode
                print(f"profile {wl.name}:\n" + profile_steps(llm, wl, warm, 3), flush=True)
        for wl in workloads:
            row = {"workload": wl.name, "description": wl.description, "model": shape,
                   "device": limits.device if limits else "cpu", "dtype": "bfloat16",
                   "date": time.strftime("%Y-%m-%d"), "startup_s": startup_s,
                   "kv_blocks": llm.stats()["num_total_blocks"],
                   "cuda_graph_capture_s": runner.graph_capture_s,
                   "cuda_graph_memory_gib": runner.graph_memory_bytes / 2**30,
                   "num_requests": len(wl.requests)}
            if limits:
                row["copy_gb_per_s"] = limits.copy_bytes_per_s / 1e9
                row["matmul_tflop_per_s"] = limits.matmul_flops_per_s / 1e12
            row.update(run_ondo(llm, wl, limits))
            if wl.name == "W1" and llm.engine.async_scheduling:
                # The same run with every step synchronous: what scheduling ahead buys.
                llm.engine.async_scheduling = False
                vocab = SHAPES[shape]["vocab_size"]
                sync = run_ondo(llm, make_workload("W1", vocab, seed=100, scale=args.scale), limits)
                llm.engine.async_scheduling = True
                row["sync_scheduling"] = {k: sync[k] for k in ("output_tokens_per_s", "fraction_of_roofline",
                                                               "host_ms_per_step") if k in sync}
            log.info("%s %s: %.0f output tok/s, %.2f of roofline", shape, wl.name,
                     row["output_tokens_per_s"], row.get("fraction_of_roofline", float("nan")))
            shape_rows.append(row)
            _write(args.out_dir, shape, shape_rows)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}), flush=True)
            if wl.name == "W1" and args.telemetry_hz and device.type == "cuda":
                from ondo.bench.telemetry_run import run_with_telemetry

                # Fresh prompts for each run, so that no run reuses another's cached prefixes.
                vocab = SHAPES[shape]["vocab_size"]
                off = run_ondo(llm, make_workload("W1", vocab, seed=101, scale=args.scale), limits)
                row["telemetry_off_output_tokens_per_s"] = off["output_tokens_per_s"]
                row["telemetry"] = [
                    run_with_telemetry(llm, make_workload("W1", vocab, seed=102 + i, scale=args.scale),
                                       limits, hz, args.out_dir, off["output_tokens_per_s"], run_ondo)
                    for i, hz in enumerate(args.telemetry_hz)
                ]
                _write(args.out_dir, shape, shape_rows)
            if wl.name == "W1" and args.events_pairs:
                from ondo.bench.events_run import format_table, fresh_prompts, run_events_overhead

                vocab = SHAPES[shape]["vocab_size"]
                base = make_workload("W1", vocab, seed=200, scale=args.scale)
                row["events_overhead"] = run_events_overhead(
                    llm, lambda run, b=base, v=vocab: fresh_prompts(b, run, v), limits,
                    (args.telemetry_hz or [20.0])[0], args.events_pairs, args.out_dir, run_ondo)
                print(format_table(row["events_overhead"]), flush=True)
                print(json.dumps({"events_overhead": row["events_overhead"]}), flush=True)
                _write(args.out_dir, shape, shape_rows)
        del llm, runner
        _free()
        if args.sharing:
            from ondo.bench.sharing import run_sharing

            def make_llm(caching: bool, folder=folder):
                return dummy_llm(folder, args, enable_prefix_caching=caching)

            w1 = next((w for w in workloads if w.name == "W1"), None)
            for r in run_sharing(make_llm, SHAPES[shape]["vocab_size"], w1, args.scale,
                                 args.caching_cost_pairs):
                r.update({"model": shape, "device": limits.device if limits else "cpu",
                          "date": time.strftime("%Y-%m-%d")})
                shape_rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}), flush=True)
            _write(args.out_dir, shape, shape_rows)
            _free()
        if args.baselines and device.type == "cuda":
            for wl, row in zip(workloads, shape_rows[: len(workloads)]):
                if wl.name not in args.baseline_workloads:
                    continue
                row.update(run_baselines(folder, wl, args.baseline_subset, args.baseline_batch_sizes,
                                         args.baseline_max_time_s, args.baseline_cb_requests,
                                         args.baseline_cb_max_tokens))
                best = max([v for k, v in row["baselines"].items() if isinstance(v, float)] or [0.0])
                row["speedup_vs_best_baseline"] = row["output_tokens_per_s"] / best if best else None
        rows.extend(shape_rows)
        _write(args.out_dir, shape, shape_rows)
    _print_table(rows)
    print(json.dumps({"throughput": rows}))
    return 0


def _write(out_dir: str, shape: str, rows: list[dict]) -> None:
    path = os.path.join(out_dir, f"throughput-{device_tag()}-{shape}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    log.info("wrote %s", path)


def _print_table(rows: list[dict]) -> None:
    cols = ["model", "workload", "output_tokens_per_s", "total_tokens_per_s", "requests_per_s",
            "fraction_of_roofline", "speedup_vs_best_baseline", "preemptions", "startup_s"]
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine flags of a dummy-weight run (read by dummy_llm)."""
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throughput", help="offline throughput on W1-W3 vs roofline and transformers")
    p.add_argument("--model-shape", nargs="+", default=["qwen3-0.6b"], choices=sorted(SHAPES))
    p.add_argument("--workload", nargs="+", default=["W1", "W2", "W3"], choices=["W1", "W2", "W3"])
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of a few steps")
    p.add_argument("--sharing", action="store_true",
                   help="also run W4/W5 with prefix caching on and off (and W1 with it off)")
    p.add_argument("--caching-cost-pairs", type=non_negative_int, default=3,
                   help="W1 runs with caching off and on, alternated, for caching's cost (0: skip)")
    p.add_argument("--scale", type=positive_float, default=1.0, help="fraction of each workload's requests")
    add_engine_flags(p)
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--baseline-subset", type=positive_int, default=64)
    p.add_argument("--baseline-workloads", nargs="+", default=["W1", "W2", "W3"], choices=["W1", "W2", "W3"])
    p.add_argument("--baseline-batch-sizes", type=positive_int, nargs="+", default=[32, 64])
    p.add_argument("--baseline-max-time-s", type=positive_float, default=30.0,
                   help="time limit of each static-batch generate run")
    p.add_argument("--baseline-cb-requests", type=positive_int, default=16,
                   help="requests given to transformers' continuous batching")
    p.add_argument("--baseline-cb-max-tokens", type=positive_int, default=128,
                   help="output cap per request for transformers' continuous batching")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--telemetry-hz", type=sampling_hz, nargs="*", default=[],
                   help="also run W1 with NVML telemetry at these rates (overhead, energy/token)")
    p.add_argument("--events-pairs", type=non_negative_int, default=0,
                   help="also run W1 this many times with telemetry alone and with telemetry, "
                        "event detectors and event log, alternated (their cost)")
    p.set_defaults(func=main)
