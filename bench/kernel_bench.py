"""Decode attention bandwidth: the Triton paged kernel vs a plain copy and vs SDPA.

    python3 bench/kernel_bench.py --out decode_bench.json        # on a GPU
    python3 bench/kernel_bench.py --smoke --out /tmp/smoke.json  # CPU, Triton interpreter

Decode reads each sequence's whole K/V once per step, so its speed is a bandwidth:
KV bytes read / kernel time, timed both as a plain Python call (Triton's launch
cost included) and replayed from a CUDA graph (GPU time only). The ceiling is what the GPU reaches copying a large
tensor (bytes read + bytes written / time). SDPA runs on contiguous K/V of the same
shapes, i.e. without the block-table indirection, as a second yardstick.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs,
median of repeats); on CPU ``time.perf_counter`` around a few calls (smoke only, the
numbers mean nothing). Prints a table, then the whole result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F  # noqa: E402
from triton import next_power_of_2 as triton_next_power_of_2  # noqa: E402

from ondo.kernels.decode_splits import decode_split_tokens  # noqa: E402
from ondo.kernels.metadata import AttentionMetadata  # noqa: E402
from ondo.kernels.triton_attention import (  # noqa: E402
    _kv_tile_tokens,
    _sm_count,
    paged_attention_triton,
)

GiB = 1 << 30


def time_ms(fn, on_cuda: bool) -> float:
    if on_cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # first call compiles / warms the interpreter
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gb_s(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy of one large tensor, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device.type == "cuda")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def decode_batch(
    batch: int, context: int, heads: tuple[int, int], head_dim: int, block_size: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Every sequence at ``context`` tokens, its blocks scattered over the cache."""
    num_q_heads, num_kv_heads = heads
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
    v_cache = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, -1)
    query = torch.randn(batch, num_q_heads, head_dim, dtype=torch.bfloat16, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),  # unused here
        block_tables=tables,
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        max_query_len=1,
        max_context_len=context,
        block_size=block_size,
    )
    return query, k_cache, v_cache, meta


def run_triton(batch, context, heads, head_dim, block_size, device, on_cuda):
    """(time_ms, num_splits) of the paged decode kernel; the cache is freed on return."""
    query, k_cache, v_cache, meta = decode_batch(
        batch, context, heads, head_dim, block_size, device
    )
    block_n, _ = _kv_tile_tokens(k_cache, triton_next_power_of_2(head_dim))
    split = decode_split_tokens(batch, heads[1], context, block_n, _sm_count(query))
    scale = head_dim**-0.5

    def step():
        return paged_attention_triton(query, k_cache, v_cache, meta, scale)

    ms = time_ms(step, on_cuda)
    graph_ms = None
    if on_cuda:
        try:
            graph_ms = time_ms(cuda_graph_of(step).replay, on_cuda)
        except RuntimeError as e:  # keep the plain timings if capture fails
            print(f"CUDA graph capture failed ({batch}x{context}): {e}", file=sys.stderr)
    return ms, graph_ms, math.ceil(context / split)


def cuda_graph_of(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, as the engine runs decode: no Python launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def run_sdpa(batch, context, heads, head_dim, device, on_cuda) -> float | None:
    num_q_heads, num_kv_heads = heads
    try:
        q = torch.randn(batch, num_q_heads, 1, head_dim, dtype=torch.bfloat16, device=device)
        shape = (batch, num_kv_heads, context, head_dim)
        k = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
        v = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
        return time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), on_cuda)
    except torch.OutOfMemoryError:
        return None
    finally:
        if on_cuda:
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    args = parser.parse_args()

    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    if args.smoke:
        batches, contexts = [1, 2], [32, 600]  # 600: the split path runs
        heads, head_dim, block_size = (4, 2), 64, 16
        copy_bytes = 64 << 20
    else:
        batches, contexts = [1, 16, 64, 256], [512, 2048, 8192, 32768]
        heads, head_dim, block_size = (32, 8), 128, 16
        copy_bytes = 4 * GiB
    elem = 2  # bf16
    memory_bytes = torch.cuda.get_device_properties(0).total_memory if on_cuda else 8 * GiB

    copy_gb_s = copy_bandwidth_gb_s(device, copy_bytes)
    rows = []
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * heads[1] * head_dim * elem
            row = {"batch": batch, "context_tokens": context, "kv_bytes": kv_bytes}
            rows.append(row)
            if kv_bytes > 0.45 * memory_bytes:  # SDPA needs its own contiguous copy
                row["skipped"] = "KV cache larger than 45% of device memory"
                continue
            ms, graph_ms, num_splits = run_triton(
                batch, context, heads, head_dim, block_size, device, on_cuda
            )
            if on_cuda:
                torch.cuda.empty_cache()
            sdpa_ms = run_sdpa(batch, context, heads, head_dim, device, on_cuda)
            row.update(
                num_splits=num_splits,
                triton_time_ms=ms,
                triton_gb_s=kv_bytes / (ms * 1e-3) / 1e9,
                triton_graph_time_ms=graph_ms,
                triton_graph_gb_s=None if graph_ms is None else kv_bytes / (graph_ms * 1e-3) / 1e9,
                sdpa_time_ms=sdpa_ms,
                sdpa_gb_s=None if sdpa_ms is None else kv_bytes / (sdpa_ms * 1e-3) / 1e9,
            )
            row["triton_fraction_of_copy"] = row["triton_gb_s"] / copy_gb_s

    name = torch.cuda.get_device_name(0) if on_cuda else "cpu (Triton interpreter)"
    print(f"device: {name}   copy bandwidth: {copy_gb_s:.0f} GB/s (read + write)")
    print(
        f"decode bf16, {heads[0]} q heads / {heads[1]} kv heads / head dim {head_dim}, "
        f"block size {block_size}, shuffled block tables"
    )
    header = (
        f"{'batch':>6} {'context':>8} {'splits':>6} {'triton ms':>10} {'GB/s':>8} {'% copy':>7}"
        f" {'graph ms':>9} {'GB/s':>8} {'sdpa ms':>9} {'GB/s':>8}"
    )
    print(header)
    for r in rows:
        if "skipped" in r:
            print(f"{r['batch']:>6} {r['context_tokens']:>8}   skipped: {r['skipped']}")
            continue
        sdpa = (
            f"{r['sdpa_time_ms']:>9.3f} {r['sdpa_gb_s']:>8.0f}"
            if r["sdpa_time_ms"] is not None
            else f"{'OOM':>9} {'-':>8}"
        )
        graph = (
            f"{r['triton_graph_time_ms']:>9.3f} {r['triton_graph_gb_s']:>8.0f}"
            if r["triton_graph_time_ms"] is not None
            else f"{'-':>9} {'-':>8}"
        )
        print(
            f"{r['batch']:>6} {r['context_tokens']:>8} {r['num_splits']:>6} "
            f"{r['triton_time_ms']:>10.3f} {r['triton_gb_s']:>8.0f} "
            f"{100 * r['triton_fraction_of_copy']:>6.1f}% {graph} {sdpa}"
        )
    result = {
        "benchmark": "decode_attention_bandwidth",
        "device": name,
        "torch": torch.__version__,
        "timer": "triton.testing.do_bench median (CUDA events)" if on_cuda else "perf_counter",
        "dtype": "bfloat16",
        "num_q_heads": heads[0],
        "num_kv_heads": heads[1],
        "head_dim": head_dim,
        "block_size": block_size,
        "copy_gb_s": copy_gb_s,
        "rows": rows,
    }
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
