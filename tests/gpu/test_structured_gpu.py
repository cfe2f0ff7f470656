"""Structured outputs on a CUDA GPU: masks filled on the host while the forward pass runs,
applied on the device after CUDA-graph replays, with asynchronous scheduling on (the
constrained requests must not make the engine drain), on the full Qwen3 vocabulary."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines, never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ondo import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from ondo.bench.shapes import shape_folder  # noqa: E402

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "schemas",
                           "recommendation.json")
SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


def conforms(doc: object, schema: dict) -> bool:
    """The recommendation schema's rules (objects, required keys, no others, enums, ranges),
    checked by hand: jsonschema is not installed on the GPU machine."""
    kind = schema.get("type")
    if "enum" in schema and doc not in schema["enum"]:
        return False
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(doc, dict) and set(schema.get("required", [])) <= set(doc)
                and set(doc) <= set(props) and all(conforms(v, props[k]) for k, v in doc.items()))
    if kind == "array":
        return (isinstance(doc, list) and schema.get("minItems", 0) <= len(doc) <= schema.get("maxItems", 1 << 30)
                and all(conforms(v, schema["items"]) for v in doc))
    if kind in ("number", "integer"):
        ok = isinstance(doc, (int, float)) and not isinstance(doc, bool)
        ok = ok and (kind == "number" or isinstance(doc, int))
        return ok and schema.get("minimum", -float("inf")) <= doc <= schema.get("maximum", float("inf"))
    if kind == "string":
        return isinstance(doc, str) and len(doc) <= schema.get("maxLength", 1 << 30)
    return True


def test_constrained_outputs_with_cuda_graphs_and_asynchronous_scheduling():
    with open(SCHEMA_PATH) as f:
        schema = json.load(f)
    folder = shape_folder("qwen3-0.6b", tokenizer="bytes", overrides=SMALL)
    llm = LLM(folder, load_format="dummy", dtype="bfloat16", max_num_seqs=32, max_model_len=1024,
              max_num_batched_tokens=1024, gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 150000, (int(n),), generator=gen).tolist()
               for n in torch.randint(10, 200, (32,), generator=gen)]
    spec = StructuredOutputsParams(json=schema)
    params = [SamplingParams(temperature=0.8, max_tokens=600, structured_outputs=spec) if i % 4 else
              SamplingParams(temperature=0.8, max_tokens=64, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    stopped = 0
    for i, o in enumerate(outs):
        c = o.outputs[0]
        if i % 4 == 0:
            assert len(c.token_ids) == 64
            continue
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            stopped += 1
            assert conforms(json.loads(c.text), schema), c.text
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 600
    assert stopped >= len(prompts) // 4
    steps = llm.engine.step_timing_s["steps"]
    assert llm.engine.num_steps_ahead > 0.5 * steps  # constrained requests did not drain
    assert llm.stats()["grammar_mask_steps"] > 0


def test_mask_kernel_matches_the_reference_on_the_full_vocabulary():
    from ondo.kernels.bitmask import apply_token_bitmask_ref
    from ondo.kernels.triton_bitmask import apply_token_bitmask_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = 151936
    logits = torch.randn((64, vocab), device="cuda", generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (48, (vocab + 31) // 32), device="cuda",
                            dtype=torch.int64, generator=g).to(torch.int32)
    rows = torch.randperm(64, device="cuda", generator=g)[:48]
    for index in (rows, None):
        want, got = logits.clone(), logits.clone()
        masks = bitmask if index is not None else torch.cat([bitmask, bitmask[:16]])
        apply_token_bitmask_ref(want, masks, index)
        apply_token_bitmask_triton(got, masks, index)
        assert torch.equal(got, want)
        assert torch.isinf(got).sum() == torch.isinf(want).sum() > 0
