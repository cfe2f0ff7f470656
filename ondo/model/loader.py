"""Building a LlamaForCausalLM and filling its weights from a HF folder, a GGUF file or at random.

The model is first built on the "meta" device, then materialized straight on
the target device in the target dtype, so no full-size float32 copy is made
on the host. A rank of a tensor-parallel engine (`shard`) builds only its slice of each
layer and keeps only its slice of each checkpoint tensor as it is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from ondo.model import gguf_weights_cache
from ondo.model.config import ModelConfig
from ondo.model.default_model import default_model_path
from ondo.model.gguf_file import gguf_config, gguf_tensors, open_gguf
from ondo.model.llama import LlamaForCausalLM
from ondo.model.parallel_layers import Shard

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DUMMY_STD = 0.02


def load_model(
    path: str | None,
    load_format: str,
    dtype: torch.dtype,
    device: torch.device,
    shard: Shard | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """path None means the embedded default model (a GGUF file). `shard`: this rank's
    slice of a tensor-parallel model (None: the whole model)."""
    shard = shard or Shard()
    path, load_format = _resolve(path, load_format)
    if load_format == "gguf":
        config, tensors = _gguf_weights(path)
        model = _empty_model(config, dtype, device, shard)
        _fill(model, ((name, t.to(dtype)) for name, t in tensors), path)
        return model, config

    config = read_hf_config(path)
    if load_format == "dummy":
        return load_model_from_config(config, dtype, device, shard), config
    model = _empty_model(config, dtype, device, shard)
    _fill(model, safetensors_tensors(path), path)
    return model, config


def read_model_config(path: str | None, load_format: str) -> ModelConfig:
    """The model's shape alone (config.json or the GGUF's metadata), without its weights."""
    path, load_format = _resolve(path, load_format)
    if load_format == "gguf":
        return gguf_weights_cache.cached_config(path) or gguf_config(open_gguf(path), path)
    return read_hf_config(path)


def _gguf_weights(path: str) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The GGUF's config and float32 tensors: those kept from an earlier start where there
    are, else read from the file (and kept, if the model is small enough)."""
    config = gguf_weights_cache.cached_config(path)
    tensors = gguf_weights_cache.cached_tensors(path) if config is not None else None
    if config is not None and tensors is not None:
        return config, tensors
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = gguf_tensors(reader, config, path, torch.float32)
    if gguf_weights_cache.wants(reader):
        tensors = _keeping(path, config, tensors)
    return config, tensors


def _keeping(path: str, config: ModelConfig,
             tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` as they come; once all have come, they are kept for the next start."""
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        kept[name] = tensor
        yield name, tensor
    gguf_weights_cache.keep(path, config, kept)


def _resolve(path: str | None, load_format: str) -> tuple[str, str]:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; one of {', '.join(LOAD_FORMATS)}")
    if path is None:
        path = default_model_path()
    if load_format == "auto":
        load_format = "gguf" if path.endswith(".gguf") else "safetensors"
    return path, load_format


def load_model_from_config(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, shard: Shard | None = None
) -> LlamaForCausalLM:
    """Random weights (normal, std 0.02; norms one; biases zero) for `config`; a shard
    draws its own slices (they are not slices of one random full model)."""
    model = _empty_model(config, dtype, device, shard or Shard())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, _DUMMY_STD)
    return model


def read_hf_config(path: str) -> ModelConfig:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"model config not found: {config_path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt model config {config_path}: {e}") from e
    return ModelConfig.from_hf_dict(raw)


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's shard files, from model.safetensors.index.json or a glob."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt safetensors index {index_path}: {e}") from e
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weight files in {path}")
    return [os.path.join(path, n) for n in names]


def safetensors_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file_path in safetensors_files(path):
        try:
            with safe_open(file_path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"weight file not found: {file_path}") from None
        except Exception as e:  # safetensors' own SafetensorError has no narrower base
            raise ValueError(f"cannot read weight file {file_path}: {e}") from e


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 shard: Shard) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config, shard)
    return model.to(dtype=dtype).to_empty(device=device).eval()


def _fill(model: LlamaForCausalLM, weights: Iterator[tuple[str, torch.Tensor]], path: str) -> None:
    loaded = model.load_weights(weights)
    missing = model.missing_parameters(loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights: {shown}")
