"""The doing side of a step: batch tensors, KV cache, swap copies, forward pass, logits.

It takes a `SchedulerOutput` and returns logits for the sequences that sample; it
never decides what runs. At start it profiles one forward pass at the largest batch
the scheduler may form and turns what memory is left into a fixed number of KV blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ondo.engine.config import EngineArgs
from ondo.engine.memory import MemoryPlan, kv_bytes_per_block
from ondo.engine.scheduler import PreemptionCosts, SchedulerOutput
from ondo.kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30
CPU_PROFILE_TOKENS = 128  # CPU profiling only measures speed; memory is a byte budget there


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose next token is sampled
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_tokens_read: int


class ModelRunner:
    def __init__(self, args: EngineArgs, model: torch.nn.Module, config, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.args = args
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = args.block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_layers = config.num_hidden_layers
        self.kv_shape_tail = (self.block_size, config.num_key_value_heads, config.head_dim)
        self.bytes_per_block = kv_bytes_per_block(
            self.num_layers, config.num_key_value_heads, config.head_dim, self.block_size, dtype
        )
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.kv_cache: torch.Tensor | None = None  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.cpu_pool: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.plan: MemoryPlan | None = None
        self.costs: PreemptionCosts | None = None

    # -- start-up --------------------------------------------------------------
    def _dummy_batch(self, num_tokens: int, cache_blocks: int) -> StepBatch:
        """Sequences of at most max_model_len tokens filling `num_tokens`, blocks laid in order."""
        lens = []
        left = num_tokens
        while left > 0:
            lens.append(min(left, self.max_model_len))
            left -= lens[-1]
        blocks_per_seq = [(n + self.block_size - 1) // self.block_size for n in lens]
        assert sum(blocks_per_seq) <= cache_blocks
        tables, slots, start = [], [], 0
        for n, nb in zip(lens, blocks_per_seq):
            table = list(range(start, start + nb))
            tables.append(table)
            slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size for p in range(n))
            start += nb
        width = max(blocks_per_seq)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        qsl = torch.tensor([0] + list(_cumsum(lens)), dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=bt.to(self.device),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            query_start_loc=qsl.to(self.device),
            max_query_len=max(lens),
            max_context_len=max(lens),
            block_size=self.block_size,
            query_lens_cpu=lens,
            context_lens_cpu=lens,
        )
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        input_ids = torch.randint(0, self.config.vocab_size, (num_tokens,), device=self.device)
        logits_idx = (qsl[1:] - 1).long().to(self.device)
        return StepBatch(input_ids, positions, meta, logits_idx, num_tokens, 0, num_tokens)

    def _profile_forward(self, num_tokens: int) -> float:
        """One forward pass plus logits at the largest sampling batch; returns seconds."""
        nb = sum((min(num_tokens - i, self.max_model_len) + self.block_size - 1) // self.block_size
                 for i in range(0, num_tokens, self.max_model_len))
        cache = torch.empty((self.num_layers, 2, nb, *self.kv_shape_tail), dtype=self.dtype, device=self.device)
        caches = [(cache[i, 0], cache[i, 1]) for i in range(self.num_layers)]
        batch = self._dummy_batch(num_tokens, nb)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, caches, batch.meta)
            rows = min(self.args.max_num_seqs, num_tokens)
            logits = self.model.compute_logits(hidden[:rows])
            logits.softmax(-1)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def profile_and_allocate(self) -> MemoryPlan:
        args = self.args
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._profile_forward(self.max_num_batched_tokens)  # warm-up and peak
            peak = torch.cuda.max_memory_allocated(self.device)
            elapsed = self._profile_forward(self.max_num_batched_tokens)
            prefill_tps = self.max_num_batched_tokens / elapsed
            free, total = torch.cuda.mem_get_info(self.device)
            torch_reserved = torch.cuda.memory_reserved(self.device)
            other = total - free - torch_reserved  # CUDA context, other processes
            activations = peak - base
            budget = int(args.gpu_memory_utilization * total - peak - other)
            source = "profiled"
        else:
            tokens = min(self.max_num_batched_tokens, CPU_PROFILE_TOKENS)
            self._profile_forward(min(tokens, 16))  # warm-up
            elapsed = self._profile_forward(tokens)
            prefill_tps = tokens / elapsed
            activations = 0
            budget = args.kv_cache_memory or CPU_DEFAULT_KV_BYTES
            source = "kv_cache_memory"
        num_blocks = max(budget, 0) // self.bytes_per_block
        if args.num_kv_blocks is not None:
            num_blocks, source = args.num_kv_blocks, "num_kv_blocks"
        num_cpu_blocks = int(args.swap_space * (1 << 30)) // self.bytes_per_block
        needed = (self.max_model_len + self.block_size - 1) // self.block_size
        if num_blocks < needed:
            hint = ("raise num_kv_blocks" if args.num_kv_blocks is not None else
                    "raise gpu_memory_utilization" if self.device.type == "cuda" else "raise kv_cache_memory")
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks ({num_blocks * self.block_size} tokens) but one "
                f"sequence of max_model_len={self.max_model_len} needs {needed} blocks: {hint}, or lower "
                f"max_model_len"
            )
        self.allocate(num_blocks, num_cpu_blocks)
        swap_bps = self._measure_swap_bandwidth()
        self.costs = PreemptionCosts(self.bytes_per_block, swap_bps, prefill_tps)
        self.plan = MemoryPlan(
            device=str(self.device), weights_bytes=self.weights_bytes,
            activations_peak_bytes=activations, kv_budget_bytes=max(budget, 0),
            kv_bytes_per_block=self.bytes_per_block, num_gpu_blocks=num_blocks,
            num_cpu_blocks=num_cpu_blocks, block_size=self.block_size, source=source,
        )
        log.info(self.plan.describe())
        log.info("measured: prefill %.0f tokens/s, host-link copy %.2f GB/s", prefill_tps, swap_bps / 1e9)
        return self.plan

    def allocate(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.kv_cache = torch.zeros(
            (self.num_layers, 2, num_blocks, *self.kv_shape_tail), dtype=self.dtype, device=self.device
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.num_layers)]
        pin = self.device.type == "cuda"
        # The pool is touched page by page only when blocks land in it.
        self.cpu_pool = torch.empty(
            (self.num_layers, 2, num_cpu_blocks, *self.kv_shape_tail), dtype=self.dtype, pin_memory=pin
        )

    def _measure_swap_bandwidth(self) -> float:
        n = min(64, self.kv_cache.shape[2], self.cpu_pool.shape[2])
        if n == 0:
            return 1e9
        mapping = [(i, i) for i in range(n)]
        self.swap_out(mapping)  # warm-up
        self._sync()
        t0 = time.perf_counter()
        self.swap_out(mapping)
        self._sync()
        elapsed = max(time.perf_counter() - t0, 1e-9)
        return n * self.bytes_per_block / elapsed

    # -- swapping ---------------------------------------------------------------
    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        _copy_along_blocks(self.kv_cache, self.cpu_pool, mapping)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        _copy_along_blocks(self.cpu_pool, self.kv_cache, mapping)

    # -- a step -----------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        query_lens, context_lens, logits_idx = [], [], []
        tables = []
        prefill = decode = kv_read = 0
        offset = 0
        for item in sched.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            pos = torch.arange(start, end)
            positions.append(pos)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(seq.block_table)
            query_lens.append(n)
            context_lens.append(end)
            kv_read += end
            if n == 1 and start > 0:
                decode += 1
            else:
                prefill += n
            offset += n
            if item.samples:
                logits_idx.append(offset - 1)
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev, non_blocking=True),
            block_tables=bt.to(dev, non_blocking=True),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor([0, *_cumsum(query_lens)], dtype=torch.int32).to(dev, non_blocking=True),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            block_size=bs,
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
        )
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.cat(positions).to(dev, non_blocking=True),
            meta=meta,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long).to(dev, non_blocking=True),
            num_prefill_tokens=prefill,
            num_decode_tokens=decode,
            kv_tokens_read=kv_read,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, batch: StepBatch) -> torch.Tensor | None:
        """Run the step's copies and forward pass; logits [num sampling rows, vocab] float32."""
        if sched.swap_out:
            self.swap_out(sched.swap_out)
        if sched.swap_in:
            self.swap_in(sched.swap_in)
        if sched.block_copies:  # copy-on-write, after the swaps, before anything writes
            _copy_along_blocks(self.kv_cache, self.kv_cache, sched.block_copies)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        if batch.logits_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, batch.logits_indices)).float()

    def step_cost(self, batch: StepBatch) -> tuple[float, float]:
        """Estimated FLOPs and bytes moved by a step: the engine's load descriptor inputs."""
        cfg = self.config
        tokens = batch.num_prefill_tokens + batch.num_decode_tokens
        matmul_params = self.weights_bytes / max(self.dtype.itemsize, 1) - cfg.vocab_size * cfg.hidden_size
        flops = 2.0 * matmul_params * tokens
        flops += 4.0 * cfg.num_attention_heads * cfg.head_dim * self.num_layers * batch.kv_tokens_read
        kv_token_bytes = self.bytes_per_block / self.block_size
        bytes_moved = self.weights_bytes + kv_token_bytes * (batch.kv_tokens_read + tokens)
        return flops, bytes_moved


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _copy_along_blocks(src: torch.Tensor, dst: torch.Tensor, mapping: list[tuple[int, int]]) -> None:
    """Whole blocks of every layer, src[:, :, a] -> dst[:, :, b] (blocks are dim 2)."""
    if not mapping:
        return
    src_idx = torch.tensor([a for a, _ in mapping], dtype=torch.long, device=src.device)
    dst_idx = torch.tensor([b for _, b in mapping], dtype=torch.long, device=dst.device)
    dst[:, :, dst_idx] = src[:, :, src_idx].to(dst.device, non_blocking=True)
