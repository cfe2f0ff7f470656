"""Tensor-parallel layers against their unsharded counterparts: which heads, rows and
columns each rank holds; shards loaded from a checkpoint that put together give the full
weights back; each layer's per-rank results, combined as its collective combines them,
give the full layer's result; and a sharded model's forward on two real gloo ranks gives
the full model's logits."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import ondo.distributed.group as group_module
from ondo.distributed.checks import check_tensor_parallel
from ondo.kernels.metadata import AttentionMetadata
from ondo.model.config import ModelConfig
from ondo.model.loader import load_model
from ondo.model.parallel_layers import Shard, kv_head_range, vocab_parallel_logits, vocab_range
from tests.tiny_checkpoints import tiny_hf_model

CPU = torch.device("cpu")


def config_of(heads: int, kv_heads: int, intermediate: int = 96, vocab: int = 128) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab, 64, intermediate, 2, heads, kv_heads, 16, 1e-6, 1e4)


def test_kv_heads_are_split_or_replicated_so_each_rank_holds_those_its_query_heads_use():
    assert [kv_head_range(2, Shard(r, 2)) for r in range(2)] == [(0, 1), (1, 1)]
    assert [kv_head_range(1, Shard(r, 2)) for r in range(2)] == [(0, 1), (0, 1)]  # replicated
    assert [kv_head_range(2, Shard(r, 4)) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_head_range(8, Shard(r, 4)) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    for heads, kv_heads in [(4, 2), (4, 1), (8, 2), (9, 3), (12, 4), (32, 8), (16, 8)]:
        for size in range(1, heads + 1):
            try:
                check_tensor_parallel(size, config_of(heads, kv_heads, intermediate=96 * 5 * 7),
                                      CPU, 0)
            except ValueError:
                continue
            group = heads // kv_heads  # query heads per KV head
            for rank in range(size):
                q_start, q_count = Shard(rank, size).split(heads)
                kv_start, kv_count = kv_head_range(kv_heads, Shard(rank, size))
                used = {q // group for q in range(q_start, q_start + q_count)}
                assert used == set(range(kv_start, kv_start + kv_count)), (heads, kv_heads, size, rank)
                # The kernels group a rank's query heads evenly over its KV heads: that
                # grouping must pair each query head with the KV head it uses.
                local_group = q_count // kv_count
                for i in range(q_count):
                    assert (q_start + i) // group - kv_start == i // local_group


def test_the_vocabulary_is_padded_to_equal_ranges():
    assert [vocab_range(127, Shard(r, 2)) for r in range(2)] == [(0, 64, 64), (64, 127, 64)]
    assert [vocab_range(10, Shard(r, 4)) for r in range(4)] == [(0, 3, 3), (3, 6, 3), (6, 9, 3),
                                                               (9, 10, 3)]
    assert vocab_range(49152, Shard(2, 3)) == (32768, 49152, 16384)


def test_sizes_the_model_or_machine_cannot_take_are_refused_naming_the_flag():
    cases = [
        (0, config_of(4, 2), "must be >= 1"),
        (2, config_of(9, 3), "9 attention heads"),
        (3, config_of(12, 4), "4 KV heads"),
        (6, config_of(12, 4), "multiple of them"),
        (3, config_of(9, 3, intermediate=100), "intermediate size 100"),
        (4, config_of(4, 2, vocab=3), "vocabulary of 3"),
    ]
    for size, config, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            check_tensor_parallel(size, config, CPU, 0)
        assert "--tensor-parallel-size" in str(info.value)
    check_tensor_parallel(4, config_of(12, 2), CPU, 0)  # KV heads replicated twice
    check_tensor_parallel(3, config_of(9, 3), CPU, 0)  # the embedded SmolLM2's shape
    with pytest.raises(ValueError, match=r"needs 2 GPUs \(cuda:0 to cuda:1\).* 1 are visible"):
        check_tensor_parallel(2, config_of(4, 2), torch.device("cuda"), 1)
    with pytest.raises(ValueError, match=r"cuda:3 to cuda:4"):
        check_tensor_parallel(2, config_of(4, 2), torch.device("cuda:3"), 4)
    check_tensor_parallel(2, config_of(4, 2), torch.device("cuda:2"), 4)


# -- shards against the full model, in one process --------------------------------------


@pytest.fixture(scope="module", params=["kv2", "kv1-bias-odd-vocab"])
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint: KV heads split (2 over 2 ranks); or replicated (1), with QKV bias,
    an untied LM head and a vocabulary (127) that 2 does not divide."""
    if request.param == "kv2":
        hf = tiny_hf_model("LlamaConfig", {"tie_word_embeddings": True})
    else:
        hf = tiny_hf_model("Qwen2Config", {"num_key_value_heads": 1, "vocab_size": 127,
                                           "tie_word_embeddings": False})
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    full, config = load_model(str(path), "auto", torch.float32, CPU)
    shards = [load_model(str(path), "auto", torch.float32, CPU, Shard(r, 2))[0] for r in range(2)]
    return str(path), config, full, shards


def test_loaded_shards_put_together_are_the_full_weights(checkpoint):
    _, cfg, full, shards = checkpoint
    d, heads, kv_heads = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for i, layer in enumerate(full.model.layers):
        parts = [s.model.layers[i] for s in shards]
        q_full = layer.self_attn.qkv_proj.weight[: heads * d]
        q_shards = [p.self_attn.qkv_proj.weight[: heads // 2 * d] for p in parts]
        assert torch.equal(torch.cat(q_shards), q_full)
        for name in ("k", "v"):
            start, length = layer.self_attn.shard_rows(name)
            full_kv = layer.self_attn.qkv_proj.weight[start: start + length]
            for rank, p in enumerate(parts):
                s, n = p.self_attn.shard_rows(name)
                first, count = kv_head_range(kv_heads, Shard(rank, 2))
                assert torch.equal(p.self_attn.qkv_proj.weight[s: s + n],
                                   full_kv[first * d: (first + count) * d])
        if cfg.attention_bias:
            b_full = layer.self_attn.qkv_proj.bias
            assert torch.equal(torch.cat([p.self_attn.qkv_proj.bias[: heads // 2 * d] for p in parts]),
                               b_full[: heads * d])
        size = cfg.intermediate_size
        gate_up = layer.mlp.gate_up_proj.weight
        for piece in range(2):  # gate, then up: each split, each in its own half of the shard
            rows = [p.mlp.gate_up_proj.weight[piece * size // 2: (piece + 1) * size // 2] for p in parts]
            assert torch.equal(torch.cat(rows), gate_up[piece * size: (piece + 1) * size])
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            cols = [p.get_submodule(name).weight for p in parts]
            assert torch.equal(torch.cat(cols, dim=1), layer.get_submodule(name).weight)
        for name in ("input_layernorm", "post_attention_layernorm"):
            assert all(torch.equal(p.get_submodule(name).weight, layer.get_submodule(name).weight)
                       for p in parts)
    vocab = cfg.vocab_size
    rows = torch.cat([s.lm_head_weight for s in shards])
    assert torch.equal(rows[:vocab], full.lm_head_weight)
    assert torch.all(rows[vocab:] == 0)  # padding past the vocabulary


class _SumOfRanks:
    """A stand-in group for one process: all_reduce keeps each rank's partial result, so
    the test can add them as the real collective would."""

    def __init__(self) -> None:
        self.partials: list[torch.Tensor] = []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.partials.append(x.clone())
        return x


def test_each_layer_s_rank_results_combined_give_the_full_layer(checkpoint, monkeypatch):
    _, cfg, full, shards = checkpoint
    stub = _SumOfRanks()
    monkeypatch.setattr(group_module, "_GROUP", stub)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, cfg.hidden_size, generator=gen)
    layer, parts = full.model.layers[0], [s.model.layers[0] for s in shards]
    with torch.no_grad():
        # Column-parallel: each rank's output columns are a slice of the full output.
        qkv = [p.self_attn.qkv_proj(x) for p in parts]
        q = F.linear(x, layer.self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.bias)
        q_local = cfg.num_attention_heads // 2 * cfg.head_dim
        assert torch.allclose(torch.cat([o[:, :q_local] for o in qkv], -1),
                              q[:, : 2 * q_local], atol=1e-6)
        # Row-parallel: one all-reduce per layer adds the ranks' partial sums.
        attn = torch.randn(5, cfg.q_size, generator=gen)
        for rank, p in enumerate(parts):
            p.self_attn.o_proj(attn[:, rank * q_local: (rank + 1) * q_local])
        assert len(stub.partials) == 2
        assert torch.allclose(stub.partials[0] + stub.partials[1],
                              F.linear(attn, layer.self_attn.o_proj.weight), atol=1e-5)
        # Vocabulary-parallel embedding: out-of-range ids look up zeros; the sum is the row.
        stub.partials.clear()
        ids = torch.tensor([0, 1, cfg.vocab_size // 2, cfg.vocab_size - 1, 63, 64])
        for s in shards:
            s.model.embed_tokens(ids)
        assert torch.equal(stub.partials[0] + stub.partials[1], full.model.embed_tokens(ids))
        assert all(torch.count_nonzero(p.abs().sum(-1)) < len(ids) for p in stub.partials)


class _GatherFrom:
    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor]:
        assert torch.equal(x, self.parts[0])
        return self.parts


def test_vocab_parallel_logits_gather_in_rank_order_and_cut_the_padding(checkpoint, monkeypatch):
    _, cfg, full, shards = checkpoint
    hidden = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        local = [F.linear(hidden, s.lm_head_weight) for s in shards]
        monkeypatch.setattr(group_module, "_GROUP", _GatherFrom(local))
        logits = vocab_parallel_logits(hidden, shards[0].lm_head_weight, cfg.vocab_size, Shard(0, 2))
        assert logits.shape == (3, cfg.vocab_size)
        assert torch.allclose(logits, full.compute_logits(hidden), atol=1e-5)


# -- a sharded model's forward on two real gloo ranks --------------------------------------


def _rank_forward(rank: int, path: str, port: int, ids: list[int], out: mp.Queue) -> None:
    """One rank: its shard's forward over a prefill of `ids` through the paged KV cache,
    then the logits (rank 0 puts them in `out`)."""
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False,
                              timeout=timedelta(seconds=60))
        group = group_module.init_tensor_parallel(rank, 2, store, CPU, timeout_s=60)
        model, cfg = load_model(path, "auto", torch.float32, CPU, Shard(rank, 2))
        n, bs = len(ids), 4
        caches = [(torch.zeros(8, bs, model.num_kv_heads, cfg.head_dim),
                   torch.zeros(8, bs, model.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n), block_tables=torch.arange(8, dtype=torch.int32)[None],
            context_lens=torch.tensor([n], dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_query_len=n,
            max_context_len=n, block_size=bs, query_lens_cpu=[n], context_lens_cpu=[n])
        with torch.no_grad():
            hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)
            logits = model.compute_logits(hidden)
        if rank == 0:
            out.put(logits.tolist())
        group.barrier()
        group_module.destroy_tensor_parallel()
    except BaseException:
        out.put(traceback.format_exc())
        os._exit(1)


def test_a_sharded_forward_on_two_gloo_ranks_gives_the_full_model_s_logits(checkpoint):
    path, cfg, full, _ = checkpoint
    from tests.server_process import free_port

    ids = [3, 17, 64, 63, 100, 5, 9, 11, 120, 1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_forward, args=(r, path, port, ids, out), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = out.get(timeout=120)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert not isinstance(result, str), result
    n = len(ids)
    caches = [(torch.zeros(8, 4, cfg.num_key_value_heads, cfg.head_dim),
               torch.zeros(8, 4, cfg.num_key_value_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(8, dtype=torch.int32)[None],
        context_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_query_len=n,
        max_context_len=n, block_size=4, query_lens_cpu=[n], context_lens_cpu=[n])
    with torch.no_grad():
        expected = full.compute_logits(full(torch.tensor(ids), torch.arange(n), caches, meta))
    result = torch.tensor(result)
    assert result.shape == (n, cfg.vocab_size)
    assert expected.abs().max() > 0.5  # logits large enough for the comparison to mean something
    assert torch.allclose(result, expected, atol=1e-4), (result - expected).abs().max()
    assert [p.exitcode for p in procs] == [0, 0]
