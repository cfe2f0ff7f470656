"""W4 (shared system prompt) and W5 (parallel sampling) with prefix caching on and off:
throughput, TTFT, and peak KV blocks against unshared requests; plus W1's cost of
caching when nothing is shared."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

from ondo.bench.sharing_workloads import PeakKVBlocks, w4_shared_system_prompt, w5_parallel_sampling
from ondo.bench.workloads import Workload


def _timed_generate(llm, requests) -> dict:
    peak = PeakKVBlocks()
    llm.engine.add_step_listener(peak)
    prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
    params = [p for _, p in requests]
    start = time.perf_counter()
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.engine.remove_step_listener(peak)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    ttft = [o.metrics["first_token_s"] - o.metrics["arrival_time_s"] for o in outs]
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "ttft_p50_s": statistics.median(ttft), "peak_kv_blocks_used": peak.peak_blocks,
            "computed_tokens": peak.num_computed_tokens}


def unshared(requests) -> list:
    """Each n-sample request as n independent requests with the seeds the n > 1 rule gives."""
    out = []
    for ids, p in requests:
        for i in range(p.n):
            out.append((ids, dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + i)))
    return out


def run_sharing(make_llm: Callable[[bool], object], vocab: int, w1: Workload | None,
                scale: float = 1.0, caching_cost_pairs: int = 3) -> list[dict]:
    w4 = w4_shared_system_prompt(vocab, seed=0, num_requests=max(1, round(512 * scale)))
    w5 = w5_parallel_sampling(vocab, seed=0, num_prompts=max(1, round(64 * scale)))
    results = {}
    for caching in (True, False):
        llm = make_llm(caching)
        results[("W4", caching)] = _timed_generate(llm, w4)
        results[("W5", caching)] = _timed_generate(llm, w5 if caching else unshared(w5))
        if w1 is not None and caching and caching_cost_pairs > 0:
            results["W1-cost"] = _caching_cost(llm, w1, vocab, caching_cost_pairs)
        del llm
    on, off = results[("W4", True)], results[("W4", False)]
    rows = [{
        "workload": "W4", "description": "512 requests sharing a 1,024-token system prompt, "
        "distinct 128-token questions, output 128", "caching_on": on, "caching_off": off,
        "output_tokens_per_s": on["output_tokens_per_s"],
        "speedup_vs_no_cache": on["output_tokens_per_s"] / off["output_tokens_per_s"],
        "ttft_p50_ratio_off_over_on": off["ttft_p50_s"] / on["ttft_p50_s"],
    }]
    on, off = results[("W5", True)], results[("W5", False)]
    rows.append({
        "workload": "W5", "description": "64 prompts x n=8, input 512, output 256; unshared = "
        "8 independent requests per prompt with caching off", "shared": on, "unshared": off,
        "output_tokens_per_s": on["output_tokens_per_s"],
        "kv_blocks_fraction_vs_unshared": on["peak_kv_blocks_used"] / off["peak_kv_blocks_used"],
    })
    if "W1-cost" in results:
        rows.append({"workload": "W1-caching-cost", **results["W1-cost"]})
    return rows


def _caching_cost(llm, w1: Workload, vocab: int, pairs: int = 3) -> dict:
    """W1 (nothing shared) with caching on and off, alternated on one engine so that the
    engine and the GPU's state are the same for both; each run's prompts are shifted to
    new token ids (same lengths), so no run hits another's cache. Medians."""
    bm = llm.engine.block_manager
    tps: dict[bool, list[float]] = {True: [], False: []}
    run = 0
    for _ in range(pairs):
        for caching in (False, True):
            run += 1
            reqs = [([(t + 7919 * run) % vocab for t in r.prompt_token_ids], p)
                    for r, p in zip(w1.requests, w1.params())]
            bm.enable_prefix_caching = caching
            try:
                tps[caching].append(_timed_generate(llm, reqs)["output_tokens_per_s"])
            finally:
                bm.enable_prefix_caching = True
    on, off = statistics.median(tps[True]), statistics.median(tps[False])
    return {"caching_on_output_tokens_per_s": on, "caching_off_output_tokens_per_s": off,
            "runs_on": tps[True], "runs_off": tps[False], "caching_cost_fraction": 1.0 - on / off}
