"""Shared fixtures. Loading the embedded GGUF (dequantizing it) takes seconds, so the
loaded weights and tokenizer are kept for the whole session and shared by every engine
a test builds; each engine still profiles, sizes and owns its own KV cache."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ONDO_DEBUG_CHECKS", "1")  # the scheduler asserts its invariants every step
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors. The mode is fixed when a
    # function is decorated, Triton's own library functions (tl.max, ...) when Triton is
    # first imported, which Dynamo does too: set it before any test imports either.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _share_loaded_weights():
    import ondo.engine.llm_engine as llm_engine

    real_load_model = llm_engine.load_model
    real_load_tokenizer = llm_engine.load_tokenizer

    @functools.lru_cache(maxsize=4)
    def load_model(path, load_format, dtype, device, *shard):
        return real_load_model(path, load_format, dtype, device, *shard)

    @functools.lru_cache(maxsize=4)
    def load_tokenizer(path, tokenizer_path=None):
        return real_load_tokenizer(path, tokenizer_path)

    llm_engine.load_model = load_model
    llm_engine.load_tokenizer = load_tokenizer
    yield
    llm_engine.load_model = real_load_model
    llm_engine.load_tokenizer = real_load_tokenizer


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from ondo.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers running the same GGUF, float32 on CPU: the oracle."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model
