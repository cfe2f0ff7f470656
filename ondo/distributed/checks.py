"""Which tensor-parallel sizes a model and a machine allow, decided before any worker starts."""

from __future__ import annotations

import torch

from ondo.model.config import ModelConfig

FLAG = "--tensor-parallel-size"


def check_tensor_parallel(size: int, config: ModelConfig, device: torch.device,
                          num_cuda_devices: int) -> None:
    """Raise ValueError, naming the flag, where `size` ranks cannot share this model here:
    attention heads and the MLP's width split evenly; KV heads split evenly, or (fewer KV
    heads than ranks) each is replicated on the same number of ranks; on CUDA one GPU per
    rank, from the engine's device on. The vocabulary is padded, so any size fits it."""

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid engine argument tensor_parallel_size={size} ({FLAG}): {why}")

    if size < 1:
        raise bad("must be >= 1")
    if size == 1:
        return
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % size:
        raise bad(f"must divide the model's {heads} attention heads")
    if size <= kv_heads and kv_heads % size:
        raise bad(f"must divide the model's {kv_heads} KV heads")
    if size > kv_heads and size % kv_heads:
        raise bad(f"is more than the model's {kv_heads} KV heads, so it must be a multiple of "
                  "them (each KV head is then replicated on the same number of ranks)")
    if config.intermediate_size % size:
        raise bad(f"must divide the model's intermediate size {config.intermediate_size}")
    if size > config.vocab_size:
        raise bad(f"exceeds the model's vocabulary of {config.vocab_size}")
    if device.type == "cuda":
        first = device.index or 0
        if first + size > num_cuda_devices:
            raise bad(f"needs {size} GPUs (cuda:{first} to cuda:{first + size - 1}), one per rank, "
                      f"but {num_cuda_devices} are visible")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU from the engine's own; the CPU for every rank on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)
