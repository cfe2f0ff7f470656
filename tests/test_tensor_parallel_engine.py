"""The tensor-parallel engine on the CPU (gloo, float32, worker processes with one thread):
greedy outputs and their log-probabilities equal the one-rank engine's on tiny Llama, Qwen2
(one KV head, replicated on both ranks) and Qwen3 checkpoints and on the embedded SmolLM2;
preemption by swap and by recompute, prefix caching and copy-on-write leak no block and
change no token; a worker killed mid-run fails the engine at once, naming the rank and how
it died; sizes the model or the machine cannot take are refused at start-up."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

from ondo import LLM, SamplingParams
from ondo.cli import main as ondo_main
from ondo.distributed.sharded_runner import ShardedModelRunner
from ondo.distributed.workers import TensorParallelWorkers
from ondo.engine.config import EngineArgs
from ondo.engine.llm_engine import StepFailed
from ondo.engine.model_runner import ModelRunner
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

CASES = {
    # KV heads split (one per rank); tied embeddings; a vocabulary 2 does not divide.
    "llama": ("LlamaConfig", {"tie_word_embeddings": True, "vocab_size": 127}, {}),
    # One KV head, replicated on both ranks; QKV bias; an LM head of its own.
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 1, "tie_word_embeddings": False}, {}),
    # Per-head q/k norm, head_dim 24; asynchronous scheduling (the previous step's draws
    # cross to the other rank on the device group).
    "qwen3": ("Qwen3Config", {"head_dim": 24}, {"async_scheduling": True}),
}
ENGINE = dict(block_size=4, max_num_batched_tokens=48, kv_cache_memory=1 << 22, max_model_len=192)
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Rank 0 is this process: one thread, as each worker has, on a machine of two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny(tmp_path_factory, name: str, config_class: str, overrides: dict) -> str:
    path = tmp_path_factory.mktemp(name)
    tiny_hf_model(config_class, overrides).save_pretrained(path)
    return str(path)


def random_prompts(n: int, seed: int, vocab: int = TINY_SHAPE["vocab_size"],
                   max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def assert_same_greedy(reference, outputs, tolerance: float = 1e-4) -> None:
    """Token for token, with log-probabilities within `tolerance`; where the reference's
    top two are closer than that (a true tie, which rounding may break either way), the
    comparison of that sequence stops there."""
    for ref, out in zip(reference, outputs, strict=True):
        for a, b in zip(ref.outputs, out.outputs, strict=True):
            assert len(a.token_ids) == len(b.token_ids)
            for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
                if x != y:
                    top = sorted(a.logprobs[i].values(), reverse=True)
                    assert top[0] - top[1] < tolerance and y in a.logprobs[i], (i, x, y, top)
                    break
                assert abs(a.logprobs[i][x] - b.logprobs[i][y]) < tolerance, (i, a.logprobs[i], b.logprobs[i])


def assert_nothing_leaked(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_cpu_blocks_used"] == 0
    assert all(c == 0 for c in llm.engine.block_manager.gpu.ref_counts)


def gone(pids: list[int], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and _not_zombie(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_generate_what_one_rank_does(case, tmp_path_factory):
    config_class, overrides, extra = CASES[case]
    path = save_tiny(tmp_path_factory, case, config_class, overrides)
    vocab = overrides.get("vocab_size", TINY_SHAPE["vocab_size"])
    prompts = random_prompts(8, seed=1, vocab=vocab)  # chunked prefills beside decodes
    one = LLM(path, **ENGINE, **extra)
    # One rank: the runner as it always was, and no process group.
    assert one.engine.workers is None and type(one.engine.runner) is ModelRunner
    assert not dist.is_initialized()
    reference = one.generate(prompts, GREEDY)
    two = LLM(path, tensor_parallel_size=2, **ENGINE, **extra)
    try:
        pids = two.engine.workers.pids
        assert len(pids) == 1 and isinstance(two.engine.runner, ShardedModelRunner)
        outputs = two.generate(prompts, GREEDY)
        assert_same_greedy(reference, outputs)
        assert_nothing_leaked(two)
        # Each rank's KV cache holds its own KV heads: half of them, or the one replicated.
        kv_heads = overrides.get("num_key_value_heads", TINY_SHAPE["num_key_value_heads"])
        ratio = 2 if kv_heads >= 2 else 1
        assert one.engine.runner.bytes_per_block == ratio * two.engine.runner.bytes_per_block
        if extra.get("async_scheduling"):
            assert two.engine.num_steps_ahead > 0
    finally:
        two.close()
    assert gone(pids) and not dist.is_initialized()


def test_preemption_and_prefix_caching_on_two_ranks_leak_nothing_and_change_nothing(tmp_path_factory):
    path = save_tiny(tmp_path_factory, "llama-small-cache", "LlamaConfig", {})
    prompts = random_prompts(10, seed=4, max_len=40)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    shared = random_prompts(1, seed=5, max_len=30)[0] + [7] * 13  # 13: ends mid-block
    shared_prompts = [shared + tail for tail in random_prompts(4, seed=6, max_len=9)]
    forked = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, n=2)
    reference_llm = LLM(path, block_size=4, max_num_batched_tokens=48, num_kv_blocks=512,
                        max_model_len=128)
    reference = reference_llm.generate(prompts, params)
    reference_shared = reference_llm.generate(shared_prompts, forked)
    llm = LLM(path, tensor_parallel_size=2, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
              num_kv_blocks=40, max_model_len=128, swap_space=0.01)
    try:
        scheduler = llm.engine.scheduler
        for mode in ("swap", "recompute"):
            scheduler.preemption_mode = mode
            before = llm.stats()[f"num_preemptions_{mode}"]
            assert_same_greedy(reference, llm.generate(prompts, params))
            assert llm.stats()[f"num_preemptions_{mode}"] > before, mode
            assert_nothing_leaked(llm)
        assert llm.stats()["num_swapped_in_blocks"] > 0
        hits = llm.stats()["prefix_cache_hits"]
        assert_same_greedy(reference_shared, llm.generate(shared_prompts, forked))
        stats = llm.stats()
        assert stats["prefix_cache_hits"] - hits >= 8  # later prompts found the shared blocks
        assert stats["num_cow_copies"] > 0  # forked sequences appended into a shared block
        assert_nothing_leaked(llm)
    finally:
        llm.close()


def test_a_worker_killed_mid_run_fails_the_engine_at_once_naming_it(tmp_path_factory):
    path = save_tiny(tmp_path_factory, "llama-kill", "LlamaConfig", {})
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    engine = llm.engine
    (pid,) = engine.workers.pids
    try:
        for i, prompt in enumerate(random_prompts(4, seed=2)):
            engine.add_request(f"r{i}", prompt_token_ids=prompt,
                               params=SamplingParams(max_tokens=150, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine.device_ok()
        os.kill(pid, signal.SIGKILL)
        killed_s = time.monotonic()
        with pytest.raises(StepFailed) as info:
            while time.monotonic() - killed_s < 60:
                engine.step()
        failed_s = time.monotonic() - killed_s
        message = str(info.value)
        assert "worker rank 1" in message and f"pid {pid}" in message
        assert "exit code -9 (SIGKILL)" in message and "--tensor-parallel-size 2" in message
        assert failed_s < 30.0  # noticed, not waited out (a collective's timeout is 600 s)
        errors = [o for o in info.value.outputs if o.error is not None]
        assert len(errors) == 4 and all(o.outputs[0].finish_reason == "error" for o in errors)
        assert not engine.device_ok()  # what ends an engine process, to be restarted
        # The offline API says so too, at once, rather than waiting on the dead rank.
        with pytest.raises(StepFailed, match="rank 1 .*SIGKILL"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    finally:
        llm.close()
    assert not dist.is_initialized()


def test_sizes_the_model_or_machine_cannot_take_are_refused_at_start_up(tmp_path_factory, capsys,
                                                                         monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size=0.*--tensor-parallel-size"):
        EngineArgs(tensor_parallel_size=0)
    # The embedded SmolLM2 has 9 attention heads: refused from its config alone, before a
    # worker starts or a weight loads.
    import ondo.engine.llm_engine as llm_engine

    def no_loading(*args):
        raise AssertionError("weights were loaded for a size that cannot run")

    monkeypatch.setattr(llm_engine, "load_model", no_loading)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size\): must divide the model's 9 "):
        LLM(device="cpu", tensor_parallel_size=2)
    assert not mp.active_children()
    path = save_tiny(tmp_path_factory, "llama-odd-mlp", "LlamaConfig", {"intermediate_size": 90})
    with pytest.raises(ValueError, match="intermediate size 90"):
        LLM(path, tensor_parallel_size=4)
    assert ondo_main(["generate", "--device", "cpu", "--prompt", "hi", "--tensor-parallel-size",
                      "0"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err
    assert ondo_main(["generate", "--model", path, "--device", "cpu", "--prompt", "hi",
                      "--tensor-parallel-size", "4"]) == 2
    assert "intermediate size 90" in capsys.readouterr().err
    assert ondo_main(["serve", "--device", "cpu", "--tensor-parallel-size", "-1"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err
    assert not dist.is_initialized()


@pytest.mark.slow
def test_three_ranks_generate_what_one_rank_does_on_the_embedded_model():
    """SmolLM2-135M: 9 heads and 3 KV heads over 3 ranks (one KV head each), a tied
    vocabulary of 49,152 split in three; text prompts through its tokenizer."""
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a land far away,", "1, 2, 3, 5, 8,"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    reference = LLM(device="cpu", max_num_batched_tokens=64, max_model_len=256).generate(prompts, params)
    llm = LLM(device="cpu", tensor_parallel_size=3, max_num_batched_tokens=64, max_model_len=256)
    try:
        assert len(llm.engine.workers.pids) == 2
        outputs = llm.generate(prompts, params)
        assert_same_greedy(reference, outputs, tolerance=1e-3)
        same = [(r.outputs[0], o.outputs[0]) for r, o in zip(reference, outputs)
                if r.outputs[0].token_ids == o.outputs[0].token_ids]
        assert len(same) >= 3 and all(r.text == o.text and r.text for r, o in same)
        assert_nothing_leaked(llm)
    finally:
        llm.close()


def test_a_failed_start_leaves_no_worker_behind(tmp_path_factory, monkeypatch):
    """Every rank finds the KV cache too small for one sequence; the engine says so and its
    worker is gone, and a tensor-parallel engine can start again in this process (and stops
    its worker when collected)."""
    path = save_tiny(tmp_path_factory, "llama-no-room", "LlamaConfig", {})
    abandoned: list[int] = []
    abandon = TensorParallelWorkers.abandon

    def recording(self):
        abandoned.extend(self.pids)
        abandon(self)

    monkeypatch.setattr(TensorParallelWorkers, "abandon", recording)
    with pytest.raises(ValueError, match="max_model_len=128 needs 32 blocks"):
        LLM(path, tensor_parallel_size=2, block_size=4, num_kv_blocks=8, max_model_len=128)
    assert len(abandoned) == 1 and gone(abandoned)
    assert not dist.is_initialized()
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    pids = llm.engine.workers.pids
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    # Dropped without close(): collected, it stops its worker all the same.
    del llm, out
    gc.collect()
    assert gone(pids) and not dist.is_initialized()


def test_a_worker_that_fails_says_why_in_the_engine_s_error():
    """A worker's own error (here: a GPU it cannot have) crosses to rank 0 before the worker
    exits, and ends up in the failure the engine reports."""
    from ondo.distributed.worker import run_worker
    from ondo.distributed.workers import _Worker

    ctx = mp.get_context("spawn")
    errors, errors_send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_worker, args=(EngineArgs(), 1, 2, 1, "cuda:99", errors_send,
                                                   30, 1), daemon=True)
    process.start()
    errors_send.close()
    process.join(60)
    watch = object.__new__(TensorParallelWorkers)
    text = watch._describe(_Worker(1, torch.device("cuda", 99), process, errors))
    assert text.startswith(f"tensor-parallel worker rank 1 (pid {process.pid}, cuda:99) died with "
                           "exit code 1: ")
    said = text.split("exit code 1: ", 1)[1]  # its exception, as it sent it
    assert re.fullmatch(r"\w+(Error|Exception): .*(cuda|CUDA).*", said), said
