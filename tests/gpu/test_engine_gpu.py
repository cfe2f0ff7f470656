"""The engine on a CUDA GPU in bf16: teacher-forced agreement with transformers through the
Triton prefill and decode kernels, and CUDA-graph decode against eager decode."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines, never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ondo import LLM, SamplingParams  # noqa: E402
from ondo.model.loader import load_model  # noqa: E402
from tests.paged_batch import PagedCache  # noqa: E402
from tests.tiny_checkpoints import tiny_hf_model  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
CASES = {
    "llama_d64": ("LlamaConfig", {**SHAPE, "head_dim": 64}),
    "llama_d128": ("LlamaConfig", {**SHAPE, "head_dim": 128}),
    "qwen2": ("Qwen2Config", {**SHAPE}),
    "qwen3": ("Qwen3Config", {**SHAPE, "head_dim": 128}),
}
POSITIONS = 512
PREFILL = 256


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    hf = tiny_hf_model(config_class, overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path)


def test_teacher_forced_top1_agreement_and_logit_error(checkpoint):
    name, hf, path = checkpoint
    tokens = torch.randint(0, SHAPE["vocab_size"], (POSITIONS,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.cuda().float()(tokens[None].cuda()).logits[0].float()  # fp32 truth
    model, config = load_model(path, "auto", torch.bfloat16, torch.device("cuda"))
    cache = PagedCache(config, num_blocks=64, block_size=16, seed=1, device="cuda", dtype=torch.bfloat16)
    cache.add_sequence(POSITIONS)
    ids = tokens.cuda()
    logits = []
    with torch.inference_mode():
        meta, pos = cache.step([PREFILL])  # Triton prefill kernel
        logits.append(model.compute_logits(model(ids[:PREFILL], pos, cache.kv_caches, meta)))
        for i in range(PREFILL, POSITIONS):  # Triton decode kernel, one token at a time
            meta, pos = cache.step([1])
            logits.append(model.compute_logits(model(ids[i : i + 1], pos, cache.kv_caches, meta)))
    ours = torch.cat(logits).float()
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rel_err = ((ours - ref).norm() / ref.norm()).item()
    print(f"{name}: top-1 agreement {agreement:.4f}, logits relative error {rel_err:.4f}")
    assert agreement >= 0.99
    assert rel_err < 2e-2


def test_cuda_graph_decode_equals_eager_decode(checkpoint):
    _, _, path = checkpoint
    prompts = [torch.randint(0, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 17, 40, 64, 100)]  # 5 sequences: replayed in the batch-8 graph
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    graphs = LLM(path, dtype="bfloat16", max_num_seqs=16, max_model_len=512, gpu_memory_utilization=0.3)
    assert graphs.engine.runner.graphs, "no CUDA graphs were captured"
    with_graphs = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    del graphs
    eager = LLM(path, dtype="bfloat16", max_num_seqs=16, max_model_len=512, gpu_memory_utilization=0.3,
                enforce_eager=True)
    assert not eager.engine.runner.graphs
    assert [o.outputs[0].token_ids for o in eager.generate(prompts, params)] == with_graphs
