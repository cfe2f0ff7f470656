"""The decode attention of a CUDA-graph step, with the split of each context fixed when the
graph was captured (for `max_model_len`) against the split set at each replay from the
step's own rows and longest context (`ondo.kernels.decode_splits.graph_split_tokens`),
and a sweep of split counts within the captured grid.

    python3 bench/decode_graph_splits.py --out decode_graph_splits.json   # on a GPU
    python3 bench/decode_graph_splits.py --smoke                          # CPU, Triton interpreter

Each case is the engine's decode launch for one layer: `rows` sequences of `context`
tokens padded up to the decode graph's batch (padding rows read one slot of block 0),
the grid sized for `max_model_len`; the split kernel and the reduction timed together
in a CUDA graph of 20 calls (`ondo.bench.graph_timing`). `gb_per_s` is the K/V bytes the
rows read over that time. Prints a table, then each case as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from ondo.engine.model_runner import decode_graph_sizes  # noqa: E402
from ondo.kernels.decode_splits import decode_splits, graph_split_tokens  # noqa: E402
from ondo.kernels.metadata import AttentionMetadata  # noqa: E402
from ondo.kernels.triton_attention import (  # noqa: E402
    _sm_count,
    decode_tile_tokens,
    paged_decode_attention_triton,
)

SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama3.1-8b": (32, 8, 128)}  # (q heads, kv heads, head dim)


def graph_rows(rows: int, max_num_seqs: int = 256) -> int:
    """The decode graph a step of `rows` rows replays (`ModelRunner._graph_size`)."""
    return next(size for size in decode_graph_sizes(max_num_seqs) if size >= rows)


def decode_case(rows: int, context: int, padded: int, heads: tuple[int, int, int], max_model_len: int,
                block_size: int, dtype: torch.dtype, device: str):
    """(query, k_cache, v_cache, meta as captured) of one layer's decode launch."""
    num_q_heads, num_kv_heads, head_dim = heads
    blocks = math.ceil(context / block_size)
    k_cache = torch.empty(1 + rows * blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                          device=device).normal_()
    v_cache = torch.empty_like(k_cache).normal_()
    tables = torch.zeros(padded, blocks, dtype=torch.int32, device=device)
    tables[:rows] = (torch.randperm(rows * blocks, device=device) + 1).to(torch.int32).view(rows, blocks)
    context_lens = torch.ones(padded, dtype=torch.int32, device=device)
    context_lens[:rows] = context
    meta = AttentionMetadata(
        slot_mapping=torch.full((padded,), -1, dtype=torch.int64, device=device),
        block_tables=tables, context_lens=context_lens,
        query_start_loc=torch.arange(padded + 1, dtype=torch.int32, device=device),
        max_query_len=1, max_context_len=max_model_len, block_size=block_size)
    query = torch.randn(padded, num_q_heads, head_dim, dtype=dtype, device=device)
    return query, k_cache, v_cache, meta


def run_case(shape: str, rows: int, context: int, max_model_len: int, block_size: int, dtype: torch.dtype,
             device: str) -> dict:
    heads = SHAPES[shape] if device != "cpu" else (4, 4, 16)
    padded = graph_rows(rows)
    query, k_cache, v_cache, captured = decode_case(rows, context, padded, heads, max_model_len, block_size,
                                                    dtype, device)
    cuda = query.is_cuda
    block_n, num_sms, num_kv_heads = decode_tile_tokens(k_cache), _sm_count(query), heads[1]
    captured_split, grid = decode_splits(padded, num_kv_heads, max_model_len, block_n, num_sms)
    scale = heads[2] ** -0.5
    split_tokens = torch.zeros(1, dtype=torch.int32, device=device)
    replayed = dataclasses.replace(captured, decode_split_tokens=split_tokens)

    def attend(meta: AttentionMetadata) -> torch.Tensor:
        return paged_decode_attention_triton(query, k_cache, v_cache, meta, scale)

    def timed(split: int | None) -> tuple[float, torch.Tensor]:
        """(µs a call, the output rows) with the captured split (None) or this one."""
        meta = captured if split is None else replayed
        if split is not None:
            split_tokens.fill_(split)
        if not cuda:  # one call's wall clock in the interpreter: plumbing only
            t0 = time.perf_counter()
            out = attend(meta)
            return (time.perf_counter() - t0) * 1e6, out[:rows]
        return graph_time_us(lambda: attend(meta), cuda), attend(meta)[:rows]

    bytes_read = 2 * rows * context * num_kv_heads * heads[2] * k_cache.element_size()
    captured_us, expect = timed(None)
    replay_split = graph_split_tokens(rows, context, padded, max_model_len, num_kv_heads, block_n, num_sms)
    replay_us, out = timed(replay_split)
    sweep = {}
    for splits in sorted({1, 2, 3, 4, 6, 8, 12, 16, 32, grid}) if cuda else ():
        split = math.ceil(math.ceil(context / splits) / block_n) * block_n
        if splits <= grid and math.ceil(context / split) == splits:
            sweep[splits] = round(timed(split)[0], 2)
    return {
        "shape": shape, "rows": rows, "graph_rows": padded, "context": context, "max_model_len": max_model_len,
        "grid_splits": grid, "captured_live_splits": math.ceil(context / captured_split),
        "replay_live_splits": math.ceil(context / replay_split),
        "captured_us": round(captured_us, 2), "replay_us": round(replay_us, 2),
        "captured_gb_per_s": round(bytes_read / captured_us / 1e3, 1),
        "replay_gb_per_s": round(bytes_read / replay_us / 1e3, 1),
        "us_by_live_splits": sweep,
        "max_abs_diff": float((out.float() - expect.float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 3, 7, 12, 24, 40, 56])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--max-model-lens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny heads, one case")
    ap.add_argument("--out", default=None, help="also write the rows here as JSON")
    args = ap.parse_args(argv)
    device, dtype, block_size = "cuda", torch.bfloat16, 16
    if args.smoke or not torch.cuda.is_available():
        device, dtype = "cpu", torch.float32
        args.shapes, args.rows, args.contexts, args.max_model_lens = ["qwen3-0.6b"], [12], [600], [2048]
    results = []
    print(f"{'shape':12} {'rows':>4} {'graph':>5} {'ctx':>5} {'max len':>7} {'grid':>4} {'live':>9} "
          f"{'captured us':>11} {'replay us':>9} {'GB/s':>13}")
    for shape in args.shapes:
        for max_model_len in args.max_model_lens:
            for context in args.contexts:
                for rows in args.rows:
                    r = run_case(shape, rows, context, max_model_len, block_size, dtype, device)
                    results.append(r)
                    print(f"{shape:12} {rows:4d} {r['graph_rows']:5d} {context:5d} {max_model_len:7d} "
                          f"{r['grid_splits']:4d} {r['captured_live_splits']:4d}→{r['replay_live_splits']:<4d} "
                          f"{r['captured_us']:11.1f} {r['replay_us']:9.1f} "
                          f"{r['captured_gb_per_s']:6.0f}→{r['replay_gb_per_s']:<6.0f}", flush=True)
    for r in results:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
