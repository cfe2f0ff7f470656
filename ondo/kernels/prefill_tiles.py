"""The prefill attention kernel's launch configuration (`PrefillTiles`), and the variable
that names another one for the engine (ONDO_PREFILL_TILES), to tune a GPU.

A label reads rows x K/V tokens x warps x stages, with an optional register cap a thread
(`-rR`, ptxas's `maxnreg`): `128x32x8x3-r128` is 128 query rows on 8 warps, K/V tiles of
32 tokens in three pipeline stages, at most 128 registers a thread. The cap is what lets a
128-row tile run two programs an SM (2 x 256 threads x 128 registers fill the register
file), each K/V tile then feeding twice the rows of the default 64-row tile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from ondo.kernels.switches import labelled

PREFILL_TILES_ENV = "ONDO_PREFILL_TILES"
MIN_REGISTERS, MAX_REGISTERS = 24, 255  # what ptxas takes as a cap a thread


class PrefillTiles(NamedTuple):
    """The prefill kernel's launch configuration."""

    block_m: int  # rows per query tile: (token, head-in-group) pairs
    block_n: int  # K/V tokens per tile
    num_warps: int
    num_stages: int
    longest_first: bool = False  # each sequence's last (longest) query tiles start first
    max_registers: int = 0  # registers a thread at most (Triton's maxnreg); 0: the compiler's choice

    @property
    def label(self) -> str:
        """The tiles as ONDO_PREFILL_TILES and the benches name them: 64x64x4x3, then
        -rR where the registers are capped (longest-first has its own switch)."""
        name = "x".join(map(str, self[:4]))
        return name + (f"-r{self.max_registers}" if self.max_registers else "")

    def launch_options(self) -> dict[str, int]:
        """The compiler options a launch passes: warps, stages, and the cap where set (so
        that tiles without one compile exactly as before it existed)."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.max_registers:
            options["maxnreg"] = self.max_registers
        return options


def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@functools.lru_cache(maxsize=8)
def parse_prefill_tiles(label: str) -> PrefillTiles:
    """The tiles a `PrefillTiles.label` names (e.g. 128x32x8x3-r128); anything else is
    refused with what was expected."""
    head, *flags = label.split("-")
    fields = head.split("x")
    try:
        if len(fields) != 4 or len(flags) > 1 or (flags and not flags[0].startswith("r")):
            raise ValueError
        tiles = PrefillTiles(*map(int, fields), max_registers=int(flags[0][1:]) if flags else 0)
    except ValueError:
        raise ValueError(f"{label!r} is not rows x kv_tokens x warps x stages with an optional -rR "
                         "(at most R registers a thread), e.g. 64x64x4x3 or 128x32x8x3-r128") from None
    if not (16 <= tiles.block_m <= 256 and 16 <= tiles.block_n <= 256
            and _power_of_two(tiles.block_m) and _power_of_two(tiles.block_n)):
        raise ValueError(f"{label!r}: rows and K/V tokens must be powers of two from 16 to 256")
    if not (_power_of_two(tiles.num_warps) and tiles.num_warps <= 16) or not 1 <= tiles.num_stages <= 8:
        raise ValueError(f"{label!r}: warps must be a power of two up to 16, stages 1 to 8")
    if flags and not MIN_REGISTERS <= tiles.max_registers <= MAX_REGISTERS:
        raise ValueError(f"{label!r}: a register cap must be {MIN_REGISTERS} to {MAX_REGISTERS}")
    return tiles


def configured_prefill_tiles() -> PrefillTiles | None:
    """The tiles ONDO_PREFILL_TILES names for bf16 and fp16 prefill steps on a GPU; None when
    unset (the default tiles of `ondo.kernels.triton_attention.prefill_tiles`)."""
    return labelled(PREFILL_TILES_ENV, parse_prefill_tiles)
