"""Where ondo's Triton kernels are launched. `launch(kernel, grid, *args, **kwargs)` runs
`kernel[grid](*args, **kwargs)`; inside `compile_only()` it compiles the kernel for those
arguments instead, without running it (Triton's warm-up run: the same cache key as the
launch, so the launch later finds it compiled; Triton's interpreter compiles nothing). `ondo.kernels.precompile` calls the kernels' own
wrappers that way, on threads, to compile start-up's kernels ahead of their first launch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

_COMPILE_ONLY: ContextVar[bool] = ContextVar("ondo_compile_only", default=False)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    if _COMPILE_ONLY.get():
        kernel.run(*args, grid=grid, warmup=True, **kwargs)  # what `warmup` does, also interpreted
    else:
        kernel[grid](*args, **kwargs)


@contextmanager
def compile_only() -> Iterator[None]:
    """In this thread (or task), `launch` compiles and runs nothing. What a wrapper does
    around its launches (allocating outputs, small torch operations on them) still runs."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


@functools.cache
def device_sm_count(device_index: int) -> int:
    """SMs of CUDA device `device_index`, read once: the kernels size their grids by it."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
