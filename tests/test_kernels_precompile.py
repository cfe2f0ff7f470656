"""Compiling start-up's Triton kernels ahead: `launch` compiles instead of running inside
`compile_only` (in that thread only), and the precompile plan runs the kernels' own wrappers
on inputs shaped like the engine's, covering every kernel start-up launches. On the CPU
the kernels are Triton's interpreter's, whose warm-up run compiles nothing; on a GPU the
same plan fills Triton's cache (tests/gpu)."""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

from ondo.kernels import precompile  # noqa: E402
from ondo.kernels.launch import compile_only, launch  # noqa: E402


class FakeKernel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, tuple]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("run", grid, args))

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append(("warmup" if warmup else "run", grid, args))


def test_launch_runs_the_kernel_and_only_compiles_it_inside_compile_only():
    k = FakeKernel()
    launch(k, (4, 2), 1, 2, BLOCK=16)
    with compile_only():
        launch(k, (8,), 3)
        seen_by_other_thread: list[FakeKernel] = []
        other = FakeKernel()
        t = threading.Thread(target=lambda: (launch(other, (1,), 9), seen_by_other_thread.append(other)))
        t.start()
        t.join()
    launch(k, (2,), 5)
    assert k.calls == [("run", (4, 2), (1, 2)), ("warmup", (8,), (3,)), ("run", (2,), (5,))]
    assert other.calls == [("run", (1,), (9,))]  # another thread is not in compile_only


def test_precompile_is_nothing_off_cuda():
    job = precompile.start_precompile(_shapes(torch.device("cpu")))
    assert job.num_variants == 0
    job.wait()
    assert job.failures == 0


def _shapes(device: torch.device, **overrides) -> precompile.EngineKernelShapes:
    fields = dict(num_q_heads=16, num_kv_heads=8, head_dim=128, vocab_size=4096, block_size=16,
                  dtype=torch.float32, device=device, max_num_seqs=64, max_model_len=512,
                  max_num_batched_tokens=1024, decode_graph_sizes=(2, 4, 8, 16, 32, 48, 64), mixed_graphs=True,
                  fused_sampling=True)
    return precompile.EngineKernelShapes(**{**fields, **overrides})


def test_the_plan_launches_every_start_up_kernel_through_the_real_wrappers(monkeypatch):
    from ondo.kernels import attention
    from ondo.kernels import triton_attention as ta
    from ondo.kernels import triton_kv_write as kw
    from ondo.kernels import triton_sampling as ts

    monkeypatch.setattr(attention, "_use_triton", lambda t: True)  # CPU tensors, interpreted kernels
    compiled: list[tuple[str, dict]] = []
    kernels = {"split": ta._decode_split_kernel, "reduce": ta._decode_reduce_kernel, "prefill": ta._prefill_kernel,
               "write": kw._write_kv_cache_kernel, "write_tokens": kw._write_kv_tokens_kernel,
               "sample": ts._gumbel_max_chunks_kernel}
    for name, kernel in kernels.items():
        def run(*args, grid, warmup, _name=name, **kwargs):
            assert warmup, "compile only: nothing runs"
            compiled.append((_name, kwargs))
        monkeypatch.setattr(kernel, "run", run, raising=False)
    tasks = precompile._tasks(_shapes(torch.device("cpu")))
    for task in tasks:
        precompile._compiled(task)
    names = [n for n, _ in compiled]
    assert set(names) == set(kernels)
    # The profiling pass and the prefill graphs: the prefill kernel without and with the
    # device flag; the decode kernel with the flag (a prefill graph's decode rows), with
    # splits (2 rows) and without (64 rows).
    assert sorted(kw["SKIP_SINGLE"] for n, kw in compiled if n == "prefill") == [0, 2]
    split = [kw for n, kw in compiled if n == "split"]
    assert sorted((kw["READ_FLAG"], kw["SPLIT"]) for kw in split) == [(False, False), (False, True), (True, False)]
    # A decode graph with splits reads each replay's split from the device, as captured.
    assert [kw["SPLIT_TOKENS_FROM_PTR"] for kw in split if kw["SPLIT"]] == [True]
    reduce = [kw for n, kw in compiled if n == "reduce"]
    assert [kw["SPLIT_TOKENS_FROM_PTR"] for kw in reduce] == [True]
    assert names.count("write") == 4  # the profiling pass, a prefill graph, two decode graphs
    # The profiling pass's 1,024-token step writes its KV one program per token.
    assert names.count("write_tokens") == 1
    assert names.count("sample") == 1  # float32 logits only once (the model's dtype is float32 here)


def test_no_graphs_no_graph_variants():
    shapes = _shapes(torch.device("cpu"), decode_graph_sizes=(), mixed_graphs=False, fused_sampling=False,
                     max_num_batched_tokens=512)
    assert len(precompile._tasks(shapes)) == 1  # the profiling pass's write and prefill
    # From 1,024 tokens a step's KV write is the other kernel: one variant more.
    assert len(precompile._tasks(dataclasses.replace(shapes, max_num_batched_tokens=1024))) == 2
