"""The sampler on the GPU: the one-pass kernel (Gumbel-max) against the exponential race
in PyTorch operations, at Qwen3's vocabulary, temperature 0.6 (W1's), for batch sizes
1, 64 and 256, on the model's bf16 logits (what the engine hands the sampler) and on a
float32 copy. Per call: GPU time (CUDA events around calls queued behind a sleeping
kernel, so that the host's launching is not in it) and host time (launching, no sync).
The PyTorch path on bf16 logits includes the float32 copy it makes.

    PYTHONPATH=. python3 bench/sampling_bench.py --out $OUT/sampling_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton.testing

from ondo.engine.sampler import sample_on_device
from ondo.engine.sampling_params import SamplingParams


def host_ms(fn, repeat: int = 50) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e3 * t / repeat


def gpu_ms(fn, repeat: int = 20) -> float:
    """GPU time per call: the calls are queued behind a ~20 ms sleeping kernel, so the
    events time the GPU's work alone even where launching takes longer than running."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(40_000_000)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n in args.batch:
        narrow = torch.randn(n, args.vocab, device="cuda").bfloat16()
        params = [SamplingParams(temperature=args.temperature)] * n
        row = {"batch": n, "vocab": args.vocab}
        for dtype in ("bf16", "fp32"):
            logits = narrow if dtype == "bf16" else narrow.float()
            for name, flag in (("one_pass", "1"), ("torch", "0")):
                os.environ["ONDO_FUSED_SAMPLING"] = flag

                def call(logits=logits, params=params, n=n):
                    return sample_on_device(logits, params, [0] * n).tokens

                call()
                row[f"{name}_{dtype}_gpu_ms"] = gpu_ms(call)
                row[f"{name}_{dtype}_host_ms"] = host_ms(call)
                row[f"{name}_{dtype}_do_bench_ms"] = triton.testing.do_bench(call)
        os.environ.pop("ONDO_FUSED_SAMPLING")
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "temperature": args.temperature, "rows": rows}
    print(json.dumps({"sampling_bench": result}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
