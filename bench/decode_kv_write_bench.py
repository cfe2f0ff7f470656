"""A decode step's attention with the KV write as its own kernel (the default) against the
decode kernel storing the new K/V itself (`ONDO_DECODE_WRITES_KV=1`): each as a CUDA graph
of one call per layer (28 layers for the Qwen3-0.6B shape, 32 for Llama-3.1-8B's), at
W1-like batches, with K and V as views of the fused QKV output as the engine passes them.
Prints µs per layer and per step for both, and checks that both leave the same caches.

    python3 bench/decode_kv_write_bench.py [--out FILE]
    python3 bench/decode_kv_write_bench.py --smoke   # CPU (Triton's interpreter), tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def shapes(smoke: bool) -> list[dict]:
    """(name, layers, query heads, kv heads, head dim, rows, context)."""
    if smoke:
        return [{"name": "smoke", "layers": 2, "heads": (4, 2), "head_dim": 32, "rows": 3, "context": 40}]
    return [{"name": f"{model} decode {rows} x {context}", "layers": layers, "heads": (hq, 8),
             "head_dim": 128, "rows": rows, "context": context}
            for model, layers, hq in (("qwen3-0.6b", 28, 16), ("llama3.1-8b", 32, 32))
            for rows, context in ((16, 1024), (64, 1024), (256, 512), (256, 1024))]


def make_step(shape: dict, dtype, device: str):
    """A decode batch of `rows` sequences of `context` tokens, K and V of its new tokens as
    views of a fused QKV output."""
    import torch

    from ondo.kernels.testing import make_paged_batch

    hq, hkv = shape["heads"]
    d, rows = shape["head_dim"], shape["rows"]
    b = make_paged_batch([1] * rows, [shape["context"]] * rows, num_q_heads=hq, num_kv_heads=hkv,
                         head_dim=d, block_size=16, dtype=dtype, device=device, seed=0)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    qkv[:, hq * d:(hq + hkv) * d] = b.key.reshape(rows, -1)
    qkv[:, (hq + hkv) * d:] = b.value.reshape(rows, -1)
    key = qkv[:, hq * d:(hq + hkv) * d].view(rows, hkv, d)
    value = qkv[:, (hq + hkv) * d:].view(rows, hkv, d)
    return b, key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
    from ondo.bench.graph_timing import graph_time_us
    from ondo.kernels.triton_attention import paged_decode_attention_triton
    from ondo.kernels.triton_kv_write import write_kv_cache_triton

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rows_out = []
    for shape in shapes(args.smoke):
        b, key, value = make_step(shape, dtype, device)
        scale = shape["head_dim"] ** -0.5
        k_fused, v_fused = b.k_cache.clone(), b.v_cache.clone()

        def write_then_decode(b=b, key=key, value=value, scale=scale) -> None:
            write_kv_cache_triton(key, value, b.k_cache, b.v_cache, b.meta.slot_mapping)
            paged_decode_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale)

        def decode_writes(b=b, key=key, value=value, scale=scale, k=k_fused, v=v_fused) -> None:
            paged_decode_attention_triton(b.query, k, v, b.meta, scale, new_kv=(key, value))

        layers = shape["layers"]
        # A step: one call a layer, in one CUDA graph (µs per call times the layers).
        separate = layers * graph_time_us(write_then_decode, cuda, calls=layers, repeat=50)
        fused = layers * graph_time_us(decode_writes, cuda, calls=layers, repeat=50)
        same = torch.equal(b.k_cache, k_fused) and torch.equal(b.v_cache, v_fused)
        row = {"shape": shape["name"], "layers": layers, "write_then_decode_us": separate,
               "decode_writes_us": fused, "saved_us_per_step": separate - fused,
               "saved_us_per_layer": (separate - fused) / layers, "same_caches": same}
        rows_out.append(row)
        print(f"{shape['name']:<36} write+decode {separate:9.1f} µs  decode writing {fused:9.1f} µs  "
              f"saved {separate - fused:7.1f} µs/step ({(separate - fused) / layers:5.2f}/layer)  "
              f"caches {'equal' if same else 'DIFFER'}", flush=True)
        del b, key, value, k_fused, v_fused
        if cuda:
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "date": time.strftime("%Y-%m-%d"), "rows": rows_out}
    print(json.dumps({"decode_kv_write": result}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["same_caches"] for r in rows_out) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
