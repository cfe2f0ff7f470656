"""Compiled regions on CUDA: everything between two attention calls (output projection,
residual adds, RMSNorm, the MLP with SiLU-and-mul, the next layer's QKV projection,
q/k norm and rotary embedding) compiled by torch.compile as one function, so Inductor
fuses the pointwise work into few kernels and the host pays one call per layer. The
residual adds leave the matmuls for the norms' kernels (`ondo.model.residual_add`; not
with ONDO_RESIDUAL_ADD_IN_NORM=0).

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

from ondo.model.residual_add import residual_add_in_norm, residual_add_pass
from ondo.model.user_cache import user_cache_dir

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., torch.Tensor])


# Every model shape compiles the same region functions once more; a process serving one
# model needs a few, a test session running several architectures more than torch's
# default of 8.
RECOMPILE_LIMIT = 64
BACKEND = "inductor"  # tests trace the same regions on the CPU through "aot_eager"


def use_user_cache_dir() -> None:
    """Inductor's compiled code in the user's cache folder (`$XDG_CACHE_HOME/ondo/inductor`,
    else `~/.cache/ondo/inductor`) rather than torch's default under /tmp, which a reboot or
    a container's fresh /tmp empties: the next start then finds it. Triton's own cache is
    in the home folder already (`~/.triton/cache`). A folder the user set is kept."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    folder = user_cache_dir("inductor")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only home: torch's default then
        log.info("compiled-code cache stays in torch's default folder: %s", e)
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder


def warm_compiler() -> None:
    """Start Inductor's compile workers now (processes that import torch and Triton: seconds
    on a fresh machine), so that they are up by the time the first region compiles, after
    the weights are loaded, instead of starting then. A no-op with ONDO_FUSE=0."""
    if os.environ.get("ONDO_FUSE", "1") == "0":
        return
    use_user_cache_dir()
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def compiles(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("ONDO_FUSE", "1") != "0"


def unbacked_tokens() -> bool:
    """ONDO_UNBACKED_TOKENS=1: one graph for every token count (`mark_token_dim`). Off by
    default: on the H200, W1 was no faster with it (docs/benchmarks.md)."""
    return os.environ.get("ONDO_UNBACKED_TOKENS", "0") == "1"


def mark_token_dim(x: torch.Tensor, args: tuple) -> None:
    """The token count (dim 0 of `x` and of every other activation of its length: not the
    weights, which are parameters) as an unbacked size. Dynamic shapes otherwise specialize
    a size of 1, so that a batch of one compiles everything a second time, in the middle of
    serving where a one-token step runs eagerly (the CUDA graphs leave out batch 1 for this
    reason: `decode_graph_sizes`); an unbacked size makes no assumption about its value,
    one graph serves all."""
    n = x.shape[0]
    for t in (x, *args):
        if (isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)
                and t.ndim and t.shape[0] == n):
            torch._dynamo.decorators.mark_unbacked(t, 0)


def inductor_options() -> dict[str, object] | None:
    """What the compiled regions ask of Inductor beyond its defaults (None for another
    backend, which takes no options)."""
    if BACKEND != "inductor" or not residual_add_in_norm():
        return None
    return {"post_grad_custom_post_pass": residual_add_pass()}


def fused_on_cuda(fn: F) -> F:
    """`fn` as is on CPU tensors; compiled (dynamic shapes) on CUDA tensors."""
    compiled: Callable[..., torch.Tensor] | None = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if not compiles(x):
            return fn(x, *args, **kwargs)
        if compiled is None:
            use_user_cache_dir()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=BACKEND,
                                     options=inductor_options())
            if unbacked_tokens():
                mark_token_dim(x, args)  # the first call compiles: its sizes set the guards
        return compiled(x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
