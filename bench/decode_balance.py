"""One layer's decode attention over a batch of unequal contexts, as W1's decode steps hold
them: the batch's rows in request order or longest context first (a row's kv heads apart
in the grid, or side by side so that the rows start one after another), each context cut
into splits of a given size or not at all.

    python3 bench/decode_balance.py --out decode_balance.json   # on a GPU
    python3 bench/decode_balance.py --smoke                     # CPU, Triton interpreter

The decode kernel runs one program per (row, KV head, split), and the GPU starts them in
row order. With contexts of 100 to 2,000 tokens, the last programs to start may be long
ones that run on a few SMs while the rest sit idle; the kernel's own benchmark
(`kernel_bench.py`) gives every row the same context and cannot show it. Each case takes
the contexts of the W1 decode step (its requests' lengths, `ondo.bench.workloads`) where
`rows` requests are left, builds that batch over shuffled cache blocks, and times the split
kernel with its reduction in a CUDA graph of 20 calls, the grid sized for `max_model_len`
as in the engine's decode graphs. `fraction_of_copy` is the K/V bytes read over that time
against the device's copy bandwidth (`ondo.bench.device_limits`). Prints a table, then each
case as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ondo.bench.graph_timing import graph_time_us  # noqa: E402
from ondo.bench.shapes import SHAPES  # noqa: E402
from ondo.bench.workloads import make_workload  # noqa: E402
from ondo.kernels.decode_splits import decode_splits  # noqa: E402
from ondo.kernels.metadata import AttentionMetadata  # noqa: E402
from ondo.kernels.triton_attention import (  # noqa: E402
    _sm_count,
    decode_tile_tokens,
    paged_decode_attention_triton,
)

# (rows in request order or longest context first, a row's kv heads side by side in the grid)
ORDERS = {"request": (False, False), "longest_first": (True, False), "longest_first_heads_inner": (True, True)}


def w1_contexts(rows: int, vocab: int, seed: int = 0) -> list[int]:
    """Contexts of W1's first decode step with at most `rows` requests left, in request
    order: every request admitted at once, each decode step adding a token to each."""
    requests = make_workload("W1", vocab, seed).requests
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.max_tokens for r in requests]
    for step in range(1, max(outputs) + 1):
        alive = [i for i, n in enumerate(outputs) if n >= step]
        if len(alive) <= rows:
            return [prompts[i] + step for i in alive]
    raise ValueError(f"W1 never has as few as {rows} requests left")


def batch(contexts: list[int], heads: tuple[int, int, int], max_model_len: int, block_size: int,
          dtype: torch.dtype, device: str, seed: int = 0):
    """(query, k_cache, v_cache, meta) of one decode launch over these contexts."""
    num_q_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = [math.ceil(c / block_size) for c in contexts]
    total = sum(blocks)
    cache_shape = (total + 1, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    order = (torch.randperm(total, generator=gen, device=device) + 1).to(torch.int32).cpu()
    tables = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
    start = 0
    for row, n in enumerate(blocks):
        tables[row, :n] = order[start:start + n]
        start += n
    n = len(contexts)
    meta = AttentionMetadata(
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
        block_tables=tables.to(device), context_lens=torch.tensor(contexts, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
        max_query_len=1, max_context_len=max_model_len, block_size=block_size)
    query = torch.randn(n, num_q_heads, head_dim, generator=gen, device=device, dtype=dtype)
    return query, k_cache, v_cache, meta


def reorder(query: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor):
    """The same batch with its rows in the order `rows`."""
    n = rows.numel()
    return query[rows].contiguous(), AttentionMetadata(
        slot_mapping=meta.slot_mapping, block_tables=meta.block_tables[rows].contiguous(),
        context_lens=meta.context_lens[rows].contiguous(),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=query.device),
        max_query_len=1, max_context_len=meta.max_context_len, block_size=meta.block_size)


def run_case(shape: str, rows: int, max_model_len: int, split_sizes: list[int], block_size: int,
             dtype: torch.dtype, device: str, copy_bytes_per_s: float | None) -> list[dict]:
    cuda = device != "cpu"
    heads = (SHAPES[shape]["num_attention_heads"], SHAPES[shape]["num_key_value_heads"],
             SHAPES[shape]["head_dim"]) if cuda else (4, 2, 16)
    contexts = w1_contexts(rows, SHAPES[shape]["vocab_size"])
    query, k_cache, v_cache, meta = batch(contexts, heads, max_model_len, block_size, dtype, device)
    block_n, num_sms = decode_tile_tokens(k_cache), _sm_count(query)
    scale = heads[2] ** -0.5
    bytes_read = 2 * sum(contexts) * heads[1] * heads[2] * k_cache.element_size()
    by_length = torch.argsort(meta.context_lens, descending=True, stable=True)
    layouts = {False: (query, meta, None), True: (*reorder(query, meta, by_length), by_length)}
    reference = paged_decode_attention_triton(query, k_cache, v_cache, meta, scale, heads_inner=False)
    heuristic = decode_splits(len(contexts), heads[1], max_model_len, block_n, num_sms)[0]
    results = []
    for order, (sorted_rows, heads_inner) in ORDERS.items():
        q, m, rows_of = layouts[sorted_rows]
        for split in [None, *split_sizes]:
            def attend(q=q, m=m, split=split, heads_inner=heads_inner) -> torch.Tensor:
                return paged_decode_attention_triton(q, k_cache, v_cache, m, scale, split_tokens=split,
                                                     heads_inner=heads_inner)

            if cuda:
                us = graph_time_us(attend, cuda)
            else:  # one call's wall clock in the interpreter: plumbing only
                t0 = time.perf_counter()
                attend()
                us = (time.perf_counter() - t0) * 1e6
            out = attend()
            if rows_of is not None:
                out = torch.empty_like(out).index_copy_(0, rows_of, out)
            split_tokens, grid = decode_splits(len(contexts), heads[1], max_model_len, block_n, num_sms, split)
            results.append({
                "shape": shape, "rows": len(contexts), "max_model_len": max_model_len, "order": order,
                "split_tokens": split_tokens, "heuristic": split is None, "grid_splits": grid,
                "programs": sum(math.ceil(c / split_tokens) for c in contexts) * heads[1],
                "context_min": min(contexts), "context_mean": round(sum(contexts) / len(contexts), 1),
                "context_max": max(contexts), "us": round(us, 2),
                "gb_per_s": round(bytes_read / us / 1e3, 1),
                "fraction_of_copy": (round(bytes_read / (us * 1e-6) / copy_bytes_per_s, 3)
                                     if copy_bytes_per_s else None),
                "max_abs_diff": float((out.float() - reference.float()).abs().max()),
            })
    assert heuristic == results[0]["split_tokens"]
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "llama3.1-8b"], choices=["qwen3-0.6b", "llama3.1-8b"])
    ap.add_argument("--rows", type=int, nargs="+", default=[240, 160, 96, 48])
    ap.add_argument("--split-tokens", type=int, nargs="+", default=[2048, 1024, 512, 256])
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny heads, one batch")
    ap.add_argument("--out", default=None, help="also write the rows here as JSON")
    args = ap.parse_args(argv)
    device, dtype, block_size, copy = "cuda", torch.bfloat16, 16, None
    if args.smoke or not torch.cuda.is_available():
        device, dtype = "cpu", torch.float32
        args.shapes, args.rows, args.split_tokens = ["qwen3-0.6b"], [6], [512]
    else:
        from ondo.bench.device_limits import measure_device_limits

        copy = measure_device_limits(torch.device(device)).copy_bytes_per_s
    results = []
    print(f"{'shape':12} {'rows':>4} {'order':25} {'split':>5} {'grid':>4} {'programs':>8} "
          f"{'us':>8} {'GB/s':>7} {'of copy':>7}")
    for shape in args.shapes:
        for rows in args.rows:
            for r in run_case(shape, rows, args.max_model_len, args.split_tokens, block_size, dtype, device, copy):
                results.append(r)
                print(f"{shape:12} {r['rows']:4d} {r['order']:25} {r['split_tokens']:5d}"
                      f"{'*' if r['heuristic'] else ' '}{r['grid_splits']:4d} {r['programs']:8d} "
                      f"{r['us']:8.1f} {r['gb_per_s']:7.0f} {r['fraction_of_copy'] or 0:7.3f}", flush=True)
    for r in results:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
