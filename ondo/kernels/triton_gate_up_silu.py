"""The MLP's gate/up projection with SiLU-and-mul in its epilogue: out = silu(x Wg^T) * (x Wu^T)
as one Triton matmul, so that the [T, 2 I] projection never goes to memory.

In W3's step on an H100 (docs/benchmarks.md) cuBLAS's gate/up matmul takes 147 µs a layer
at 8,192 tokens and Inductor's SiLU-and-mul kernel 50 µs more, at the copy rate: it reads
the projection's 100 MB back and writes 50 MB. Here a program computes a [BLOCK_M,
BLOCK_N] tile of the output from two accumulators, the gate's columns and the same
columns of up (rows n and I + n of the weight, which holds gate's rows then up's), and
stores only their product. Tensor descriptors (TMA) load the tiles: a GPU of compute
capability 9 or more; Triton's interpreter runs them on the CPU.

Rounding as the compiled regions round today: each projection rounded to the model's
dtype (cuBLAS's output), SiLU and the product in float32, rounded once.

Steps under `GATE_UP_SILU_MIN_TOKENS` tokens (decode) take cuBLAS's matmul and
`silu_and_mul_triton`, one elementwise kernel with the same rounding (what Inductor
generates for that pass), so that the operator, not the compiled region, picks the path.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ondo.kernels.gate_up_silu import gate_up_persistent
from ondo.kernels.launch import device_sm_count, launch
from ondo.kernels.switches import labelled

log = logging.getLogger(__name__)


class GateUpTiles(NamedTuple):
    block_m: int  # tokens per tile
    block_n: int  # output columns per tile (each needs gate's and up's)
    block_k: int  # hidden size per step of the loop
    group_m: int  # row tiles walked together, so their weight tiles stay in L2
    num_warps: int
    num_stages: int
    # 0: a program a tile; k > 0: k programs an SM, each walking tiles (a persistent grid).
    programs_per_sm: int = 0
    warp_specialize: bool = False  # persistent only: loads and dots in partitions of their own

    @property
    def label(self) -> str:
        """The tiles as a bench names them: 128x64x64x8x4x4, then -p1 (persistent, a
        program an SM) and -ws (warp-specialized) where set."""
        name = "x".join(map(str, self[:6]))
        if self.programs_per_sm:
            name += f"-p{self.programs_per_sm}"
        return name + ("-ws" if self.warp_specialize else "")


# Two 128 x 64 float32 accumulators on 4 warps (128 registers a thread for them) and four
# stages of 32 KB of shared memory: the fastest of `bench/gate_up_silu_bench.py`'s sweep on
# an H100 at every size of both shapes but one (docs/benchmarks.md).
DEFAULT_TILES = GateUpTiles(128, 64, 64, 8, 4, 4)
# A persistent grid, a program an SM walking 128 x 128 output tiles (two 128 x 128
# accumulators on 8 warps), its loads and dots in partitions of their own (Triton's warp
# specialization; unless ONDO_GATE_UP_PERSISTENT=0): on an H200 the fastest of the sweep on both shapes wherever the output
# has two waves of tiles over the SMs or more, 17 % under `DEFAULT_TILES` at 8,192 tokens
# of the 0.6B shape and 10 % under cuBLAS + SiLU-and-mul on the 8B shape (docs/benchmarks.md).
PERSISTENT_TILES = GateUpTiles(128, 128, 64, 8, 8, 3, 1, True)

GATE_UP_TILES_ENV = "ONDO_GATE_UP_TILES"


def parse_tiles(label: str) -> GateUpTiles:
    """The tiles a `GateUpTiles.label` names (e.g. 128x64x64x8x4x4-p1-ws); anything else is
    refused with what was expected."""
    head, *flags = label.split("-")
    fields = head.split("x")
    persistent = [f for f in flags if f.startswith("p")]
    try:
        if (len(fields) != 6 or len(persistent) > 1 or set(flags) - set(persistent) - {"ws"}
                or flags.count("ws") > 1):
            raise ValueError
        tiles = GateUpTiles(*map(int, fields), int(persistent[0][1:]) if persistent else 0, "ws" in flags)
    except ValueError:
        raise ValueError(f"{label!r} is not block_m x block_n x block_k x group_m x warps x stages "
                         "with an optional -pK (K programs an SM) and -ws, e.g. 128x64x64x8x4x4-p1") from None
    powers = (tiles.block_m, tiles.block_n, tiles.block_k, tiles.num_warps)
    if any(v < 1 or v & (v - 1) for v in powers) or min(tiles.group_m, tiles.num_stages) < 1:
        raise ValueError(f"{label!r}: tile sizes and warps must be powers of two, group and stages 1 or more")
    if tiles.warp_specialize and not tiles.programs_per_sm:
        raise ValueError(f"{label!r}: -ws needs a persistent grid (-pK)")
    return tiles


def configured_tiles() -> GateUpTiles | None:
    """The fused kernel's tiles as ONDO_GATE_UP_TILES names them (a `GateUpTiles.label`),
    to tune another GPU; None when unset."""
    return labelled(GATE_UP_TILES_ENV, parse_tiles)


def warp_specialization_available() -> bool:
    """Whether this Triton takes `tl.range(..., warp_specialize=True)` (3.4 and later), and
    has compiled it whenever asked in this process."""
    return not _WARP_SPECIALIZATION_REFUSED and _range_takes_warp_specialize()


@functools.cache
def _range_takes_warp_specialize() -> bool:
    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


_WARP_SPECIALIZATION_REFUSED: list[str] = []  # why this Triton failed to compile it, once


def persistent_tiles(num_tokens: int, intermediate: int, num_sms: int) -> GateUpTiles:
    """The tiles with the persistent grid on (the default): `PERSISTENT_TILES` where the output's
    128 x 128 tiles make two waves over the SMs or more (and this Triton warp-specializes);
    `DEFAULT_TILES` under that, where the persistent grid's last wave leaves SMs idle: on an
    H200 at 1,024 tokens of the 0.6B shape (192 tiles on 132 SMs) it took 28.9 µs against
    25.1, at 2,048 (384 tiles) 43.2 against 51.7."""
    tiles = triton.cdiv(num_tokens, PERSISTENT_TILES.block_m) * triton.cdiv(intermediate, PERSISTENT_TILES.block_n)
    if tiles >= 2 * num_sms and warp_specialization_available():
        return PERSISTENT_TILES
    return DEFAULT_TILES


def persistent_min_tokens(intermediate: int, num_sms: int) -> int:
    """The fewest tokens from which `persistent_tiles` takes the persistent grid: the first
    count whose 128-row tiles, times the output's 128-column tiles, make two waves over the
    SMs (1,281 on the 0.6B shape's 3,072 columns and 132 SMs: 11 x 24 tiles)."""
    rows = triton.cdiv(2 * num_sms, triton.cdiv(intermediate, PERSISTENT_TILES.block_n))
    return (rows - 1) * PERSISTENT_TILES.block_m + 1


@triton.jit
def _tile_origin(tile, num_tokens, intermediate, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(first row, first column) of output tile `tile`: tiles in groups of GROUP_M row tiles
    that walk the columns together, so their weight tiles stay in L2."""
    tiles_m = tl.cdiv(num_tokens, BLOCK_M)
    tiles_n = tl.cdiv(intermediate, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return (first_m + (tile % per_group) % group_rows) * BLOCK_M, ((tile % per_group) // group_rows) * BLOCK_N


@triton.jit
def _silu_and_mul_store(out_desc, m0, n0, gate, up):
    """silu(gate) * up into the output tile at (m0, n0): each projection rounded to the
    output's dtype first, as cuBLAS rounds it, SiLU and the product in float32."""
    dtype = out_desc.dtype
    g = gate.to(dtype).to(tl.float32)
    u = up.to(dtype).to(tl.float32)
    # Columns past I (a last tile that reads into up's rows) are clipped by the store.
    out_desc.store([m0, n0], (g / (1.0 + tl.exp(-g)) * u).to(dtype))


@triton.jit
def _gate_up_silu_kernel(
    x_desc,  # [T, H]
    w_desc,  # [2 I, H]: gate's rows, then up's
    out_desc,  # [T, I]
    num_tokens,
    intermediate,  # I
    hidden,  # H
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """A program an output tile; or, PERSISTENT, a grid of a few programs an SM, each
    walking the tiles program_id, program_id + programs, ...: the next tile's loads start
    while this one's epilogue runs, and no program waits to be scheduled."""
    if PERSISTENT:
        num_tiles = tl.cdiv(num_tokens, BLOCK_M) * tl.cdiv(intermediate, BLOCK_N)
        k_steps = tl.cdiv(hidden, BLOCK_K)
        # Flattened, the tile loop and the K loop pipeline as one; on Hopper a
        # warp-specialized loop is not flattened.
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0),
                             flatten=not WARP_SPECIALIZE, warp_specialize=WARP_SPECIALIZE):
            m0, n0 = _tile_origin(tile, num_tokens, intermediate, BLOCK_M, BLOCK_N, GROUP_M)
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(k_steps):
                x = x_desc.load([m0, k * BLOCK_K])
                gate = tl.dot(x, w_desc.load([n0, k * BLOCK_K]).T, gate)
                up = tl.dot(x, w_desc.load([intermediate + n0, k * BLOCK_K]).T, up)
            _silu_and_mul_store(out_desc, m0, n0, gate, up)
    else:
        m0, n0 = _tile_origin(tl.program_id(0), num_tokens, intermediate, BLOCK_M, BLOCK_N, GROUP_M)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            x = x_desc.load([m0, k0])
            gate = tl.dot(x, w_desc.load([n0, k0]).T, gate)
            up = tl.dot(x, w_desc.load([intermediate + n0, k0]).T, up)
        _silu_and_mul_store(out_desc, m0, n0, gate, up)


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [T, 2 I], rows contiguous: gate's columns, then up's
    out_ptr,  # [T, I]
    intermediate,  # I
    BLOCK: tl.constexpr,
):
    # The token count is only the grid's: no compiled variant per batch size.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    src = gate_up_ptr + row * 2 * intermediate
    g = tl.load(src + cols, mask=mask).to(tl.float32)
    u = tl.load(src + intermediate + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * intermediate + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


SILU_AND_MUL_BLOCK = 1024


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, [T, I], from the gate/up projection [T, 2 I] (gate's columns, then
    up's) in one pass: SiLU and the product in float32, rounded once."""
    if gate_up.ndim != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
        raise ValueError(f"gate_up {tuple(gate_up.shape)} (strides {gate_up.stride()}) is not a contiguous [T, 2 I]")
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((num_tokens, intermediate))
    if num_tokens == 0:
        return out
    launch(_silu_and_mul_kernel, (num_tokens, triton.cdiv(intermediate, SILU_AND_MUL_BLOCK)),
           gate_up, out, intermediate, BLOCK=SILU_AND_MUL_BLOCK, num_warps=4)
    return out


def tma_ready(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether tensor descriptors can read these: a CUDA GPU of capability 9 or more (or
    Triton's interpreter on the CPU), 16-byte aligned rows."""
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (x, weight)) and (weight.shape[0] // 2 * x.element_size()) % 16 == 0


def gate_up_silu_triton(x: torch.Tensor, weight: torch.Tensor, tiles: GateUpTiles | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T), [T, I], from x [T, H] and weight [2 I, H], at `tiles`;
    unless given, ONDO_GATE_UP_TILES's, else `persistent_tiles` for this size (unless
    ONDO_GATE_UP_PERSISTENT=0), else `DEFAULT_TILES`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    chosen = tiles or configured_tiles()

    num_tokens, hidden = x.shape
    if weight.ndim != 2 or weight.shape[1] != hidden or weight.shape[0] % 2 or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} is not [2 I, {hidden}] {x.dtype}")
    if not tma_ready(x, weight):
        raise ValueError(f"x {tuple(x.shape)} (strides {x.stride()}) and weight {tuple(weight.shape)} "
                         "cannot be read by tensor descriptors: rows of 16-byte multiples on a GPU "
                         "of compute capability 9 or more")
    intermediate = weight.shape[0] // 2
    out = x.new_empty((num_tokens, intermediate))
    if num_tokens == 0:
        return out
    if chosen is not None or not gate_up_persistent():
        _launch(x, weight, out, chosen or DEFAULT_TILES, TensorDescriptor)
        return out
    tiles = persistent_tiles(num_tokens, intermediate, _num_sms(x))
    try:
        _launch(x, weight, out, tiles, TensorDescriptor)
    except (triton.CompilationError, RuntimeError) as e:
        if not tiles.warp_specialize or not _refused_at_compile(e):
            raise
        # A Triton that has the option but cannot compile it for this GPU: the
        # non-persistent tiles from now on (the first call of a size is a warm-up's).
        _WARP_SPECIALIZATION_REFUSED.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        log.warning("the gate/up kernel's warp-specialized tiles did not compile (%s); taking %s",
                    _WARP_SPECIALIZATION_REFUSED[0], DEFAULT_TILES.label)
        _launch(x, weight, out, DEFAULT_TILES, TensorDescriptor)
    return out


def _refused_at_compile(e: Exception) -> bool:
    """Whether `e` is Triton's compiler refusing the kernel, not a fault of the launch."""
    return isinstance(e, triton.CompilationError) or "PassManager::run failed" in str(e)


def _launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, tiles: GateUpTiles, TensorDescriptor) -> None:
    num_tokens, hidden = x.shape
    intermediate = out.shape[1]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    descriptors = (TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
                   TensorDescriptor.from_tensor(out, [bm, bn]))
    num_tiles = triton.cdiv(num_tokens, bm) * triton.cdiv(intermediate, bn)
    programs = num_tiles
    if tiles.programs_per_sm:
        programs = min(num_tiles, tiles.programs_per_sm * _num_sms(x))
    launch(_gate_up_silu_kernel, (programs,), *descriptors, num_tokens, intermediate, hidden,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=tiles.group_m, PERSISTENT=bool(tiles.programs_per_sm),
           WARP_SPECIALIZE=tiles.warp_specialize, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _num_sms(x: torch.Tensor) -> int:
    """SMs of x's GPU; on the CPU (Triton's interpreter) a few, so a persistent grid walks
    several tiles a program."""
    return device_sm_count(x.device.index or 0) if x.is_cuda else 2
