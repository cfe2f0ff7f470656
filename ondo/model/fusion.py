"""Compiled regions on CUDA: everything between two attention calls (output projection,
residual adds, RMSNorm, the MLP with SiLU-and-mul, the next layer's QKV projection,
q/k norm and rotary embedding) compiled by torch.compile as one function, so Inductor
fuses the pointwise work into few kernels and the host pays one call per layer.

The profiles that asked for it, on an H100 with the Qwen3-0.6B shape: an 8192-token
prefill step spent ~35 ms of ~55 ms in unfused elementwise operators; compiling each
small function on its own fixed that on the GPU but cost the host ~46 ms per eager
forward pass (197 compiled calls of ~0.23 ms each). On CPU, and with ONDO_FUSE=0, the
plain functions run unchanged (they are the reference).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., torch.Tensor])


# Every model shape (and the batch of one, which dynamic shapes specialize) compiles the
# same region functions once more; a process serving one model needs a handful, a test
# session running several architectures more than torch's default of 8.
RECOMPILE_LIMIT = 64


def fused_on_cuda(fn: F) -> F:
    """`fn` as is on CPU tensors; compiled (dynamic shapes) on CUDA tensors."""
    compiled: Callable[..., torch.Tensor] | None = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if not x.is_cuda or os.environ.get("ONDO_FUSE", "1") == "0":
            return fn(x, *args, **kwargs)
        if compiled is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
