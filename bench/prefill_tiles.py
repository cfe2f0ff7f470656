"""The prefill attention kernel's launch configurations (`PrefillTiles`: rows per query
tile, K/V tokens per tile, warps, pipeline stages, whether each sequence's longest tiles
start first, and a cap on registers a thread) swept on W1's first step and W3's steps of both model shapes and a
chunk over a cached prefix: time and TFLOP/s of each, its largest
difference from the default configuration's output, and the fastest per step shape.
Configurations the GPU cannot hold (shared memory, registers) are recorded as such.

    python3 bench/prefill_tiles.py [--out FILE]
    python3 bench/prefill_tiles.py --mixed [--out FILE]   # W3's mixed step, its prompts, its decode rows
    python3 bench/prefill_tiles.py --mixed --tiles 64x64x4x3 128x32x8x3-r128   # these only
    python3 bench/prefill_tiles.py --smoke   # CPU (Triton's interpreter), tiny shapes

`--mixed` times fourteen configurations, as the engine launches the kernel (the step's own
keys read from its projections, every decode row kept in the prefill kernel), on W3's
mixed step in the scheduler's order (60 decode rows of ~2,050 tokens, then 4 prompts of
2,048), on its prompts alone and on its decode rows alone (beside one 64-token prompt),
for both shapes' heads; and the mixed step with its decode rows split off to the decode
kernel (`split_off_ms`). `--tiles` times the configurations its labels name
(ONDO_PREFILL_TILES's labels, `ondo.kernels.prefill_tiles`) instead.

The register caps (`-r128`, `-r168`) are there for occupancy: compiled for sm_90 with
Triton 3.6, 128 rows on 8 warps over 32-token K/V tiles take 144 registers a thread
uncapped (one program an SM) and 128 capped, without spills on the 0.6B shape's heads (two
programs an SM, each K/V tile feeding 128 rows instead of the default's 64); 256 rows on 16
warps at 128 fit one, each K/V tile feeding four times the default's rows; 64 rows on 4
warps over 32-token tiles at 168 fit three programs an SM (`bench/prefill_sass.py --tiles`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch


def w1_first_step(budget: int = 8192) -> list[int]:
    """The prompt tokens of W1's first step: its requests' prompts in order, the last one
    cut to the step's token budget (chunked prefill)."""
    from ondo.bench.workloads import make_workload

    lens = []
    for r in make_workload("W1", 151936).requests:
        n = min(len(r.prompt_token_ids), budget - sum(lens))
        if n <= 0:
            break
        lens.append(n)
    return lens


def step_shapes(smoke: bool) -> list[dict]:
    """(name, query lengths, context lengths, query heads, kv heads, head dim)."""
    if smoke:
        return [{"name": "smoke", "query_lens": [20, 7], "context_lens": [20, 39], "heads": (4, 2), "head_dim": 32}]
    w1 = w1_first_step()
    return [
        {"name": f"qwen3-0.6b W1 first step: {len(w1)} prompts, {sum(w1)} tokens", "query_lens": w1,
         "context_lens": w1, "heads": (16, 8), "head_dim": 128},
        {"name": "qwen3-0.6b W3: 4 x 2048", "query_lens": [2048] * 4, "context_lens": [2048] * 4,
         "heads": (16, 8), "head_dim": 128},
        {"name": "llama3.1-8b W3: 4 x 2048", "query_lens": [2048] * 4, "context_lens": [2048] * 4,
         "heads": (32, 8), "head_dim": 128},
        {"name": "qwen3-0.6b chunks: 4 x 512 over 2048", "query_lens": [512] * 4, "context_lens": [2048] * 4,
         "heads": (16, 8), "head_dim": 128},
    ]


def shape_batch(shape: dict, dtype: torch.dtype, device: str):
    """A paged batch of `shape` (see `step_shapes`), the new tokens' K/V already cached."""
    from ondo.kernels.testing import make_paged_batch

    hq, hkv = shape["heads"]
    b = make_paged_batch(shape["query_lens"], shape["context_lens"], num_q_heads=hq, num_kv_heads=hkv,
                         head_dim=shape["head_dim"], block_size=16, dtype=dtype, device=device)
    b.cache_new_kv()
    return b


def mixed_shapes(smoke: bool) -> list[dict]:
    """W3's mixed step in the scheduler's order (running sequences first), its prompts
    alone and its decode rows alone, for both shapes' heads."""
    if smoke:
        return [{"name": "smoke mixed", "query_lens": [1, 1, 20], "context_lens": [40, 37, 20], "heads": (4, 2),
                 "head_dim": 32}]
    decode_q, decode_c = [1] * 60, [2049 + i % 15 for i in range(60)]
    parts = {"mixed: 60 decode rows + 4 x 2048": (decode_q + [2048] * 4, decode_c + [2048] * 4),
             "prompts: 4 x 2048": ([2048] * 4, [2048] * 4),
             "decode rows: 60 + one 64-token prompt": (decode_q + [64], decode_c + [64])}
    return [{"name": f"{model} W3 {part}", "query_lens": q, "context_lens": c, "heads": heads, "head_dim": 128}
            for model, heads in (("qwen3-0.6b", (16, 8)), ("llama3.1-8b", (32, 8))) for part, (q, c) in parts.items()]


# Two programs an SM of 128 rows, one of 256 on 16 warps, three of 64 (see the module's text).
REGISTER_CAPPED = [(128, 32, 8, 3, False, 128), (128, 32, 8, 4, False, 128), (128, 16, 8, 4, False, 128),
                   (256, 32, 16, 2, False, 128), (64, 32, 4, 3, False, 168)]
MIXED_CANDIDATES = [(64, 64, 4, 3, False), (64, 64, 4, 2, False), (64, 32, 4, 3, False), (64, 128, 4, 2, False),
                    (128, 64, 8, 3, False), (128, 64, 8, 2, False), (128, 128, 8, 2, False), (128, 32, 8, 3, False),
                    (128, 64, 4, 2, False)] + REGISTER_CAPPED


def candidates(smoke: bool) -> list[tuple]:
    """(rows, K/V tokens, warps, stages, longest tiles first[, register cap]): every tile
    shape in grid order, the ones fastest on some step so far also started longest first,
    and the register-capped ones."""
    if smoke:
        return [(16, 32, 4, 1, False), (32, 16, 4, 1, False), (16, 32, 4, 1, True), (32, 16, 4, 1, False, 128)]
    grid_order = [(*c, False) for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
    return (grid_order + [(64, 64, 4, 3, True), (128, 128, 8, 3, True), (64, 32, 4, 2, True), (128, 32, 8, 3, True)]
            + REGISTER_CAPPED)


def flops(query_lens: list[int], context_lens: list[int], heads: int, head_dim: int) -> float:
    pairs = sum(q * c - q * (q - 1) / 2 for q, c in zip(query_lens, context_lens))
    return 4.0 * heads * head_dim * pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--mixed", action="store_true", help="W3's mixed step and its parts, as the engine launches it")
    ap.add_argument("--tiles", nargs="+", metavar="LABEL",
                    help="only these configurations (ONDO_PREFILL_TILES's labels, e.g. 128x32x8x3-r128)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
    from ondo.bench.launch_sweep import fastest, time_config, write_sweep
    from ondo.kernels.prefill_tiles import PrefillTiles, parse_prefill_tiles
    from ondo.kernels.triton_attention import paged_prefill_attention_triton, prefill_tiles

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    results = []
    shapes = mixed_shapes(args.smoke) if args.mixed else step_shapes(args.smoke)
    configs = MIXED_CANDIDATES if args.mixed and not args.smoke else candidates(args.smoke)
    if args.tiles:
        try:
            configs = [tuple(parse_prefill_tiles(label)) for label in args.tiles]
        except ValueError as e:
            ap.error(str(e))
    for shape in shapes:
        hq = shape["heads"][0]
        d = shape["head_dim"]
        b = shape_batch(shape, dtype, device)
        scale = d ** -0.5
        default = prefill_tiles(b.query, b.k_cache)
        # As the engine launches it with --mixed: the step's own keys from its projections,
        # and every decode row in the prefill kernel.
        kwargs = {"key": b.key, "value": b.value, "split_decode_rows": False} if args.mixed else {}
        expect = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale, **kwargs).float()
        f = flops(shape["query_lens"], shape["context_lens"], hq, d)
        rows = []
        for config in configs:
            tiles = PrefillTiles(*config)
            row: dict[str, object] = {**tiles._asdict(), "label": tiles.label, "default": tiles == default}

            def run(b=b, scale=scale, tiles=tiles, kwargs=kwargs):
                return paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale, tiles=tiles,
                                                      **kwargs)

            def check(run=run, expect=expect) -> dict:
                return {"max_abs_diff": (run().float() - expect).abs().max().item()}

            ms = time_config(row, run, check, cuda)
            if ms is not None:
                row.update(ms=ms, tflops=f / ms / 1e9)
            rows.append(row)
        best, base = fastest(rows, "ms")
        results.append({"shape": shape["name"], "default": default._asdict(), "best": best, "rows": rows})
        if args.mixed and "mixed" in shape["name"] and cuda:
            import triton.testing

            results[-1]["split_off_ms"] = triton.testing.do_bench(
                lambda b=b, scale=scale, kwargs=kwargs: paged_prefill_attention_triton(
                    b.query, b.k_cache, b.v_cache, b.meta, scale, **{**kwargs, "split_decode_rows": True}))
        print(f"{shape['name']}: default {default} "
              + (f"{base['ms']:.3f} ms ({base['tflops']:.0f} TFLOP/s)" if base else "not timed")
              + f"; fastest {tuple(best[k] for k in PrefillTiles._fields)} "
              f"{best['ms']:.3f} ms ({best['tflops']:.0f} TFLOP/s), max diff {best['max_abs_diff']:.4f}; "
              f"{sum('error' in r for r in rows)} configurations did not run", flush=True)
    write_sweep("prefill_tiles", cuda, results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
