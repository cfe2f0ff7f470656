"""The KV-cache write's launch configurations (`KVWriteTiles`: one program per (token, kv
head), or a few tokens a program with all their kv heads) on a W3 prefill step (8,192
tokens) and a W1 decode step (256 tokens), with K and V as views of each shape's fused
QKV projection and slots in shuffled blocks, as the engine writes them: time, bandwidth
(K and V read and written), and whether the caches equal the reference writer's.

    python3 bench/kv_write_bench.py [--out FILE]
    python3 bench/kv_write_bench.py --smoke   # CPU (Triton's interpreter), tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def step_shapes(smoke: bool) -> list[dict]:
    """(name, tokens, query heads, kv heads, head dim)."""
    if smoke:
        return [{"name": "smoke", "tokens": 37, "heads": (4, 2), "head_dim": 32}]
    return [
        {"name": f"{model} {step}", "tokens": tokens, "heads": (hq, 8), "head_dim": 128}
        for model, hq in (("qwen3-0.6b", 16), ("llama3.1-8b", 32))
        for step, tokens in (("W3 step: 8192 tokens", 8192), ("decode step: 256 tokens", 256))
    ]


def candidates(smoke: bool) -> list[tuple[int, int]]:
    if smoke:
        return [(0, 1), (1, 4), (4, 4)]
    return [(0, 1), (0, 2), (0, 4), (1, 2), (1, 4), (2, 4), (4, 4), (4, 8), (8, 8)]


def make_step(tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, device: str,
              block_size: int = 16) -> tuple[torch.Tensor, ...]:
    """K and V as views of a fused QKV output, a cache twice the step's size, and each
    token's slot in a shuffled block."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype=dtype, device=device)
    key = qkv[:, hq * head_dim:(hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    value = qkv[:, (hq + hkv) * head_dim:].view(tokens, hkv, head_dim)
    num_blocks = 2 * (tokens // block_size + 1)
    blocks = torch.randperm(num_blocks, generator=gen)[: tokens // block_size + 1]
    t = torch.arange(tokens)
    slots = (blocks[t // block_size] * block_size + t % block_size).to(device)
    k_cache = torch.zeros(num_blocks, block_size, hkv, head_dim, dtype=dtype, device=device)
    return key, value, k_cache, k_cache.clone(), slots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
    from ondo.bench.launch_sweep import fastest, time_config, write_sweep
    from ondo.kernels.reference import write_kv_cache_ref
    from ondo.kernels.triton_kv_write import KVWriteTiles, kv_write_tiles, write_kv_cache_triton

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    results = []
    for shape in step_shapes(args.smoke):
        _, hkv = shape["heads"]
        d = shape["head_dim"]
        key, value, k_cache, v_cache, slots = make_step(shape["tokens"], shape["heads"], d, dtype, device)
        expect_k, expect_v = k_cache.clone(), v_cache.clone()
        write_kv_cache_ref(key, value, expect_k, expect_v, slots)
        moved = 4 * shape["tokens"] * hkv * d * key.element_size()  # K and V, read and written
        default = kv_write_tiles(d, shape["tokens"])
        rows = []
        for config in candidates(args.smoke):
            tiles = KVWriteTiles(*config)
            row: dict[str, object] = {**tiles._asdict(), "default": tiles == default}
            k_cache.zero_()
            v_cache.zero_()

            def run(tiles=tiles, key=key, value=value, k_cache=k_cache, v_cache=v_cache, slots=slots):
                write_kv_cache_triton(key, value, k_cache, v_cache, slots, tiles=tiles)

            def check(run=run, k_cache=k_cache, v_cache=v_cache, expect_k=expect_k, expect_v=expect_v) -> dict:
                run()
                return {"equal": bool(torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v))}

            ms = time_config(row, run, check, cuda)
            if ms is not None:
                row.update(us=ms * 1e3, gb_per_s=moved / ms / 1e6)
            rows.append(row)
        best, base = fastest(rows, "us")
        results.append({"shape": shape["name"], "default": default._asdict(), "best": best, "rows": rows})
        print(f"{shape['name']}: default {tuple(default)} "
              + (f"{base['us']:.1f} us ({base['gb_per_s']:.0f} GB/s)" if base else "not timed")
              + f"; fastest {(best['tokens'], best['num_warps'])} {best['us']:.1f} us "
              f"({best['gb_per_s']:.0f} GB/s); {sum(not r.get('equal', False) for r in rows)} "
              f"configurations differ from the reference or did not run", flush=True)
    write_sweep("kv_write", cuda, results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
