"""The doing side of a step: batch tensors, KV cache, swap copies, forward pass, logits.

It takes a `SchedulerOutput` and returns logits for the sequences that sample; it
never decides what runs. At start it profiles one forward pass at the largest batch
the scheduler may form and turns what memory is left into a fixed number of KV blocks.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ondo.engine import staging
from ondo.engine.config import EngineArgs
from ondo.engine.memory import MemoryPlan, kv_bytes_per_block
from ondo.engine.sampler import fused_sampling, sample_on_device
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler import PreemptionCosts, ScheduledSeq, SchedulerOutput
from ondo.engine.sequence import Sequence
from ondo.engine.step_cost import CostShape, step_cost
from ondo.kernels.attention import check_switches, splits_mixed_step
from ondo.kernels.block_copy import copy_blocks, swap_in, swap_out
from ondo.kernels.decode_splits import decode_longest_first, graph_split_tokens
from ondo.kernels.gate_up_silu import check_gate_up_tiles, fused_gate_up_silu
from ondo.kernels.metadata import AttentionMetadata
from ondo.kernels.precompile import Precompile
from ondo.kernels.qk_norm_rope import fused_qk_norm_rope
from ondo.model.residual_add import residual_add_in_norm

log = logging.getLogger(__name__)
_PROFILE_SAMPLING = SamplingParams(temperature=1.0)

CPU_DEFAULT_KV_BYTES = 1 << 30
CPU_PROFILE_TOKENS = 128  # CPU profiling only measures speed; memory is a byte budget there


@dataclass
class HostBatch:
    """A step's flat batch on the host, as plain numpy: what `prepare` packs from the
    scheduler's output and `upload` moves to the device, and what rank 0 of a
    tensor-parallel engine sends the other ranks each step."""

    input_ids: np.ndarray  # [T] int64; 0 where the token is still on the device
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [B, width] int32
    context_lens: np.ndarray  # [B] int64
    query_start_loc: np.ndarray  # [B + 1] int64
    query_lens: np.ndarray  # [B] int64
    logits_indices: np.ndarray  # int64: rows whose next token is sampled
    num_decode_tokens: int
    # Rows of input_ids whose token is still on the device (asynchronous scheduling), and
    # their rows in the previous step's draws.
    pending_dst: np.ndarray | None = None
    pending_src: np.ndarray | None = None


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose next token is sampled
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_tokens_read: int
    host: HostBatch
    # Rows of input_ids whose token is still on the device (asynchronous scheduling), and
    # their rows in the previous step's draws: filled on the device before the forward pass.
    pending_dst: torch.Tensor | None = None
    pending_src: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor  # the captured forward's hidden states [batch, hidden]


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
        # Decode steps' rows packed longest context first (on by default; see `prepare`).
        self.longest_first = decode_longest_first()
        check_switches()  # a bad value fails here, at start
        residual_add_in_norm()
        # Read when the model was built; again here, for a model built before (and loaded
        # once for several engines, as the tests do).
        fused_qk_norm_rope()
        fused_gate_up_silu()
        check_gate_up_tiles()
        self.num_layers = config.num_hidden_layers
        kv_heads = model.num_kv_heads  # this rank's, in a tensor-parallel engine
        self.kv_shape_tail = (self.block_size, kv_heads, config.head_dim)
        self.bytes_per_block = kv_bytes_per_block(
            self.num_layers, kv_heads, config.head_dim, self.block_size, dtype
        )
        self.cost_shape = CostShape.from_config(config, dtype.itemsize, self.num_layers)
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.kv_cache: torch.Tensor | None = None  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.cpu_pool: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.plan: MemoryPlan | None = None
        self.costs: PreemptionCosts | None = None
        self.graphs: dict[int, _Graph] = {}  # decode-only steps, by batch size
        self.graph_sizes: list[int] = []
        self.mixed_graphs: dict[int, _Graph] = {}  # steps with a prefill, by token count
        self.mixed_graph_sizes: list[int] = []
        self.graph_capture_s = 0.0
        self.graph_capture_times_s: list[tuple[str, int, float, float]] = []  # kind, size, warm-up, capture
        self.profile_s = 0.0  # profiling passes (on CUDA the first compiles the fused regions)
        self.precompile: Precompile | None = None  # Triton kernels compiling on threads
        self.precompile_wait_s = 0.0  # what start-up waited for kernels compiled ahead
        self.graph_memory_bytes = 0

    # -- start-up --------------------------------------------------------------
    def _dummy_batch(self, num_tokens: int) -> StepBatch:
        """Sequences of at most max_model_len random tokens filling `num_tokens`, packed by
        `prepare` like any step; their blocks are laid out in order from block 0."""
        items, start = [], 0
        for i, begin in enumerate(range(0, num_tokens, self.max_model_len)):
            n = min(num_tokens - begin, self.max_model_len)
            ids = torch.randint(0, self.config.vocab_size, (n,)).tolist()
            seq = Sequence(i, f"profile-{i}", ids, SamplingParams(), 0.0)
            num_blocks = (n + self.block_size - 1) // self.block_size
            seq.block_table = list(range(start, start + num_blocks))
            start += num_blocks
            items.append(ScheduledSeq(seq, n))
        return self.prepare(SchedulerOutput(scheduled=items))

    def _profile_forward(self, num_tokens: int) -> float:
        """One forward pass plus logits at the largest sampling batch; returns seconds."""
        batch = self._dummy_batch(num_tokens)
        nb = int(batch.host.block_tables.max()) + 1
        cache = torch.empty((self.num_layers, 2, nb, *self.kv_shape_tail), dtype=self.dtype, device=self.device)
        caches = [(cache[i, 0], cache[i, 1]) for i in range(self.num_layers)]
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, caches, batch.meta)
            rows = min(self.args.max_num_seqs, num_tokens)
            logits = self.model.compute_logits(hidden[:rows], dtype=None)
            wide = logits.float()
            wide.softmax(-1)  # the peak of the float32 path (logprobs, filters, penalties)
            if fused_sampling(logits.device):
                # Its kernel compiles now, not in a request's step: for the model's logits and
                # for float32 ones (what top-k, top-p and min-p hand it).
                sample_on_device(logits, [_PROFILE_SAMPLING] * rows, [0] * rows)
                sample_on_device(wide, [_PROFILE_SAMPLING] * rows, [0] * rows)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def profile_and_allocate(self) -> MemoryPlan:
        # The kernels compiled ahead are waited for before the profiling pass launches them:
        # a launch that found its variant still compiling on a thread would compile it again.
        self._wait_precompile()
        plan = self._profile_and_allocate()
        self.profile_s += self.precompile_wait_s  # part of the profile phase
        return plan

    def _wait_precompile(self) -> None:
        """Wait for the kernels being compiled ahead (`precompile`, set by the engine)."""
        job, self.precompile = self.precompile, None
        if job is not None:
            job.wait()
            self.precompile_wait_s = job.waited_s

    def _profile_and_allocate(self) -> MemoryPlan:
        args = self.args
        t_start = time.perf_counter()
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
        num_blocks = self.agree_num_blocks(num_blocks)
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
        self.profile_s = time.perf_counter() - t_start
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
        self.capture_cuda_graphs()
        return self.plan

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV blocks every rank can hold (one rank: its own count)."""
        return num_blocks

    def allocate(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.kv_cache = torch.zeros(
            (self.num_layers, 2, num_blocks, *self.kv_shape_tail), dtype=self.dtype, device=self.device
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.num_layers)]
        pin = self.device.type == "cuda"
        # Pageable on CPU: untouched pages cost nothing until blocks land in them.
        self.cpu_pool = torch.empty(
            (self.num_layers, 2, num_cpu_blocks, *self.kv_shape_tail), dtype=self.dtype, pin_memory=pin
        )
        # Block-major views, one per layer and K/V, for the block copies.
        self.kv_layers = [t for pair in self.kv_caches for t in pair]
        self.cpu_layers = [self.cpu_pool[i, j] for i in range(self.num_layers) for j in range(2)]

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
        swap_out(self.kv_layers, self.cpu_layers, mapping).wait()

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        swap_in(self.cpu_layers, self.kv_layers, mapping).wait()

    # -- a step -----------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepBatch:
        """Pack the step's new tokens into one flat batch: work per sequence, never per token x layer."""
        bs = self.block_size
        items = sched.scheduled
        n = len(items)
        if n > self.args.max_num_seqs:
            # The CUDA graphs' input buffers hold max_num_seqs rows; the scheduler keeps to it.
            raise RuntimeError(f"a step of {n} sequences exceeds max_num_seqs={self.args.max_num_seqs}, "
                               "the most the runner's batch buffers hold")
        q_lens = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=n)
        starts = np.fromiter((it.seq.num_computed_tokens for it in items), dtype=np.int64, count=n)
        ctx = starts + q_lens
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        total = int(qsl[-1])
        decode_only = total == n
        # Rows of a decode step in the order the batch packs them; None: the scheduler's.
        order = None
        if decode_only and self.longest_first and n > 1:
            # The GPU starts the decode kernel's programs in row order: longest contexts
            # first, the step ends on short programs spread over the SMs rather than on a
            # long one left running alone. The logits come back in the scheduler's order.
            order = np.argsort(-ctx, kind="stable")
            sampled_rows = np.fromiter((it.samples for it in items), dtype=bool, count=n)
            items = [items[i] for i in order]
            starts, ctx = starts[order], ctx[order]
        pending_dst: list[int] = []
        pending_src: list[int] = []
        if decode_only:
            input_ids = np.zeros(n, dtype=np.int64)
            for i, it in enumerate(items):
                seq, c = it.seq, it.seq.num_computed_tokens
                if c < len(seq.token_ids):
                    input_ids[i] = seq.token_ids[c]
                else:
                    pending_dst.append(i)
                    pending_src.append(seq.pending_row)
            positions = starts
            seq_of_token = np.arange(n)
        else:
            ids: list[int] = []
            for it in items:
                c = it.seq.num_computed_tokens
                chunk = it.seq.token_ids[c : c + it.num_new_tokens]
                if len(chunk) < it.num_new_tokens:  # its last token is still on the device
                    pending_dst.append(len(ids) + len(chunk))
                    pending_src.append(it.seq.pending_row)
                    chunk.append(0)
                ids.extend(chunk)
            input_ids = np.asarray(ids, dtype=np.int64)
            seq_of_token = np.repeat(np.arange(n), q_lens)
            positions = np.arange(total) - qsl[:-1][seq_of_token] + starts[seq_of_token]
        width = max(len(it.seq.block_table) for it in items)
        if width * bs >= self.max_model_len + bs:
            raise RuntimeError(f"a sequence holds {width} blocks, more than max_model_len="
                               f"{self.max_model_len} needs and the batch buffers hold")
        tables = np.zeros((n, width), dtype=np.int32)
        for i, it in enumerate(items):
            tables[i, : len(it.seq.block_table)] = it.seq.block_table
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        if order is None:
            sampling = np.fromiter((it.samples for it in items), dtype=bool, count=n)
            logits_indices = (qsl[1:] - 1)[sampling]
        else:  # the packed row of each sampled row, in the scheduler's order
            packed_row = np.empty(n, dtype=np.int64)
            packed_row[order] = np.arange(n)
            logits_indices = packed_row[sampled_rows]
        return self.upload(HostBatch(
            input_ids=input_ids,
            positions=np.ascontiguousarray(positions),
            slot_mapping=slots,
            block_tables=tables,
            context_lens=ctx,
            query_start_loc=qsl,
            query_lens=q_lens,
            logits_indices=logits_indices,
            num_decode_tokens=int(((q_lens == 1) & (starts > 0)).sum()),
            pending_dst=np.asarray(pending_dst, dtype=np.int64) if pending_dst else None,
            pending_src=np.asarray(pending_src, dtype=np.int64) if pending_dst else None,
        ))

    def upload(self, host: HostBatch) -> StepBatch:
        """The host batch on the device: one pinned staging buffer, one non-blocking copy
        (`ondo.engine.staging`), never waiting for the device."""
        ctx = host.context_lens
        pending = host.pending_dst is not None
        arrays = [host.input_ids, host.positions, host.slot_mapping, host.block_tables,
                  ctx.astype(np.int32), host.query_start_loc.astype(np.int32), host.logits_indices]
        if pending:
            arrays += [host.pending_dst, host.pending_src]
        dev = staging.to_device(arrays, self.device)
        meta = AttentionMetadata(
            slot_mapping=dev[2],
            block_tables=dev[3],
            context_lens=dev[4],
            query_start_loc=dev[5],
            max_query_len=int(host.query_lens.max()),
            max_context_len=int(ctx.max()),
            block_size=self.block_size,
            query_lens_cpu=host.query_lens.tolist(),
            context_lens_cpu=ctx.tolist(),
        )
        total = int(host.query_start_loc[-1])
        return StepBatch(
            input_ids=dev[0],
            positions=dev[1],
            meta=meta,
            logits_indices=dev[6],
            num_prefill_tokens=total - host.num_decode_tokens,
            num_decode_tokens=host.num_decode_tokens,
            kv_tokens_read=int(ctx.sum()),
            host=host,
            pending_dst=dev[7] if pending else None,
            pending_src=dev[8] if pending else None,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, batch: StepBatch,
                prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the step's copies and forward pass; logits [num sampling rows, vocab] in the
        model's dtype (the sampler converts them where it needs float32).
        `prev_tokens`: the previous step's draws, still on the device, for pending tokens."""
        if batch.pending_dst is not None:
            if prev_tokens is None:
                raise RuntimeError("the batch reads pending tokens but no previous draws were given")
            batch.input_ids.index_copy_(0, batch.pending_dst, prev_tokens.index_select(0, batch.pending_src))
        if sched.swap_out:
            self.swap_out(sched.swap_out)
        if sched.swap_in:
            self.swap_in(sched.swap_in)
        if sched.block_copies:  # copy-on-write, after the swaps, before anything writes
            copy_blocks(self.kv_layers, sched.block_copies)
        n = batch.num_tokens
        if batch.meta.is_decode_only:
            graph, replay = self.graphs.get(_padded_size(self.graph_sizes, n)), self._replay
        else:
            graph, replay = self.mixed_graphs.get(_padded_size(self.mixed_graph_sizes, n)), self._replay_mixed
        if graph is not None:
            hidden = replay(graph, batch)
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        if batch.logits_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, batch.logits_indices), dtype=None)

    # -- CUDA graphs ----------------------------------------------------------------
    def _graph_size(self, n: int) -> int:
        return _padded_size(self.graph_sizes, n)

    def capture_cuda_graphs(self) -> None:
        """CUDA graphs at ladders of sizes, all in one memory pool, largest first; a step
        is padded up to the next captured size.

        Decode steps replay graphs by batch size. Steps with a prefill replay graphs by
        token count (`_capture_mixed_graphs`): eagerly, such a step costs the host
        ~15 ms of launches whatever its size (28 compiled regions and 56 attention and
        KV-write kernels for the Qwen3-0.6B shape), more than the GPU needs for it up to
        thousands of tokens."""
        if self.device.type != "cuda" or self.args.enforce_eager:
            return
        t0 = time.perf_counter()
        # The profiling pass's activations sit cached in the allocator; handing them back
        # lets the graphs' pool take that memory instead of more.
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = self._capture_mixed_graphs()
        self._capture_decode_graphs(pool)
        torch.cuda.synchronize(self.device)
        self.graph_capture_s = time.perf_counter() - t0
        self.graph_memory_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("captured %d decode CUDA graphs (batch %s) and %d for steps with a prefill (tokens %s) "
                 "in %.1f s using %.2f GiB", len(self.graphs), self.graph_sizes, len(self.mixed_graphs),
                 self.mixed_graph_sizes, self.graph_capture_s, self.graph_memory_bytes / 2**30)

    def _static_inputs(self, num_tokens: int, num_seqs: int) -> dict[str, torch.Tensor]:
        """A graph's input buffers: the replayed step is copied into their first rows."""
        dev = self.device
        max_blocks = (self.max_model_len + self.block_size - 1) // self.block_size
        return {
            "input_ids": torch.zeros(num_tokens, dtype=torch.long, device=dev),
            "positions": torch.zeros(num_tokens, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((num_tokens,), -1, dtype=torch.long, device=dev),
            "block_tables": torch.zeros((num_seqs, max_blocks), dtype=torch.int32, device=dev),
            "context_lens": torch.zeros(num_seqs, dtype=torch.int32, device=dev),
            "query_start_loc": torch.zeros(num_seqs + 1, dtype=torch.int32, device=dev),
            # Whether the replayed step's one-token sequences go to the decode kernel.
            "split_decode_rows": torch.zeros(1, dtype=torch.int32, device=dev),
            # The decode kernel's context tokens per split, from the replayed step's contexts.
            "decode_split_tokens": torch.ones(1, dtype=torch.int32, device=dev),
        }

    def _capture(self, kind: str, args: tuple, pool, warm_up: bool = True) -> _Graph:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if warm_up:  # compiles kernels outside the capture
                self.model(*args)
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(*args)
        self.graph_capture_times_s.append((kind, int(args[0].shape[0]), t1 - t0, time.perf_counter() - t1))
        return _Graph(graph, out)

    def _capture_mixed_graphs(self):
        """Graphs for steps with a prefill, by token count, over static inputs sized for
        the largest: the attention kernel's grid depends only on the token count and the
        sequence count (max_num_seqs here), so sequences past the batch's own get no new
        tokens and padding tokens belong to none (slot -1: nothing stored)."""
        limit = self.args.cuda_graph_max_tokens
        max_tokens = min(self.max_num_batched_tokens if limit is None else limit, self.max_num_batched_tokens)
        self.mixed_graph_sizes = mixed_graph_sizes(max_tokens)
        if not self.mixed_graph_sizes:
            return None
        self.mixed_static = st = self._static_inputs(max_tokens, self.args.max_num_seqs)
        self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        pool = None
        warm_up = warm_up_sizes(self.mixed_graph_sizes, self.model.token_count_branches)
        for size in reversed(self.mixed_graph_sizes):
            meta = AttentionMetadata(
                slot_mapping=st["slot_mapping"][:size], block_tables=st["block_tables"],
                context_lens=st["context_lens"], query_start_loc=st["query_start_loc"],
                max_query_len=size, max_context_len=self.max_model_len, block_size=self.block_size,
                split_decode_rows=st["split_decode_rows"],
            )
            graph = self._capture("mixed", (st["input_ids"][:size], st["positions"][:size], self.kv_caches, meta),
                                  pool, warm_up=size in warm_up)
            pool = graph.graph.pool()
            self.mixed_graphs[size] = graph
        return pool

    def _capture_decode_graphs(self, pool) -> None:
        """Decode graphs at a ladder of batch sizes, sharing one set of input buffers."""
        from ondo.kernels.triton_attention import decode_tile_tokens

        max_bs = self.args.max_num_seqs
        self.graph_sizes = decode_graph_sizes(max_bs)
        self.static = st = self._static_inputs(max_bs, max_bs)
        # One new token per sequence, and padding rows that read one slot of block 0.
        st["context_lens"].fill_(1)
        torch.arange(max_bs + 1, out=st["query_start_loc"])
        k_cache = self.kv_caches[0][0]
        self._decode_split_shape = (k_cache.shape[2], decode_tile_tokens(k_cache),
                                    torch.cuda.get_device_properties(self.device).multi_processor_count)
        for size in reversed(self.graph_sizes):
            # Captured with the grid of the longest context allowed; each replay sets the
            # split's tokens from its own contexts (`_replay`).
            st["decode_split_tokens"].fill_(self._graph_split_tokens(size, self.max_model_len, size))
            meta = AttentionMetadata(
                slot_mapping=st["slot_mapping"][:size], block_tables=st["block_tables"][:size],
                context_lens=st["context_lens"][:size], query_start_loc=st["query_start_loc"][: size + 1],
                max_query_len=1, max_context_len=self.max_model_len, block_size=self.block_size,
                decode_split_tokens=st["decode_split_tokens"],
            )
            graph = self._capture("decode", (st["input_ids"][:size], st["positions"][:size], self.kv_caches, meta),
                                  pool)
            pool = graph.graph.pool()
            self.graphs[size] = graph

    def _replay(self, graph: _Graph, batch: StepBatch) -> torch.Tensor:
        st, n = self.static, batch.num_tokens
        size = graph.output.shape[0]
        width = batch.host.block_tables.shape[1]
        st["input_ids"][:n].copy_(batch.input_ids, non_blocking=True)
        st["positions"][:n].copy_(batch.positions, non_blocking=True)
        st["slot_mapping"][:n].copy_(batch.meta.slot_mapping, non_blocking=True)
        st["context_lens"][:n].copy_(batch.meta.context_lens, non_blocking=True)
        st["block_tables"][:n, :width].copy_(batch.meta.block_tables, non_blocking=True)
        if size > n:  # padding rows: write nothing, read one slot of block 0
            st["slot_mapping"][n:size].fill_(-1)
            st["context_lens"][n:size].fill_(1)
        st["decode_split_tokens"].fill_(self._graph_split_tokens(n, batch.meta.max_context_len, size))
        graph.graph.replay()
        return graph.output[:n]

    def _graph_split_tokens(self, rows: int, max_context_len: int, graph_rows: int) -> int:
        num_kv_heads, block_n, num_sms = self._decode_split_shape
        return graph_split_tokens(rows, max_context_len, graph_rows, self.max_model_len, num_kv_heads,
                                  block_n, num_sms)

    def _replay_mixed(self, graph: _Graph, batch: StepBatch) -> torch.Tensor:
        # The scheduler runs at most max_num_seqs sequences of at most max_model_len
        # tokens: every batch fits the buffers' rows and table width.
        st, n, meta = self.mixed_static, batch.num_tokens, batch.meta
        num_seqs, size, width = meta.num_seqs, graph.output.shape[0], batch.host.block_tables.shape[1]
        st["input_ids"][:n].copy_(batch.input_ids, non_blocking=True)
        st["positions"][:n].copy_(batch.positions, non_blocking=True)
        st["slot_mapping"][:n].copy_(meta.slot_mapping, non_blocking=True)
        st["slot_mapping"][n:size].fill_(-1)  # padding: stores nothing
        st["block_tables"][:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        st["context_lens"][:num_seqs].copy_(meta.context_lens, non_blocking=True)
        st["query_start_loc"][: num_seqs + 1].copy_(meta.query_start_loc, non_blocking=True)
        st["query_start_loc"][num_seqs + 1 :].fill_(n)  # the sequences past the batch's: no new tokens
        # The choice the eager step makes from the same lengths, so that both sum alike.
        st["split_decode_rows"].fill_(int(splits_mixed_step(meta, self.kv_caches[0][0].shape[2], self._num_sms)))
        graph.graph.replay()
        return graph.output[:n]

    def step_cost(self, batch: StepBatch) -> tuple[float, float]:
        """FLOPs and bytes a step cannot do with less (`ondo.engine.step_cost`): the roofline
        bound and the twin's load input."""
        return step_cost(self.cost_shape, batch.meta.query_lens_cpu, batch.meta.context_lens_cpu,
                         int(batch.logits_indices.numel()))


def _padded_size(sizes: list[int], n: int) -> int:
    """The smallest of the sorted `sizes` that holds n; -1 when none does."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else -1


def decode_graph_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes captured for decode steps: 2, 4, 8, then every 16 to `max_num_seqs`. No
    graph of one sequence (unless that is the most a step holds): a one-row step replays
    the two-row graph with a padding row. The compiled regions take any token count from
    two up, but a count of one is a case of its own for dynamic shapes (they specialize
    sizes 0 and 1), and a graph of batch one compiled every region a second time at
    start-up, for steps that are rare and cost the GPU the same with one row more."""
    if max_num_seqs <= 1:
        return [1]
    ladder = [b for b in (2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted({*ladder, max_num_seqs})


def warm_up_sizes(sizes: list[int], branches: tuple[int, ...]) -> set[int]:
    """The graph sizes, captured largest first, that run once before their capture: the
    largest on each side of the model's token-count branches (where a step runs other
    kernels). One warm-up there compiles every kernel those graphs use (the regions take any
    token count, and every size on the ladder is a multiple of 16, so no kernel specializes
    anew); a first run inside a capture would compile there, and tune Inductor's kernels,
    which synchronizes."""
    first: dict[int, int] = {}  # the side (branches at or below the size) -> its largest size
    for size in sorted(sizes, reverse=True):
        first.setdefault(sum(size >= b for b in branches), size)
    return set(first.values())


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts captured for steps with a prefill, up to `max_tokens`: powers of two
    to 512, then every 256 to 2048, then every 512, so that padding adds at most a
    quarter of a step's tokens past 1024 (and no more than 511 anywhere)."""
    if max_tokens < 2:
        return []
    ladder = [16, 32, 64, 128, 256, 512, *range(768, 2049, 256), *range(2560, max_tokens + 1, 512)]
    return sorted({n for n in ladder if n < max_tokens} | {max_tokens})
