"""Start-up draws from the one-pass sampler with both logit dtypes it will see, so that its
kernel is compiled before any request: the model's own (bf16 on the GPU) for plain rows,
float32 for rows with top-k, top-p or min-p (the filters hand it a float32 copy)."""

from __future__ import annotations

import torch

import ondo.engine.model_runner as model_runner
from ondo import LLM
from ondo.bench.shapes import shape_folder


def test_start_up_draws_from_model_and_float32_logits(monkeypatch):
    seen: list[torch.dtype] = []
    monkeypatch.setattr(model_runner, "fused_sampling", lambda device: True)
    monkeypatch.setattr(model_runner, "sample_on_device",
                        lambda logits, params, lens: seen.append(logits.dtype))
    LLM(shape_folder("tiny-llama"), load_format="dummy", dtype="bfloat16", device="cpu",
        max_model_len=256)
    assert set(seen) == {torch.bfloat16, torch.float32}


def test_no_draw_at_start_up_without_the_one_pass_sampler(monkeypatch):
    seen: list[torch.dtype] = []
    monkeypatch.setattr(model_runner, "sample_on_device",
                        lambda logits, params, lens: seen.append(logits.dtype))
    LLM(shape_folder("tiny-llama"), load_format="dummy", dtype="bfloat16", device="cpu",
        max_model_len=256)
    assert seen == []  # on the CPU the sampler uses PyTorch operations
