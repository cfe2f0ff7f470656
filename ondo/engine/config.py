"""Engine arguments: one flat, validated dataclass, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

PREEMPTION_MODES = ("swap", "recompute", "auto")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class EngineArgs:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 8192 on CUDA, 1024 on CPU
    max_model_len: int | None = None  # None: the model's context length
    num_kv_blocks: int | None = None  # overrides profiling and byte budgets
    kv_cache_memory: int | None = None  # bytes; the CPU's budget (default 1 GiB)
    gpu_memory_utilization: float = 0.9
    preemption_mode: str = "auto"
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out KV blocks
    enforce_eager: bool = False  # no CUDA graphs
    # The largest step with a prefill in it that replays a CUDA graph (padded up to the
    # next captured size); larger ones run eagerly. None: max_num_batched_tokens; 0: none.
    cuda_graph_max_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks shared by prompts
    served_model_name: str | None = None
    # Schedule and prepare step N+1 while step N runs on the GPU (None: on for CUDA).
    async_scheduling: bool | None = None
    # Ranks the model is split over (Megatron-style; one process and one GPU each; rank 0
    # is the engine's own process). 1: no process group, nothing changes.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid engine argument {name}={getattr(self, name)!r}: {why}")

        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise bad("block_size", "must be a power of two from 1 to 128")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", "must be >= 1")
        if self.cuda_graph_max_tokens is not None and self.cuda_graph_max_tokens < 0:
            raise bad("cuda_graph_max_tokens", "must be >= 0 (0: steps with a prefill run eagerly)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise bad("max_model_len", "must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise bad("num_kv_blocks", "must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise bad("kv_cache_memory", "must be a positive number of bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise bad("preemption_mode", f"must be one of {PREEMPTION_MODES}")
        if self.load_format not in LOAD_FORMATS:
            raise bad("load_format", f"must be one of {LOAD_FORMATS}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES}")
        if self.swap_space < 0:
            raise bad("swap_space", "must be >= 0 GiB")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", "must be >= 1 (--tensor-parallel-size)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
