"""A layer's matmuls on their own: for a model shape's four GEMMs per layer (QKV, output
projection, gate-up, down) and the logits, at a ladder of row counts M, the time of
`F.linear` in bf16 against what its weights and FLOPs need at the copy bandwidth and
matmul rate measured in the same run (the throughput roofline's own measurement). This is where a decode step's non-attention time
goes: at M = 256 the 0.6B shape's four GEMMs took 28 µs a layer on an H200 where their
weights read in 7 µs (docs/benchmarks.md).

    PYTHONPATH=. python3 bench/gemm_bench.py --model-shape qwen3-0.6b --out $OUT/gemm_bench.json
    PYTHONPATH=. python3 bench/gemm_bench.py --autotune 64 256     # also Inductor's max-autotune
    PYTHONPATH=. python3 bench/gemm_bench.py --smoke               # CPU, tiny shape, timings meaningless

On CUDA each figure is the median of CUDA-event timings of a CUDA graph of 20 calls (the
launches are not in it, as in the engine's graphs). `--autotune M...` also times
`torch.compile(mode="max-autotune-no-cudagraphs")` of the same linear at those M (Triton
templates and cuBLAS, whichever Inductor picks for that exact size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ondo.bench.device_limits import measure_device_limits
from ondo.bench.graph_timing import graph_time_us
from ondo.bench.shapes import SHAPES

DEFAULT_ROWS = [1, 8, 32, 64, 128, 256, 512, 2048, 8192]
CALLS_PER_GRAPH = 20


def layer_gemms(shape: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of each matmul: input features, output features."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim", hidden // heads)
    return {
        "qkv": (hidden, (heads + 2 * kv_heads) * head_dim),
        "o": (heads * head_dim, hidden),
        "gate_up": (hidden, 2 * inter),
        "down": (inter, hidden),
        "logits": (hidden, shape["vocab_size"]),
    }


def time_us(fn: Callable[[], torch.Tensor], cuda: bool, repeat: int = 15) -> float:
    """Median microseconds per call: from a CUDA graph of CALLS_PER_GRAPH calls on CUDA,
    from the wall clock elsewhere."""
    return graph_time_us(fn, cuda, CALLS_PER_GRAPH, repeat)


def device_rates(device: torch.device) -> tuple[float, float]:
    """(copy bytes/s counting reads and writes, bf16 matmul FLOP/s): the roofline's own
    measurement (`ondo.bench.device_limits`); nominal figures on a CPU (smoke runs)."""
    if device.type != "cuda":
        return 1e10, 1e11
    limits = measure_device_limits(device)
    return limits.copy_bytes_per_s, limits.matmul_flops_per_s


def run(shape_name: str, rows: list[int], autotune: list[int], device: torch.device) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SHAPES[shape_name]
    copy_bps, flops = device_rates(device)
    result: dict = {"model_shape": shape_name, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "date": time.strftime("%Y-%m-%d"), "copy_gb_per_s": copy_bps / 1e9,
                    "matmul_tflop_per_s": flops / 1e12, "rows": []}
    layers = shape["num_hidden_layers"]
    for name, (k, n) in layer_gemms(shape).items():
        weight = torch.randn(n, k, dtype=dtype, device=device) * 0.02
        for m in rows:
            x = torch.randn(m, k, dtype=dtype, device=device)
            us = time_us(lambda x=x, weight=weight: F.linear(x, weight), cuda)
            nbytes = (n * k + m * k + m * n) * weight.element_size()
            bound_us = max(nbytes / copy_bps, 2 * m * n * k / flops) * 1e6
            row = {"gemm": name, "m": m, "k": k, "n": n, "us": us, "bound_us": bound_us,
                   "fraction_of_bound": bound_us / us, "weight_gb_per_s": n * k * weight.element_size() / us / 1e3}
            if m in autotune and cuda:
                compiled = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs",
                                         dynamic=False)
                row["autotuned_us"] = time_us(lambda x=x, weight=weight, c=compiled: c(x, weight), cuda)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    per_layer = {}
    for m in rows:
        sel = [r for r in result["rows"] if r["m"] == m and r["gemm"] != "logits"]
        per_layer[str(m)] = {"us": sum(r["us"] for r in sel), "bound_us": sum(r["bound_us"] for r in sel),
                             "step_ms": layers * sum(r["us"] for r in sel) / 1e3}
    result["per_layer"] = per_layer
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=DEFAULT_ROWS)
    ap.add_argument("--autotune", type=int, nargs="*", default=[],
                    help="row counts at which Inductor's max-autotune is timed too (CUDA only)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few row counts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if any(m < 1 for m in args.rows):
        ap.error(f"--rows must be positive: {args.rows}")
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.model_shape, args.rows, args.autotune = "tiny-llama", [1, 16], []
    result = run(args.model_shape, args.rows, args.autotune, torch.device("cuda" if cuda else "cpu"))
    for m, v in result["per_layer"].items():
        print(f"M={m:>5}: four GEMMs {v['us']:8.1f} us a layer (bound {v['bound_us']:7.1f}), "
              f"{v['step_ms']:6.2f} ms a step", flush=True)
    print(json.dumps({"gemm_bench": result}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
