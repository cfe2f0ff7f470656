"""The prefill kernel compiled for an H100/H200 (sm_90) with no GPU: its machine code's
size, registers, spills and matrix instructions, and a hash of the SASS with its
addresses left out, for each way of reading the step's own keys. Run against two
checkouts (`--tree`), equal hashes say a change to the kernel's source left its machine
code as it was. With `--tiles` (ONDO_PREFILL_TILES's labels) it compiles those launch
configurations instead, as the engine launches them on a Hopper GPU (bf16, the step's own
keys by tensor descriptors, decode rows skipped), for both shapes' head groups, and adds
how many programs an SM would hold by an H100's limits (`programs_per_sm`).

    python3 bench/prefill_sass.py [--tree DIR] [--decode-m 16] [--quick] [--out FILE]
    python3 bench/prefill_sass.py --tiles 64x64x4x3 128x32x8x3-r128 [--decode-m 16]
    git archive HEAD~1 ondo | tar -x -C /tmp/before && python3 bench/prefill_sass.py --tree /tmp/before

Needs Triton's bundled `nvdisasm` and `cuobjdump` (the `triton` wheel ships them); runs
on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("bf16", "fp16")
GROUPS = (2, 4)  # query heads per kv head: the 0.6B and 8B shapes


def signature(fn, constexprs: dict, dtype: str, new_kv: int) -> tuple[dict, dict, dict]:
    """Triton's signature, constants and alignment attributes for `_prefill_kernel`:
    pointers and strides multiples of 16, as the engine's are."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
            continue
        if name in ("desc_k", "desc_v") and new_kv == 2:
            sig[name] = f"tensordesc<{dtype}[{constexprs['BLOCK_N']}, {constexprs['HEAD_DIM']}]>"
            continue
        if name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "k_new_ptr", "v_new_ptr", "desc_k", "desc_v"):
            sig[name] = "*" + dtype
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "scale_log2e" else "i32"
        if name.endswith("_ptr") or name in ("desc_k", "desc_v") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def sass_summary(cubin: bytes, tools: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    lines = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in sass.splitlines()]  # addresses out
    instructions = [line for line in lines if line and not line.startswith((".", "//")) and not line.endswith(":")]
    regs = re.search(r"REG:(\d+)", usage)
    return {"instructions": len(instructions),
            "sass_hash": hashlib.sha256("\n".join(instructions).encode()).hexdigest()[:16],
            "registers": int(regs.group(1)) if regs else None,
            "spill_instructions": sum(("STL" in i or "LDL" in i) for i in instructions),
            "hgmma": sum("HGMMA" in i for i in instructions), "hmma": sum(" HMMA" in f" {i}" for i in instructions)}


# An H100's (sm_90) limits a multiprocessor: registers, shared memory a block may use plus
# the 1 KiB the driver reserves a block, warps, blocks.
SM_REGISTERS, SM_SHARED_BYTES, SM_RESERVED_BYTES, SM_WARPS, SM_BLOCKS = 65536, 233472, 1024, 64, 32


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many programs of this footprint one sm_90 multiprocessor holds at once:
    registers are given out a warp at a time, 256 at a time (a thread's count rounded up to
    8), shared memory a block at a time with its reserve."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    return min(SM_REGISTERS // (regs_per_warp * num_warps),
               SM_SHARED_BYTES // (shared_bytes + SM_RESERVED_BYTES), SM_WARPS // num_warps, SM_BLOCKS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]),
                    help="the checkout whose ondo/ is compiled (default: this one)")
    ap.add_argument("--decode-m", type=int, default=0, help="DECODE_M, where the kernel has it")
    ap.add_argument("--quick", action="store_true", help="bf16 at 2 query heads per kv head only")
    ap.add_argument("--tiles", nargs="+", metavar="LABEL",
                    help="compile these launch configurations (e.g. 64x64x4x3 128x32x8x3-r128)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ondo-sass-"))
    sys.path.insert(0, args.tree)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ondo.kernels import triton_attention as ta

    if not hasattr(ta._prefill_kernel, "arg_names"):
        ap.error("the kernels are Triton's interpreter's here: run without TRITON_INTERPRET")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    fn = ta._prefill_kernel
    rows = []
    if args.tiles:
        from ondo.kernels.prefill_tiles import parse_prefill_tiles

        try:
            configs = [parse_prefill_tiles(label) for label in args.tiles]
        except ValueError as e:
            ap.error(str(e))
        for tiles in configs:
            for group in GROUPS[:1] if args.quick else GROUPS:
                constexprs = dict(GROUP=group, GROUP_PAD=group, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16,
                                  BLOCK_M=max(tiles.block_m, group), BLOCK_N=tiles.block_n, SKIP_SINGLE=1,
                                  LONGEST_FIRST=False, NEW_KV=2, DOT_PRECISION="tf32", DECODE_M=args.decode_m)
                sig, consts, attrs = signature(fn, constexprs, "bf16", 2)
                kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                        options=tiles.launch_options())
                row = {"tiles": tiles.label, "group": group, "shared_bytes": kernel.metadata.shared,
                       **sass_summary(kernel.asm["cubin"], tools)}
                row["programs_per_sm"] = programs_per_sm(row["registers"], row["shared_bytes"], tiles.num_warps)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for new_kv in () if args.tiles else (0, 1, 2):
        for dtype in DTYPES[:1] if args.quick else DTYPES:
            for group in GROUPS[:1] if args.quick else GROUPS:
                constexprs = dict(GROUP=group, GROUP_PAD=group, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16,
                                  BLOCK_M=64, BLOCK_N=64, SKIP_SINGLE=0, LONGEST_FIRST=False, NEW_KV=new_kv,
                                  DOT_PRECISION="tf32")
                if "DECODE_M" in fn.arg_names:
                    constexprs["DECODE_M"] = args.decode_m
                sig, consts, attrs = signature(fn, constexprs, dtype, new_kv)
                kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": 4, "num_stages": 3})
                row = {"new_kv": new_kv, "dtype": dtype, "group": group, "shared_bytes": kernel.metadata.shared,
                       **sass_summary(kernel.asm["cubin"], tools)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"tree": args.tree, "triton": triton.__version__, "decode_m": args.decode_m, "tiles": args.tiles,
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
