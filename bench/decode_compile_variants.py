"""The decode kernels a start-up compiles for the decode CUDA graphs: one Triton compile per
distinct (constexprs, specialization of the integer arguments) across the ladder of graph
batch sizes, as Triton keys its cache (an integer is specialized as the constant 1, as a
multiple of 16, or not at all, unless the kernel lists it in `do_not_specialize`). Each
distinct variant is compiled for an H100/H200 (sm_90) here, with no GPU, and timed: what
the decode graphs' warm-ups spend compiling them on a cold start. `--threads N` compiles
them N at a time, as `ondo.kernels.precompile` does, and gives the wall time.

    python3 bench/decode_compile_variants.py [--model-shape qwen3-0.6b] [--out FILE]

`--old-rules` counts and compiles what the rules before 2026-12-04's change keyed: a graph
of batch 1 too, the split count specialized, the reduction's lanes per power of two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SM_COUNT = 132  # H100 SXM and H200
DOT_PRECISION = "ieee"  # bf16 inputs


def specialization(fn, name: str, value: int, old_rules: bool = False) -> str:
    """How Triton keys an integer argument: "1", "d16" (a multiple of 16) or "" (none)."""
    if name in _do_not_specialize(fn) and not old_rules:
        return ""
    return "1" if value == 1 else "d16" if value % 16 == 0 else ""


def _do_not_specialize(fn) -> set[str]:
    names = fn.arg_names
    return {names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}


def ladder_launches(heads: tuple[int, int], head_dim: int, max_num_seqs: int, max_model_len: int,
                    old_rules: bool = False) -> list[dict]:
    """The decode split kernel's and the reduction's launches of the decode graphs' warm-ups:
    per graph size, their constexprs and integer arguments that vary with the size."""
    import triton

    from ondo.engine.model_runner import decode_graph_sizes
    from ondo.kernels.decode_splits import decode_splits
    from ondo.kernels.triton_attention import reduce_splits_pad

    hq, hkv = heads
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64  # bf16, head_dim 128 (`_kv_tile_tokens`)
    launches = []
    sizes = decode_graph_sizes(max_num_seqs)
    for size in sorted({1, *sizes}) if old_rules else sizes:
        split_tokens, num_splits = decode_splits(size, hkv, max_model_len, block_n, SM_COUNT)
        launches.append({"kernel": "split", "size": size, "SPLIT": num_splits > 1,
                         "split_tokens": split_tokens, "num_splits": num_splits})
        if num_splits > 1:
            pad = triton.next_power_of_2(num_splits) if old_rules else reduce_splits_pad(num_splits)
            launches.append({"kernel": "reduce", "size": size, "SPLITS_PAD": pad,
                             "split_tokens": split_tokens, "num_splits": num_splits,
                             "NUM_Q_HEADS": hq, "HEAD_DIM": head_dim, "BLOCK_D": block_d})
    return launches


def variant_key(fn, launch: dict, old_rules: bool = False) -> tuple:
    const = tuple((k, v) for k, v in launch.items() if k.isupper())
    ints = tuple((k, specialization(fn, k, launch[k], old_rules)) for k in ("split_tokens", "num_splits"))
    return (launch["kernel"], const, ints)


def _arg_type(name: str) -> str:
    if name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "k_new_ptr", "v_new_ptr"):
        return "*bf16"
    if name.startswith("part_"):
        return "*fp32"
    if name == "slot_mapping_ptr":
        return "*i64"
    if name.endswith("_ptr"):
        return "*i32"
    return "fp32" if name == "scale_log2e" else "i32"


def compile_variant(fn, constexprs: dict[str, Any], ints: dict[str, str], num_warps: int, num_stages: int) -> float:
    """Seconds to compile `fn` for sm_90 with these constexprs; pointers and strides are
    multiples of 16 (as the engine's are); `ints` gives the other integers' specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs[name]
        elif ints.get(name) == "1":
            signature[name] = "constexpr"
            consts[(i,)] = 1
        else:
            signature[name] = _arg_type(name)
            aligned = ints[name] == "d16" if name in ints else name.endswith("_ptr") or name.startswith("stride")
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})
    return time.perf_counter() - t0


SHAPES = {"qwen3-0.6b": ((16, 8), 128), "llama3.1-8b": ((32, 8), 128)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--count-only", action="store_true", help="count the variants, compile none")
    ap.add_argument("--old-rules", action="store_true", help="the rules before 2026-12-04 (see above)")
    ap.add_argument("--threads", type=int, default=1,
                    help="compile the variants on this many threads at once (wall time in wall_s)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ondo-triton-"))  # cold
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from ondo.kernels import triton_attention as ta
    from ondo.kernels.decode_splits import decode_longest_first

    heads, head_dim = SHAPES[args.model_shape]
    kernels = {"split": ta._decode_split_kernel, "reduce": ta._decode_reduce_kernel}
    if not all(hasattr(fn, "do_not_specialize") for fn in kernels.values()):
        ap.error("the kernels are Triton's interpreter's here: run without TRITON_INTERPRET")
    launches = ladder_launches(heads, head_dim, args.max_num_seqs, args.max_model_len, args.old_rules)
    variants: dict[tuple, dict] = {}
    for launch in launches:
        variants.setdefault(variant_key(kernels[launch["kernel"]], launch, args.old_rules), launch)
    hq, hkv = heads
    if not args.count_only:
        # The first compile of a process also loads Triton's compiler: paid once, not counted.
        compile_variant(ta._decode_reduce_kernel, {"NUM_Q_HEADS": hq, "HEAD_DIM": head_dim,
                                                   "BLOCK_D": head_dim, "SPLITS_PAD": 2,
                                                   "SPLIT_TOKENS_FROM_PTR": False}, {}, 4, 1)
    def compile_one(key: tuple, launch: dict) -> dict:
        kernel = launch["kernel"]
        row = {"kernel": kernel, "first_size": launch["size"], "num_splits": launch["num_splits"],
               "key": repr(key[1:])}
        if args.count_only:
            return row
        ints = {k: v for k, v in key[2]}
        if kernel == "split":
            constexprs = {"NUM_Q_HEADS": hq, "GROUP": hq // hkv, "GROUP_PAD": max(16, hq // hkv),
                          "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_SIZE": 16, "BLOCK_N": 64,
                          "SPLIT": launch["SPLIT"], "SPLIT_TOKENS_FROM_PTR": launch["SPLIT"] and not args.old_rules,
                          "READ_FLAG": False, "HEADS_INNER": decode_longest_first(),
                          "DOT_PRECISION": DOT_PRECISION}
            row["compile_s"] = compile_variant(ta._decode_split_kernel, constexprs, ints, 4, 3)
        else:
            # The graphs read a split's tokens from the device (`graph_split_tokens`).
            constexprs = {**{k: launch[k] for k in ("NUM_Q_HEADS", "HEAD_DIM", "BLOCK_D", "SPLITS_PAD")},
                          "SPLIT_TOKENS_FROM_PTR": not args.old_rules}
            row["compile_s"] = compile_variant(ta._decode_reduce_kernel, constexprs, ints, 4, 1)
        return row

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.threads)) as pool:
        rows = list(pool.map(lambda kv: compile_one(*kv), variants.items()))
    wall_s = time.perf_counter() - t0
    for row in rows:
        print(f"{row['kernel']:<7} from batch {row['first_size']:>4}  splits {row['num_splits']:>2}  "
              f"{row.get('compile_s', float('nan')):6.2f} s  {row['key']}", flush=True)
    result = {"model_shape": args.model_shape, "old_rules": args.old_rules, "graph_sizes": sorted({x["size"] for x in launches}),
              "variants": {k: sum(r["kernel"] == k for r in rows) for k in kernels},
              "compile_s": sum(r.get("compile_s", 0.0) for r in rows), "threads": args.threads,
              "wall_s": 0.0 if args.count_only else wall_s, "rows": rows}
    print(json.dumps({"decode_compile_variants": result}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
