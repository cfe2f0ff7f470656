"""A GGUF file's weights, dequantized once and kept for the next start.

Reading a GGUF parses its whole metadata, the tokenizer's vocabulary field by field, and
dequantizes every tensor: 4.7 s for the embedded 135M model on a two-core CPU, at every
start. The float32 tensors under their Hugging Face names (llama's Q/K rows already put
back in order) and the model's config are kept as `model.safetensors` and `config.json`
in the user's cache folder (`$XDG_CACHE_HOME/ondo/gguf-weights`, else
`~/.cache/ondo/gguf-weights`; `ondo.model.kept_files`), where a later start memory-maps
them. The values are the ones the GGUF path gives, bit for bit. Float32 takes room (four
bytes a weight: 0.54 GB for the 135M model), so only models up to
`ONDO_GGUF_WEIGHTS_CACHE_GB` gigabytes of float32 weights are kept (2 by default; 0 keeps
none).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from ondo.kernels.switches import whole_number
from ondo.model.config import ModelConfig
from ondo.model.gguf_file import hf_tensor_name
from ondo.model.kept_files import is_whole, keep_folder, kept_folder

log = logging.getLogger(__name__)

CACHE_GB_ENV = "ONDO_GGUF_WEIGHTS_CACHE_GB"
DEFAULT_CACHE_GB = 2
# Part of every folder's key: a change to how GGUF tensors become ondo's makes new folders.
FORMAT = "gguf-weights-1"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


def cache_limit_bytes() -> int:
    """The largest model, in bytes of float32 weights, whose weights are kept."""
    gb = whole_number(CACHE_GB_ENV, "gigabytes", 0)
    return (DEFAULT_CACHE_GB if gb is None else gb) * 10**9


def cached_folder(gguf_path: str) -> str:
    """Where `gguf_path`'s weights are kept (whether or not they are there yet)."""
    import safetensors

    return kept_folder("gguf-weights", gguf_path, FORMAT, safetensors.__version__)


def float32_bytes(reader: Any) -> int:
    """The model's weights in float32: what keeping them takes on disk."""
    return sum(4 * int(t.n_elements) for t in reader.tensors if hf_tensor_name(t.name) is not None)


def wants(reader: Any) -> bool:
    return float32_bytes(reader) <= cache_limit_bytes()


def cached_config(gguf_path: str) -> ModelConfig | None:
    """The config kept for `gguf_path`; None where none is kept or it cannot be read (or
    there is no such file: reading it then says so)."""
    if not os.path.isfile(gguf_path):
        return None
    folder = cached_folder(gguf_path)
    if not is_whole(folder, _WEIGHTS):
        return None
    try:
        with open(os.path.join(folder, _CONFIG)) as f:
            return ModelConfig(**json.load(f))
    except Exception as e:  # a damaged or foreign folder: read the GGUF again
        _drop(folder, gguf_path, e)
        return None


def cached_tensors(gguf_path: str) -> Iterator[tuple[str, torch.Tensor]] | None:
    """(HF name, float32 tensor) kept for `gguf_path`; None where none are kept or the file
    cannot be opened."""
    from safetensors import safe_open

    folder = cached_folder(gguf_path)
    try:
        handle = safe_open(os.path.join(folder, _WEIGHTS), framework="pt")
    except Exception as e:  # safetensors' own error has no narrower base
        _drop(folder, gguf_path, e)
        return None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with handle as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)

    return tensors()


def keep(gguf_path: str, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Save `tensors` (float32, read from `gguf_path`) and `config` for the next start; a
    failure to write is logged, never raised."""
    from safetensors.torch import save_file

    def write(folder: str) -> None:
        with open(os.path.join(folder, _CONFIG), "w") as f:
            json.dump(dataclasses.asdict(config), f)
        save_file(tensors, os.path.join(folder, _WEIGHTS))

    keep_folder(cached_folder(gguf_path), _WEIGHTS, write, f"{gguf_path}'s dequantized weights", gguf_path)


def _drop(folder: str, gguf_path: str, error: Exception) -> None:
    log.warning("the weights kept in %s cannot be read (%s); reading %s again", folder, error, gguf_path)
    shutil.rmtree(folder, ignore_errors=True)
