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
from tests.tiny_checkpoints import conditioned_hf_model, keep_rope_in_float32  # noqa: E402

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
# Positions whose fp32 top-2 logits are closer than this are ties that bf16 rounding
# (~0.4% relative) may flip either way; agreement is asserted on the others.
TIE_GAP = 0.05


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    hf = conditioned_hf_model(config_class, overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path)


def test_teacher_forced_top1_agreement_and_logit_error(checkpoint):
    name, hf, path = checkpoint
    tokens = torch.randint(0, SHAPE["vocab_size"], (POSITIONS,), generator=torch.Generator().manual_seed(0))
    # The oracle runs the same bf16 weights in fp32 arithmetic; transformers in bf16 is
    # reported beside it for comparison.
    hf = keep_rope_in_float32(hf.cuda(), torch.bfloat16)
    with torch.no_grad():
        hf_bf16 = hf(tokens[None].cuda()).logits[0].float()
        hf = keep_rope_in_float32(hf, torch.float32)
        ref = hf(tokens[None].cuda()).logits[0].float()
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
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > TIE_GAP
    agree = ours.argmax(-1) == ref.argmax(-1)
    agreement, clear_agreement = agree.float().mean().item(), agree[clear].float().mean().item()
    rel_err = ((ours - ref).norm() / ref.norm()).item()
    hf_agreement = (hf_bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    hf_err = ((hf_bf16 - ref).norm() / ref.norm()).item()
    print(f"RESULT {name}: ondo bf16 top-1 agreement {agreement:.4f} (on {int(clear.sum())} untied "
          f"positions {clear_agreement:.4f}), logits rel. error {rel_err:.4f}; "
          f"transformers bf16 {hf_agreement:.4f}, {hf_err:.4f}")
    assert clear_agreement >= 0.99 and clear.sum() >= 0.75 * POSITIONS
    assert agreement >= hf_agreement - 0.02
    assert rel_err < 2e-2


@pytest.mark.parametrize("split_cap", ["0", "128"])
def test_cuda_graph_decode_equals_eager_decode(checkpoint, split_cap, monkeypatch):
    """A replayed graph computes exactly what the same forward computes eagerly, also with
    long contexts cut at a split cap (ONDO_DECODE_SPLIT_MAX_TOKENS)."""
    monkeypatch.setenv("ONDO_DECODE_SPLIT_MAX_TOKENS", split_cap)
    _, _, path = checkpoint
    llm = LLM(path, dtype="bfloat16", max_num_seqs=16, max_model_len=512, gpu_memory_utilization=0.3,
              async_scheduling=False)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.graphs, "no CUDA graphs were captured"
    for i, n in enumerate((5, 17, 40, 64, 100)):  # 5 sequences: replayed in the batch-8 graph
        ids = torch.randint(0, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)).tolist()
        engine.add_request(f"r{i}", prompt_token_ids=ids,
                           params=SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(3):
        engine.step()  # prefills, then decodes
    sched = engine.scheduler.schedule()
    batch = runner.prepare(sched)
    assert batch.meta.is_decode_only and runner._graph_size(batch.num_tokens) == 8
    with torch.inference_mode():
        graph_logits = runner.execute(sched, batch)
        graph = runner.graphs[8]
        st = runner.static
        meta = type(batch.meta)(
            slot_mapping=st["slot_mapping"][:8], block_tables=st["block_tables"][:8],
            context_lens=st["context_lens"][:8], query_start_loc=st["query_start_loc"][:9],
            max_query_len=1, max_context_len=runner.max_model_len, block_size=runner.block_size,
            decode_split_tokens=st["decode_split_tokens"])  # as the replay set it
        hidden = runner.model(st["input_ids"][:8], st["positions"][:8], runner.kv_caches, meta)
        # The sampled rows in the scheduler's order (packed longest first, they are not 0..4).
        eager_logits = runner.model.compute_logits(hidden.index_select(0, batch.logits_indices), dtype=None)
    assert graph.output.shape[0] == 8 and batch.logits_indices.numel() == 5
    assert graph_logits.dtype == torch.bfloat16  # the sampler reads them as they are
    assert torch.equal(graph_logits, eager_logits)
    for item in sched.scheduled:  # leave the engine consistent
        engine.abort_request(item.seq.request_id)


def test_cuda_graph_mixed_step_equals_eager_forward(checkpoint):
    """A step with a prefill and decode rows, replayed from the graph of the next token
    count up, computes exactly what the same padded forward computes eagerly."""
    _, _, path = checkpoint
    llm = LLM(path, dtype="bfloat16", max_num_seqs=16, max_model_len=512, max_num_batched_tokens=512,
              gpu_memory_utilization=0.3, async_scheduling=False)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.mixed_graph_sizes[-1] == 512 and 128 in runner.mixed_graphs
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    gen = torch.Generator().manual_seed(7)
    for i, n in enumerate((9, 30, 41)):
        engine.add_request(f"r{i}", prompt_token_ids=torch.randint(0, SHAPE["vocab_size"], (n,), generator=gen).tolist(),
                           params=params)
    for _ in range(2):
        engine.step()  # the prompts, then a decode step
    engine.add_request("new", prompt_token_ids=torch.randint(0, SHAPE["vocab_size"], (70,), generator=gen).tolist(),
                       params=params)
    sched = engine.scheduler.schedule()
    batch = runner.prepare(sched)
    assert batch.num_prefill_tokens == 70 and batch.num_decode_tokens == 3  # 73 tokens: the 128 graph
    with torch.inference_mode():
        graph_logits = runner.execute(sched, batch)
        st = runner.mixed_static
        meta = type(batch.meta)(
            slot_mapping=st["slot_mapping"][:128], block_tables=st["block_tables"],
            context_lens=st["context_lens"], query_start_loc=st["query_start_loc"],
            max_query_len=128, max_context_len=runner.max_model_len, block_size=runner.block_size)
        hidden = runner.model(st["input_ids"][:128], st["positions"][:128], runner.kv_caches, meta)
        eager_logits = runner.model.compute_logits(hidden.index_select(0, batch.logits_indices), dtype=None)
        # And the unpadded eager forward picks the same tokens.
        unpadded = runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
        unpadded_logits = runner.model.compute_logits(unpadded.index_select(0, batch.logits_indices), dtype=None)
    assert runner.mixed_graphs[128].output.shape[0] == 128
    assert graph_logits.shape[0] == 4 and torch.equal(graph_logits, eager_logits)
    assert torch.equal(graph_logits.argmax(-1), unpadded_logits.argmax(-1))
    for item in sched.scheduled:  # leave the engine consistent
        engine.abort_request(item.seq.request_id)


def _random_prompts(count: int = 24, seed: int = 11, longest: int = 299) -> list[list[int]]:
    """Token-id prompts of 1 to `longest` tokens, the same for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["vocab_size"], (int(n),), generator=gen).tolist()
            for n in torch.randint(1, longest + 1, (count,), generator=gen)]


def _greedy_and_seeded(count: int) -> list[SamplingParams]:
    """Greedy and seeded requests in turn, each ending on its own length limit."""
    return [SamplingParams(temperature=0, max_tokens=8 + 7 * i, ignore_eos=True) if i % 2 else
            SamplingParams(temperature=0.8, seed=i, max_tokens=8 + 7 * i, ignore_eos=True)
            for i in range(count)]


def test_cuda_graphs_for_prefill_steps_keep_greedy_outputs(checkpoint):
    """The same greedy requests with steps that have a prefill replayed from graphs and
    run eagerly (cuda_graph_max_tokens=0): token for token the same."""
    _, _, path = checkpoint
    prompts = _random_prompts()
    params = [SamplingParams(temperature=0, max_tokens=8 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
    outs = {}
    for limit in (None, 0):
        llm = LLM(path, dtype="bfloat16", max_num_seqs=32, max_model_len=512, max_num_batched_tokens=512,
                  gpu_memory_utilization=0.3, cuda_graph_max_tokens=limit)
        assert bool(llm.engine.runner.mixed_graphs) == (limit is None)
        outs[limit] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outs[None], outs[0], strict=True))
    print(f"RESULT prefill-step graphs vs eager: {same}/{len(prompts)} greedy outputs identical")
    assert outs[None] == outs[0]


def test_async_scheduling_equals_synchronous_stepping_on_the_gpu(checkpoint):
    """Steps queued ahead (tokens fed from the previous draws on the device, CUDA graphs,
    chunked prefill) give the tokens of synchronous stepping, greedy and seeded."""
    _, _, path = checkpoint
    prompts = _random_prompts(24, seed=3)
    params = _greedy_and_seeded(len(prompts))
    outs = {}
    for mode in (False, True):
        # Every request has a seat, and each ends on its length limit, which asynchronous
        # scheduling sees ahead: both modes run the same batches, so bf16 results agree.
        llm = LLM(path, dtype="bfloat16", max_num_seqs=32, max_model_len=512, max_num_batched_tokens=512,
                  gpu_memory_utilization=0.3, async_scheduling=mode)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if mode:
            assert llm.engine.num_steps_ahead > 0.9 * llm.engine.step_timing_s["steps"]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


def test_decode_rows_packed_longest_first_keep_the_tokens_on_the_gpu(checkpoint, monkeypatch):
    """ONDO_DECODE_LONGEST_FIRST=1 reorders a decode step's rows, and each row's arithmetic
    stays the same: the tokens of the scheduler's order, greedy and seeded, with CUDA
    graphs and steps ahead."""
    _, _, path = checkpoint
    prompts = _random_prompts(24, seed=5, longest=399)
    params = _greedy_and_seeded(len(prompts))
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("ONDO_DECODE_LONGEST_FIRST", flag)
        llm = LLM(path, dtype="bfloat16", max_num_seqs=32, max_model_len=512, max_num_batched_tokens=512,
                  gpu_memory_utilization=0.3)
        assert llm.engine.runner.longest_first == (flag == "1")
        outs[flag] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outs["1"] == outs["0"]


def test_parallel_sampling_ahead_equals_drained_steps_on_the_gpu(checkpoint, monkeypatch):
    """Requests with n > 1 run with steps ahead (ONDO_PARALLEL_SAMPLING_AHEAD=1) and give
    the tokens of drained steps: seeded and greedy, beside n = 1 requests."""
    _, _, path = checkpoint
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 300, (12,), generator=gen)]
    params = [SamplingParams(n=4, temperature=0.8, seed=i, max_tokens=8 + 5 * i, ignore_eos=True) if i % 3 == 0
              else SamplingParams(n=2, temperature=0, max_tokens=10 + 3 * i, ignore_eos=True) if i % 3 == 1
              else SamplingParams(temperature=0.7, seed=i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    outs = {}
    for ahead in (False, True):
        monkeypatch.setenv("ONDO_PARALLEL_SAMPLING_AHEAD", "1" if ahead else "0")
        # Every request's sequences have seats: both modes run the same batches.
        llm = LLM(path, dtype="bfloat16", max_num_seqs=64, max_model_len=512, max_num_batched_tokens=512,
                  gpu_memory_utilization=0.3)
        assert llm.engine.async_scheduling and llm.engine.parallel_sampling_ahead is ahead
        outs[ahead] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
        steps, steps_ahead = llm.engine.step_timing_s["steps"], llm.engine.num_steps_ahead
        print(f"RESULT n > 1 {'ahead' if ahead else 'drained'}: {steps_ahead} of {steps} steps ahead")
        if ahead:
            assert steps_ahead > 0.9 * steps
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


_COMPILES_SCRIPT = r'''
import json, sys, threading
import torch
from ondo import LLM, SamplingParams
from ondo.kernels import triton_attention as ta, triton_kv_write as kw, triton_sampling as ts

dev = torch.cuda.current_device()
main_thread_compiles = []
for kernel in (ta._decode_split_kernel, ta._decode_reduce_kernel, ta._prefill_kernel,
               kw._write_kv_cache_kernel, kw._write_kv_tokens_kernel, ts._gumbel_max_chunks_kernel):
    original = kernel.run
    def run(*args, grid, warmup, _k=kernel, _run=original, **kwargs):
        cache = _k.device_caches[dev][0]
        before = len(cache)
        out = _run(*args, grid=grid, warmup=warmup, **kwargs)
        if len(cache) > before and threading.current_thread() is threading.main_thread() and not warmup:
            main_thread_compiles.append(_k.__name__)
        return out
    kernel.run = run
llm = LLM(sys.argv[1], dtype="bfloat16", max_num_seqs=32, max_model_len=512, gpu_memory_utilization=0.3)
gen = torch.Generator().manual_seed(3)
prompts = [torch.randint(0, 4096, (int(n),), generator=gen).tolist() for n in torch.randint(1, 300, (40,), generator=gen)]
outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True) for i in range(40)])
print(json.dumps({"main_thread_compiles": main_thread_compiles,
                  "tokens": [o.outputs[0].token_ids for o in outs],
                  "waited_s": llm.engine.startup_phases_s["profile.precompile_wait"]}))
'''


def test_kernels_compiled_ahead_leave_start_up_and_serving_nothing_to_compile(tmp_path):
    """ONDO_TRITON_PRECOMPILE=1: every Triton kernel variant that the profiling pass, the
    graphs' capture, the sampler and serving launch was compiled on the precompile threads,
    none on the engine's thread (a fresh process, an empty Triton cache). Without it the
    engine's thread compiles them all. The greedy tokens are the same either way."""
    import json
    import os
    import subprocess
    import sys

    hf = conditioned_hf_model("Qwen3Config", {**SHAPE, "head_dim": 128})
    path = tmp_path / "qwen3"
    hf.save_pretrained(path)
    results = {}
    for ahead in ("0", "1"):
        env = {**os.environ, "ONDO_TRITON_PRECOMPILE": ahead, "TRITON_CACHE_DIR": str(tmp_path / f"triton-{ahead}")}
        done = subprocess.run([sys.executable, "-c", _COMPILES_SCRIPT, str(path)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[ahead] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"RESULT precompile={ahead}: engine-thread compiles {results[ahead]['main_thread_compiles']}, "
              f"waited {results[ahead]['waited_s']:.2f} s")
    plain, ahead = results["0"]["main_thread_compiles"], results["1"]["main_thread_compiles"]
    assert {"_decode_split_kernel", "_prefill_kernel", "_gumbel_max_chunks_kernel"} <= set(plain)
    assert ahead == []
    assert results["1"]["tokens"] == results["0"]["tokens"]
