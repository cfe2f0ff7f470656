"""The compiled regions: one graph for every token count, a batch of one included.

On CUDA the regions go through Inductor; here Dynamo traces the same functions on the CPU
(`aot_eager`: the same symbolic shapes and decompositions, no code generation), so that a
size the graph specializes shows up as a second graph."""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

import ondo.model.fusion as fusion
from ondo import LLM
from ondo.bench.shapes import shape_folder
from ondo.engine.sampling_params import SamplingParams

SMALL_QWEN3 = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "tie_word_embeddings": True, "torch_dtype": "float32"}


@pytest.mark.parametrize("shape, overrides", [("tiny-llama", None), ("qwen3-0.6b", SMALL_QWEN3)])
def test_one_graph_serves_every_token_count(tmp_path, monkeypatch, shape, overrides):
    llm = LLM(shape_folder(shape, str(tmp_path), overrides=overrides), load_format="dummy",
              dtype="float32", max_model_len=256, seed=0, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # Prefills of 5, 17 and 1 tokens together, then decode steps of 3 sequences; then one
    # sequence alone: a one-token prefill and decode steps of batch 1.
    prompts = [{"prompt_token_ids": [100 + 3 * i for i in range(n)]} for n in (5, 17, 1)]
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("ONDO_UNBACKED_TOKENS", "1")
    monkeypatch.setattr(fusion, "compiles", lambda x: True)
    monkeypatch.setattr(fusion, "BACKEND", "aot_eager")
    try:
        traced = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        alone = llm.generate([prompts[2]], params)[0].outputs[0].token_ids
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert traced == plain and alone == plain[2]
    assert graphs == 1


def test_only_activations_of_the_token_count_are_marked():
    x = torch.zeros(8, 4)
    residual, cos = torch.zeros(8, 4), torch.zeros(8, 1, 2)
    weight = torch.nn.Parameter(torch.zeros(8, 4))  # a weight, whatever its length
    other = torch.zeros(3, 4)
    fusion.mark_token_dim(x, (residual, weight, other, cos, None, 2.0))
    marked = [getattr(t, "_dynamo_unbacked_indices", set())
              for t in (x, residual, weight, other, cos)]
    assert marked == [{0}, {0}, set(), set(), {0}]


def test_compiled_code_is_cached_in_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fusion.use_user_cache_dir()
    folder = tmp_path / "cache" / "ondo" / "inductor"
    assert folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    fusion.use_user_cache_dir()  # the user's choice stands
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
