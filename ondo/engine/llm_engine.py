"""The engine loop: add requests, `step()` them forward one iteration at a time, abort them.

One step = schedule (decide) → run the model on the flat batch (do) → sample →
detokenize and check stops → free what finished. A request with n > 1 runs as one
sequence through its prompt's prefill; when its first token is sampled it forks into
n sequences sharing the prompt's blocks, each then sampled and stopped on its own.
Single-threaded; `AsyncLLM` drives it from its own thread for the server.

Asynchronous scheduling (on by default on CUDA): step N+1 is scheduled, packed and
queued on the GPU before step N's draws are read back, so the host's work hides behind
the GPU's. Each sequence then counts one token "pending" (drawn, still on the device);
the model reads it from step N's draws on the device. A sequence that ends in step N
was already given a slot in step N+1, whose token is dropped. The engine drains (runs
one step synchronously) whenever that cannot work: a penalty needs the host's token
history, something is swapped out, or the last schedule ran short of blocks (only a
drained schedule may preempt). A request with n > 1 forks when the step that
samples its first token is launched, so its sequences run ahead like any other's
(`parallel_sampling_ahead`; ONDO_PARALLEL_SAMPLING_AHEAD=0 makes such requests drain).

Structured outputs: a request with a grammar waits outside the scheduler until its grammar
has compiled (on the compiler's thread), then queues like any other. Each step, the
sequences with a grammar get their allowed-token masks, filled for the batch at once on
other threads (`token_masks.py`) from the moment their matchers' states are known, and
applied to the logits before sampling; the forward pass never waits for them. Stepping
synchronously (or drained), that is as soon as the step is scheduled. Under asynchronous
scheduling step N+1's masks need step N's draws: step N's sampling is queued just before
step N+1's forward pass, so its draws are read back (the host waits only for the sampling
kernels) and step N+1's fill starts while its forward pass runs; step N+1 stays launched
but unsampled (`_InFlight.masks`) while the host makes step N's outputs and schedules and
packs step N+2, and is sampled just before step N+2's forward pass is queued. A step with
no constrained row does none of this: it is sampled at once, as it always was.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from ondo.distributed.sharded_runner import ShardedModelRunner
from ondo.distributed.workers import TensorParallelWorkers, start_tensor_parallel
from ondo.engine import fault_injection
from ondo.engine.block_manager import BlockManager
from ondo.engine.config import EngineArgs
from ondo.engine.grammar import CompiledGrammar, GrammarCompiler, SequenceGrammar
from ondo.engine.model_runner import ModelRunner, StepBatch, decode_graph_sizes, mixed_graph_sizes
from ondo.engine.outputs import CompletionOutput, RequestOutput, WireDelta, wire_delta
from ondo.engine.sampler import DeviceSample, fused_sampling, sample_on_device, to_device
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler import Scheduler, SchedulerOutput
from ondo.engine.scheduler_limits import DutyCycleGate, SchedulerLimits
from ondo.engine.sequence import Sequence, SequenceStatus
from ondo.engine.step_stats import StepStats
from ondo.engine.stop_checker import check_stop
from ondo.engine.token_masks import MaskFiller, PendingMask
from ondo.kernels.precompile import (
    EngineKernelShapes,
    Precompile,
    precompile_enabled,
    start_precompile,
)
from ondo.model.detokenizer import IncrementalDetokenizer, detokenize
from ondo.model.fusion import warm_compiler
from ondo.model.loader import load_model, read_model_config
from ondo.model.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is visible; use device='cpu'")
    return device


def resolve_dtype(name: str, device: torch.device, config_dtype: str | None) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if config_dtype == "float16" else torch.bfloat16


def load_dtype(args: EngineArgs, device: torch.device) -> torch.dtype:
    """The dtype the weights load in (its config's own where "auto" is not resolved here)."""
    return _DTYPES.get(args.dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)


def engine_limits(args: EngineArgs, cfg, device: torch.device) -> tuple[int, int]:
    """(max_model_len, max_num_batched_tokens) for this model on this device."""
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    if args.max_model_len and args.max_model_len > cfg.max_position_embeddings:
        log.warning("max_model_len=%d exceeds the model's %d positions", args.max_model_len,
                    cfg.max_position_embeddings)
    default_budget = 8192 if device.type == "cuda" else 1024
    max_num_batched_tokens = args.max_num_batched_tokens or default_budget
    if not args.enable_chunked_prefill and max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens={max_num_batched_tokens} is below max_model_len="
            f"{max_model_len}: enable chunked prefill or raise max_num_batched_tokens"
        )
    return max_model_len, max_num_batched_tokens


def start_kernel_precompile(args: EngineArgs, device: torch.device) -> Precompile | None:
    """With ONDO_TRITON_PRECOMPILE=1, on CUDA with one rank: start-up's Triton kernels start
    compiling on threads now, from the model's config alone, while the weights load and the
    profiling pass runs (`ondo.kernels.precompile`)."""
    if device.type != "cuda" or args.tensor_parallel_size > 1 or not precompile_enabled():
        return None
    cfg = read_model_config(args.model, args.load_format)
    max_model_len, max_tokens = engine_limits(args, cfg, device)
    graphs = not args.enforce_eager
    limit = args.cuda_graph_max_tokens
    return start_precompile(EngineKernelShapes(
        num_q_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, block_size=args.block_size, dtype=load_dtype(args, device), device=device,
        max_num_seqs=args.max_num_seqs, max_model_len=max_model_len, max_num_batched_tokens=max_tokens,
        decode_graph_sizes=tuple(decode_graph_sizes(args.max_num_seqs)) if graphs else (),
        mixed_graphs=graphs and bool(mixed_graph_sizes(min(max_tokens if limit is None else limit, max_tokens))),
        fused_sampling=fused_sampling(device)))


def _needs_drained_steps(params: SamplingParams, parallel_sampling_ahead: bool) -> bool:
    """Penalties read the host's token history. A request with n > 1 forks as the step
    that samples its first token is launched, and its sequences' first tokens are pending
    like any other's: with `parallel_sampling_ahead` it runs ahead too."""
    return params.has_penalties or (params.num_sequences > 1 and not parallel_sampling_ahead)


def parallel_sampling_ahead_default() -> bool:
    """Requests with n > 1 run with steps ahead unless ONDO_PARALLEL_SAMPLING_AHEAD=0
    makes them drain the engine's steps (on an H200, W5 ran 1.46x faster ahead)."""
    return os.environ.get("ONDO_PARALLEL_SAMPLING_AHEAD", "1") != "0"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_for(args: EngineArgs) -> Tokenizer | None:
    """The model's tokenizer; None for a folder that has none (token ids in, token ids out)."""
    if args.tokenizer:
        return load_tokenizer(args.model, args.tokenizer)
    if args.model and os.path.isdir(args.model):
        if not any(os.path.exists(os.path.join(args.model, f)) for f in TOKENIZER_FILES):
            log.warning("%s has no tokenizer files: prompts must be token ids", args.model)
            return None
    return load_tokenizer(args.model)


@dataclass
class _InFlight:
    """A step queued on the device whose draws are not yet read back."""

    sched: SchedulerOutput
    batch: StepBatch
    seqs: list[Sequence]  # the draws' rows, in order
    draws: DeviceSample | None
    start_monotonic_s: float
    # Launched, not yet sampled (`_sample`): the logits, the grammar masks being filled,
    # and each row's output length before its draw (for seeded draws).
    logits: torch.Tensor | None = None
    masks: PendingMask | None = None
    output_lens: list[int] | None = None


class StepFailed(Exception):
    """A step failed: `outputs` are the step's outputs, with an error output for each
    request that was in it (those requests are over); the engine can step on."""

    def __init__(self, outputs: list[RequestOutput], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.outputs = outputs
        self.cause = cause


@dataclass
class _TextState:
    """What one sequence has produced and handed out so far."""

    detokenizer: IncrementalDetokenizer | None  # None: not streamed, or token ids only
    text: str = ""
    final: bool = False  # the sequence finished and `text` is whole
    stopped_by_string: bool = False  # `text` was cut at a stop string
    stop_token_hidden: bool = False  # the last token ended the sequence; its text is left out
    emitted: int = 0  # characters of `text` already handed out
    emitted_tokens: int = 0
    emitted_logprobs: int = 0


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        t0 = time.perf_counter()
        self.args = args
        # The tokenizer (mostly importing transformers' tokenizer modules: seconds) loads on
        # a thread while the model is built, profiled and its graphs captured.
        with ThreadPoolExecutor(1, thread_name_prefix="ondo-tokenizer") as pool:
            tokenizer_future = pool.submit(tokenizer_for, args)
            self.device = resolve_device(args.device)
            torch.manual_seed(args.seed)
            torch.empty(1, device=self.device)  # the device's context, timed on its own
            t_context = time.perf_counter()
            if self.device.type == "cuda":
                warm_compiler()  # its workers start while the weights load
            precompile = start_kernel_precompile(args, self.device)
            t_device = time.perf_counter()
            # Tensor parallelism: the sizes are checked against the model's shape, then the
            # other ranks start and load their shards while this process loads its own.
            self.workers: TensorParallelWorkers | None = None
            if args.tensor_parallel_size > 1:
                self.workers = start_tensor_parallel(args, self.device)
                # Stopped when the engine is closed, collected, or the interpreter exits.
                self._close_workers = weakref.finalize(self, self.workers.close)
            try:
                shard = () if self.workers is None else (self.workers.shard,)
                self.model, self.model_config = load_model(args.model, args.load_format,
                                                           load_dtype(args, self.device), self.device,
                                                           *shard)
                self.dtype = next(self.model.parameters()).dtype
                t_weights = time.perf_counter()
                cfg = self.model_config
                self.max_model_len, self.max_num_batched_tokens = engine_limits(args, cfg, self.device)
                runner_args = (args, self.model, cfg, self.device, self.dtype, self.max_model_len,
                               self.max_num_batched_tokens)
                if self.workers is None:
                    self.runner = ModelRunner(*runner_args)
                else:
                    self.runner = ShardedModelRunner(*runner_args, group=self.workers.group,
                                                     watch=self.workers)
                self.runner.precompile, precompile = precompile, None
                plan = self.runner.profile_and_allocate()
            except BaseException:
                if precompile is not None:  # failed before the runner took it
                    precompile.wait()
                if self.workers is not None:
                    self.workers.abandon()
                raise
            t_profiled = time.perf_counter()
            self.tokenizer = tokenizer_future.result()
            t_tokenizer = time.perf_counter()
        self.eos_token_ids = list(cfg.eos_token_ids or [])
        if self.tokenizer is not None:
            self.eos_token_ids = sorted(set(self.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        self.block_manager = BlockManager(
            plan.num_gpu_blocks, plan.num_cpu_blocks, args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            extra_key=args.served_model_name or args.model,
        )
        self.scheduler = Scheduler(
            self.block_manager, args.max_num_seqs, self.max_num_batched_tokens,
            args.preemption_mode, self.runner.costs, args.enable_chunked_prefill,
            self.max_model_len,
        )
        self.async_scheduling = (self.device.type == "cuda" if args.async_scheduling is None
                                 else args.async_scheduling)
        self.step_gate = DutyCycleGate()  # step pacing; the engine loop honours it
        self._in_flight: _InFlight | None = None
        self._num_sync_requests = 0  # unfinished requests that need drained steps
        # Change it only while no request is unfinished (requests count by it when added).
        self.parallel_sampling_ahead = parallel_sampling_ahead_default()
        self.num_steps_ahead = 0  # steps scheduled while the previous one was on the device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(args.seed)
        self.host_generator = torch.Generator()  # the fused sampler's row seeds (CUDA)
        self.host_generator.manual_seed(args.seed)
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}  # a request's sequences, by index
        self._text: dict[int, _TextState] = {}  # by seq_id
        self._pending_outputs: list[RequestOutput] = []
        self._stepping: list[Sequence] = []  # the sequences the step under way touches
        self.num_failed_steps_in_a_row = 0
        # Structured outputs: made on the first request that has one.
        self._grammar_compiler: GrammarCompiler | None = None
        self._mask_filler: MaskFiller | None = None
        self._compiling: list[tuple[Sequence, Future[CompiledGrammar]]] = []
        self._grammars: dict[int, SequenceGrammar] = {}  # by seq_id
        # False: each step's masks are filled on the engine's thread after its forward pass
        # is queued and it is sampled at once (the baseline the overlap is measured against).
        self.mask_overlap = True
        # The engine process sets this: plain streamed steps leave as wire tuples (see
        # `_wire_delta`), not as RequestOutputs it would build only to strip them again.
        self.wire_deltas = False
        self._step_listeners: list[Callable[[StepStats], None]] = []
        self._step_index = 0
        # Host time per phase of step(), summed: where an engine step's time goes.
        # "wait" is the host blocked on the GPU; the rest is host work.
        self.step_timing_s: dict[str, float] = dict.fromkeys(
            ("schedule", "prepare", "launch", "sample", "wait", "postprocess", "steps"), 0.0)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.startup_s = time.perf_counter() - t0
        # "load" = device context + weights + what was left to wait for the tokenizer
        # (it loads meanwhile), also given one by one; "load.device" includes starting
        # Inductor's compile workers, also given alone ("load.compiler_workers").
        self.startup_phases_s = {"load": t_weights - t0 + t_tokenizer - t_profiled,
                                 "profile": self.runner.profile_s,
                                 "cuda_graphs": self.runner.graph_capture_s,
                                 "load.device": t_device - t0, "load.weights": t_weights - t_device,
                                 "load.compiler_workers": t_device - t_context,
                                 "load.tokenizer": t_tokenizer - t_profiled,
                                 "profile.precompile_wait": self.runner.precompile_wait_s}
        log.info("start-up phases: %s", {k: round(v, 1) for k, v in self.startup_phases_s.items()})
        log.info("engine ready in %.1f s on %s (%s), max_model_len %d", self.startup_s, self.device,
                 self.dtype, self.max_model_len)
        fault_injection.install_from_env(self)  # test-only; nothing without its variable

    def device_ok(self) -> bool:
        """False where the device can run nothing more (a CUDA error that sticks to the
        context, as an illegal memory access does; running out of memory does not), or
        where the ranks of a tensor-parallel engine cannot step together any more."""
        if self.workers is not None and not self.workers.ok:
            return False
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return True
        except Exception:
            log.exception("the device is in an unrecoverable state")
            return False

    def close(self) -> None:
        """Stop a tensor-parallel engine's workers and leave its process group (nothing to
        do with one rank); idempotent."""
        close_workers = getattr(self, "_close_workers", None)
        if close_workers is not None:
            close_workers()

    # -- requests ----------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        arrival_time_s: float | None = None,
        stream: bool = True,
        detokenize: bool = True,
    ) -> Sequence:
        """Queue a request; raises ValueError (naming the problem) if it cannot run.

        With stream=False, step() reports the request only when it finishes, and its text
        is decoded once at the end unless stop strings need it token by token; either way
        it is the text the stream would have made. With detokenize=False a streamed
        request's outputs carry token ids but no text (the caller decodes them, with the
        same detokenizer); stop strings still make the engine decode token by token."""
        # The engine's own copy: a caller may change or reuse its object once this returns,
        # and the sampler keeps what it read from a step's parameter objects for the next.
        params = copy.copy(params) if params is not None else SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("a prompt (text) or prompt_token_ids is required")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens, more than max_model_len="
                f"{self.max_model_len}"
            )
        num_seqs = params.num_sequences
        if num_seqs > self.scheduler.max_num_seqs:
            name = "n" if params.best_of is None else "best_of"
            raise ValueError(f"invalid sampling parameter {name}={num_seqs}: exceeds "
                             f"max_num_seqs={self.scheduler.max_num_seqs}")
        bad_bias = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad_bias:
            raise ValueError(f"logit_bias names token id {bad_bias[0]}, out of range: ids must "
                             f"be in [0, {vocab})")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer, and this engine has none")
        seq = Sequence(next(self._seq_ids), request_id, prompt_token_ids, params,
                       arrival_time_s if arrival_time_s is not None else time.monotonic(), prompt=prompt)
        seq.stream = stream and not params.ranks_by_logprob  # the best are known at the end
        seq.detokenize = detokenize
        self._requests[request_id] = [seq]
        if _needs_drained_steps(params, self.parallel_sampling_ahead):
            self._num_sync_requests += 1
        self._text[seq.seq_id] = self._new_text_state(seq)
        if params.structured_outputs is None:
            self.scheduler.add(seq)
        else:  # waits for its grammar, compiled on a thread, then queues
            self._compiling.append((seq, self._compiler().submit(params.structured_outputs)))
            self._admit_compiled()
        self.num_prompt_tokens_total += len(prompt_token_ids)
        return seq

    def _compiler(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            vocab = self.model_config.vocab_size
            self._mask_filler = MaskFiller(vocab, self.device, self.eos_token_ids[0],
                                           max_rows=self.args.max_num_seqs)
            self._grammar_compiler = GrammarCompiler(self.tokenizer.hf_tokenizer, vocab,
                                                     self.eos_token_ids,
                                                     num_shards=self._mask_filler.num_threads)
        return self._grammar_compiler

    def _admit_compiled(self) -> None:
        """Queue the requests whose grammar has compiled; end those whose grammar failed."""
        if not any(future.done() for _, future in self._compiling):
            return
        still: list[tuple[Sequence, Future[CompiledGrammar]]] = []
        for seq, future in self._compiling:
            if not future.done():
                still.append((seq, future))
                continue
            error = future.exception()
            if error is None:
                self._grammars[seq.seq_id] = SequenceGrammar(future.result())
                self.scheduler.add(seq)
                continue
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason, seq.stop_reason = "error", str(error)
            out = self._make_output(seq.request_id)
            out.error = f"the structured output's grammar could not be compiled: {error}"
            self._pending_outputs.append(out)
        self._compiling = still

    def _wait_for_grammars(self, timeout_s: float = 0.05) -> None:
        """Nothing else to run: wait (briefly, so new commands are not held up) for a grammar."""
        wait([future for _, future in self._compiling], timeout_s, FIRST_COMPLETED)
        self._admit_compiled()

    def abort_request(self, request_id: str) -> bool:
        """Free the request's blocks now; its final output (finish_reason "abort") comes next step."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return False
        for seq in seqs:
            if any(seq is s for s, _ in self._compiling):
                self._compiling = [(s, f) for s, f in self._compiling if s is not seq]
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                continue
            self.scheduler.finish(seq, "abort")
        self._pending_outputs.append(self._make_output(request_id))
        return True

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.num_unfinished > 0 or bool(self._pending_outputs)
                or self._in_flight is not None or bool(self._compiling))

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._step_listeners.append(listener)

    def set_scheduler_limits(self, limits: SchedulerLimits) -> None:
        """A governor's limits: the scheduler's from its next schedule, the duty cycle from
        the next slice of steps."""
        self.scheduler.set_limits(limits)
        self.step_gate.set_duty(limits.duty_cycle)

    def remove_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._step_listeners.remove(listener)

    # -- one iteration -----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and queue the next step; return the outputs of the one before it
        (asynchronous scheduling) or of this one. With `wire_deltas` set, plain streamed
        steps come as `WireDelta` tuples instead.

        Raises StepFailed where the step fails (the GPU out of memory, a kernel error):
        the requests in it end with finish_reason "error"; the others carry on."""
        if self._compiling:
            if self.scheduler.num_unfinished == 0 and self._in_flight is None:
                self._wait_for_grammars()
            else:
                self._admit_compiled()
        outputs, self._pending_outputs = self._pending_outputs, []
        self._stepping = []
        try:
            self._step(outputs)
        except Exception as e:
            self.num_failed_steps_in_a_row += 1
            raise StepFailed(outputs + self._fail_step(e), e) from e
        self.num_failed_steps_in_a_row = 0
        return outputs

    def _step(self, outputs: list[RequestOutput]) -> None:
        prev, self._in_flight = self._in_flight, None
        if prev is not None:  # its draws are still to be read: its sequences are in this step
            self._stepping += prev.seqs + [item.seq for item in prev.sched.scheduled]
        if prev is not None and not self._can_schedule_ahead(prev):
            outputs.extend(self._finish(prev))
            prev = None
        t0 = time.perf_counter()
        sched = self.scheduler.schedule(allow_preemption=prev is None)
        self.step_timing_s["schedule"] += time.perf_counter() - t0
        self._stepping += [item.seq for item in sched.scheduled]
        if sched.is_empty:
            if prev is not None:
                outputs.extend(self._finish(prev))
            return
        launched = self._launch(sched, prev)
        if prev is not None:
            self.num_steps_ahead += 1
            outputs.extend(self._finish(prev))
        if not (self.async_scheduling and self.mask_overlap and launched.masks is not None
                and not launched.masks.future.done()):
            self._sample(launched)  # else: sampled once the next step is packed (`_launch`)
        if self.async_scheduling:
            self._in_flight = launched
        else:
            outputs.extend(self._finish(launched))

    def _fail_step(self, error: Exception) -> list[RequestOutput]:
        """End the requests of a failed step (and of the step in flight before it) with
        finish_reason "error", freeing their blocks; what was drawn on the device for
        them is dropped. Requests that were not in it keep their place and their blocks."""
        reason = f"the engine step failed: {type(error).__name__}: {error}"
        self._in_flight = None
        failed = [rid for rid in dict.fromkeys(s.request_id for s in self._stepping)
                  if rid in self._requests]
        outputs = []
        for request_id in failed:
            for seq in self._requests[request_id]:
                if not seq.is_finished:
                    seq.stop_reason = reason
                    self.scheduler.finish(seq, "error")
            out = self._make_output(request_id)
            out.error = reason
            outputs.append(out)
        log.error("%s; %d request(s) in it ended with an error, %d unfinished carry on",
                  reason, len(failed), self.scheduler.num_unfinished)
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Finish the step still on the device, so that the GPU idles until the next step().
        Raises StepFailed as step() does."""
        outputs, self._pending_outputs = self._pending_outputs, []
        prev, self._in_flight = self._in_flight, None
        if prev is None:
            return outputs
        self._stepping = prev.seqs + [item.seq for item in prev.sched.scheduled]
        try:
            outputs.extend(self._finish(prev))
        except Exception as e:
            self.num_failed_steps_in_a_row += 1
            raise StepFailed(outputs + self._fail_step(e), e) from e
        return outputs

    def _can_schedule_ahead(self, prev: _InFlight) -> bool:
        return (self.async_scheduling and not prev.sched.blocked and not self.scheduler.swapped
                and self._num_sync_requests == 0)

    def _launch(self, sched: SchedulerOutput, prev: _InFlight | None) -> _InFlight:
        """Pack, run and draw the step on the device; nothing here waits for the GPU, except
        for `prev`'s draws where this step's masks need them (its sampling kernels only)."""
        timing = self.step_timing_s
        start = time.monotonic()
        t0 = time.perf_counter()
        sampling = [s.seq for s in sched.scheduled if s.samples]
        masks = None
        if prev is None and self._grammars and self.mask_overlap and not self._forks_due(sampling):
            masks = self._start_masks(sampling, None, on_thread=True)  # every token is known
        batch = self.runner.prepare(sched)
        t_prepared = time.perf_counter()
        if prev is not None and prev.draws is None:
            self._sample(prev)  # its draws must be queued before this step's forward pass
        prev_tokens = prev.draws.tokens if prev is not None and prev.draws is not None else None
        t_launch = time.perf_counter()
        logits = self.runner.execute(sched, batch, prev_tokens)
        t_launched = time.perf_counter()
        cache_full_blocks = self.block_manager.cache_full_blocks
        for item in sched.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            cache_full_blocks(seq)
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = start
        seqs: list[Sequence] = []
        if logits is not None:
            # A request with n > 1 forks as its first token is sampled: every sequence
            # draws its own first token from the prompt's logits row.
            rows: list[int] = []
            for row, seq in enumerate(sampling):
                if seq.params.num_sequences > 1:
                    for s in (seq, *self._fork(seq)):
                        rows.append(row)
                        seqs.append(s)
                else:
                    rows.append(row)
                    seqs.append(seq)
            if len(seqs) != len(sampling):
                logits = logits.index_select(0, to_device(rows, torch.int64, logits.device))
        if masks is None and self._grammars and seqs:
            masks = self._token_mask(seqs, prev)
        # Sequence's properties are inlined in this loop and in `_append_token`, `_finish`:
        # per row, per step (about 10 % of the host's step at 256 rows on the CPU).
        output_lens: list[int] = []
        for row, s in enumerate(seqs):  # drawn by this step, read back by `_finish`
            output_lens.append(len(s.token_ids) - len(s.prompt_token_ids) + s.num_pending_tokens)
            s.num_pending_tokens += 1
            s.pending_row = row
        timing["prepare"] += t_prepared - t0
        timing["launch"] += t_launched - t_launch
        timing["sample"] += time.perf_counter() - t_launched
        return _InFlight(sched, batch, seqs, None, start, logits, masks, output_lens)

    def _forks_due(self, sampling: list[Sequence]) -> bool:
        """A request with n > 1 samples its first token in this step (`_fork`)."""
        return any(s.params.num_sequences > 1 and len(self._requests[s.request_id]) == 1
                   for s in sampling)

    def _sample(self, f: _InFlight) -> None:
        """Queue the launched step's draws on the device (once its masks are filled)."""
        if f.logits is None:
            return
        t0 = time.perf_counter()
        seqs = f.seqs
        mask = self._mask_filler.result(f.masks) if f.masks is not None else None
        f.draws = sample_on_device(
            f.logits,
            [s.params for s in seqs],
            f.output_lens,
            self.generator,
            history=lambda: ([s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs]),
            mask=mask,
            host_generator=self.host_generator,
            stop_ids=self._stop_ids,
        )
        f.draws.start_copy()
        f.logits = f.masks = None
        self.step_timing_s["sample"] += time.perf_counter() - t0

    def _stop_ids(self, p: SamplingParams) -> tuple[int, ...] | list[int]:
        """The tokens that end a sequence sampled with `p`: EOS (unless ignore_eos) and its
        stop_token_ids."""
        return p.stop_token_ids if p.ignore_eos else (*self.eos_token_ids, *p.stop_token_ids)

    def _token_mask(self, seqs: list[Sequence], prev: _InFlight | None) -> PendingMask | None:
        """Start the masks of the rows with a grammar once the forward pass is queued. Each
        matcher first catches up with its sequence, including a token of `prev` still on the
        device (read back here: `prev` was sampled just before this step's forward pass);
        then, with a step ahead, the fill runs on a thread while the host makes `prev`'s
        outputs and packs the next step."""
        drawn: list[int] | None = None
        if prev is not None and prev.draws is not None and any(
                s.num_pending_tokens and s.seq_id in self._grammars for s in seqs):
            drawn = prev.draws.to_host().token_ids
        return self._start_masks(seqs, drawn, on_thread=prev is not None and self.mask_overlap)

    def _start_masks(self, seqs: list[Sequence], drawn: list[int] | None,
                     on_thread: bool) -> PendingMask | None:
        """Catch each row's matcher up with its sequence (and its token still on the device,
        from `drawn`), then start the fill; None if no row has a grammar."""
        rows: list[int] = []
        items: list[tuple[SequenceGrammar, list[int], int, int | None]] = []
        for row, s in enumerate(seqs):
            g = self._grammars.get(s.seq_id)
            if g is None:
                continue
            pending = drawn[s.pending_row] if s.num_pending_tokens and drawn is not None else None
            items.append((g, s.token_ids, s.num_prompt_tokens, pending))
            rows.append(row)
        if not items:
            return None
        self._mask_filler.catch_up(items)
        grammars = [g for g, _, _, _ in items]
        return self._mask_filler.submit(grammars, None if len(rows) == len(seqs) else rows, on_thread)

    def _finish(self, f: _InFlight) -> list[RequestOutput]:
        """Read a step's draws back (waiting for the GPU), append them, check stops."""
        if f.draws is None:
            self._sample(f)
        timing = self.step_timing_s
        t0 = time.perf_counter()
        result = f.draws.to_host() if f.draws is not None else None
        t_read = time.perf_counter()
        outputs: list[RequestOutput] = []
        num_out = 0
        if result is not None:
            now = time.monotonic()
            touched: dict[str, None] = {}
            for row, seq in enumerate(f.seqs):
                seq.num_pending_tokens -= 1
                if seq.is_finished:  # aborted, or ended one step earlier: the draw is dropped
                    continue
                self._append_token(seq, result.token_ids[row], result.logprobs[row],
                                   result.sampled_logprobs[row], now)
                touched[seq.request_id] = None
                num_out += 1
            # Streamed requests report every step; the others only when finished.
            for rid in touched:
                group = self._requests[rid]
                if group[0].stream:
                    delta = self._wire_delta(group) if self.wire_deltas else None
                    outputs.append(delta if delta is not None else self._make_output(rid))
                elif group[0].is_finished if len(group) == 1 else all(q.is_finished for q in group):
                    outputs.append(self._make_output(rid))
        self.num_generation_tokens_total += num_out
        timing["wait"] += t_read - t0
        timing["postprocess"] += time.perf_counter() - t_read
        timing["steps"] += 1
        self._emit_step_stats(f.sched, f.batch, f.start_monotonic_s, num_out)
        return outputs

    def _wire_delta(self, group: list[Sequence]) -> WireDelta | None:
        """A plain streamed request's step (one sequence, token ids only, no logprobs) past
        its first output, as the engine process's wire tuple: the new ids and nothing the
        receiver already has. None where the full output is needed."""
        seq = group[0]
        state = self._text[seq.seq_id]
        if (len(group) != 1 or seq.is_finished or state.emitted_tokens == 0
                or state.detokenizer is not None or seq.params.num_sequences != 1
                or seq.params.logprobs is not None):
            return None
        new_ids = seq.token_ids[len(seq.prompt_token_ids) + state.emitted_tokens:]
        state.emitted_tokens = seq.num_output_tokens
        return wire_delta(seq.request_id, seq.index, new_ids)

    def _new_text_state(self, seq: Sequence) -> _TextState:
        if self.tokenizer is None or not ((seq.stream and seq.detokenize) or seq.params.stop_list):
            return _TextState(None)
        return _TextState(IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                                 seq.params.skip_special_tokens))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The n-1 further sequences of a request about to sample its first token; none
        for n = 1 or once forked."""
        group = self._requests[parent.request_id]
        if parent.params.num_sequences == 1 or len(group) > 1:
            return []
        children = []
        grammar = self._grammars.get(parent.seq_id)
        for i in range(1, parent.params.num_sequences):
            child = Sequence(next(self._seq_ids), parent.request_id, parent.prompt_token_ids,
                             parent.params.for_sequence(i), parent.arrival_time_s, prompt=parent.prompt,
                             token_ids=list(parent.token_ids), index=i,
                             num_computed_tokens=parent.num_computed_tokens,
                             first_scheduled_s=parent.first_scheduled_s, stream=parent.stream,
                             detokenize=parent.detokenize)
            self.scheduler.fork(parent, child)
            self._text[child.seq_id] = self._new_text_state(child)
            if grammar is not None:
                self._grammars[child.seq_id] = grammar.fork()
            group.append(child)
            children.append(child)
        return children

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None,
                      sampled_lp: float | None, now: float) -> None:
        seq.token_ids.append(token)
        if seq.first_token_s is None:
            seq.first_token_s = now
        self.block_manager.cache_full_blocks(seq)  # a block its new token completed
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        if sampled_lp is not None:
            seq.cumulative_logprob += sampled_lp
        state = self._text[seq.seq_id]
        p = seq.params
        num_output = len(seq.token_ids) - len(seq.prompt_token_ids)
        # A token that ends the sequence (EOS, a stop token id) leaves its text out, unless
        # include_stop_str_in_output; its id stays in token_ids (as vLLM's).
        stop_token = ((token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids))
                      and num_output >= p.min_tokens)
        new_text_len = 0
        if stop_token and not p.include_stop_str_in_output:
            state.stop_token_hidden = True
        elif state.detokenizer is not None:
            delta = state.detokenizer.append(token)
            state.text += delta
            new_text_len = len(delta)
        grammar = self._grammars.get(seq.seq_id) if self._grammars else None
        if grammar is not None:
            grammar.sync(seq.token_ids, seq.num_prompt_tokens)
            if grammar.error is not None:  # the mask should have made this impossible
                log.error("request %s: %s", seq.request_id, grammar.error)
                seq.stop_reason = f"the output left its grammar: {grammar.error}"
                self.scheduler.finish(seq, "error")
                return
        if (grammar is None and not p.stop_list and not stop_token
                and (p.max_tokens is None or num_output < p.max_tokens)
                and len(seq.token_ids) < self.max_model_len):
            return  # nothing check_stop looks at can end it: the common decode step
        decision = check_stop(
            token_id=token, num_output_tokens=num_output, num_tokens=seq.num_tokens,
            text=state.text, new_text_len=new_text_len,
            eos_token_ids=self.eos_token_ids, stop_token_ids=p.stop_token_ids, stop_strings=p.stop_list,
            include_stop_str=p.include_stop_str_in_output, ignore_eos=p.ignore_eos,
            min_tokens=p.min_tokens, max_tokens=p.max_tokens, max_model_len=self.max_model_len,
            grammar_complete=grammar is not None and grammar.is_complete,
        )
        if decision.finish_reason is not None:
            if decision.truncate_text_to is not None:
                state.text = state.text[: decision.truncate_text_to]
                state.stopped_by_string = True
            seq.stop_reason = decision.stop_reason
            self.scheduler.finish(seq, decision.finish_reason)

    def _make_output(self, request_id: str) -> RequestOutput:
        """The request's output with one completion per sequence (each with what it added
        since the last output); forgets the request once all its sequences finished."""
        seqs = self._requests[request_id]
        parent = seqs[0]
        completions = [self._completion(seq) for seq in seqs]
        finished = all(seq.is_finished for seq in seqs)
        n = parent.params.n
        if finished and parent.params.ranks_by_logprob:  # best_of: the n most likely, in order
            ranked = sorted(zip(seqs, completions), key=lambda sc: -sc[0].cumulative_logprob)[:n]
            completions = [dataclasses.replace(c, index=i) for i, (_, c) in enumerate(ranked)]
        if len(completions) < n:  # aborted before the fork: the others never started
            completions += [dataclasses.replace(completions[0], index=i, new_text="", new_token_ids=[],
                                                new_logprobs=None) for i in range(len(completions), n)]
        metrics = {"arrival_time_s": parent.arrival_time_s}
        first_scheduled = [s.first_scheduled_s for s in seqs if s.first_scheduled_s is not None]
        if first_scheduled:
            metrics["first_scheduled_s"] = min(first_scheduled)
        first_token = [s.first_token_s for s in seqs if s.first_token_s is not None]
        if first_token:
            metrics["first_token_s"] = min(first_token)
        if finished:
            self._forget(request_id)
        return RequestOutput(request_id, parent.prompt, parent.prompt_token_ids, completions, finished,
                             metrics=metrics)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        state = self._text[seq.seq_id]
        finished = seq.is_finished
        if finished and not state.final:
            self._finish_text(seq, state)
        text = state.text
        if state.detokenizer is None:
            new_text = text[state.emitted:] if finished else ""
            state.emitted = len(text) if finished else 0
        else:
            visible = len(text)
            if not finished and seq.params.stop_list:
                # Hold back what could be the start of a stop string.
                visible = max(state.emitted, len(text) - max(len(s) for s in seq.params.stop_list) + 1)
            new_text = text[state.emitted:visible]
            state.emitted = visible
        new_ids = seq.output_token_ids[state.emitted_tokens:]
        state.emitted_tokens = seq.num_output_tokens
        new_lps = seq.output_logprobs[state.emitted_logprobs:] if seq.params.logprobs is not None else None
        state.emitted_logprobs = len(seq.output_logprobs)
        return CompletionOutput(
            index=seq.index,
            text=text if finished else text[: state.emitted],
            token_ids=seq.output_token_ids if finished else [],
            finish_reason=seq.finish_reason if finished else None,
            stop_reason=seq.stop_reason,
            logprobs=seq.output_logprobs if (finished and seq.params.logprobs is not None) else None,
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            new_text=new_text,
            new_token_ids=new_ids,
            new_logprobs=new_lps,
            stop_token_hidden=finished and state.stop_token_hidden,
        )

    def _finish_text(self, seq: Sequence, state: _TextState) -> None:
        """A finished sequence's whole text, made as its stream makes it: the same
        detokenizer, the prompt's last ids as context, the held-back tail flushed (unless
        a stop string cut the text). Not streamed and no stop strings: decoded here, once;
        detokenize=False: the caller decodes."""
        state.final = True
        if state.detokenizer is not None:
            if not state.stopped_by_string:
                state.text += state.detokenizer.flush()
        elif self.tokenizer is not None and seq.detokenize:
            ids = seq.output_token_ids
            state.text = detokenize(self.tokenizer, seq.prompt_token_ids,
                                    ids[:-1] if state.stop_token_hidden else ids,
                                    seq.params.skip_special_tokens)

    def _forget(self, request_id: str) -> None:
        seqs = self._requests.pop(request_id, [])
        if seqs and _needs_drained_steps(seqs[0].params, self.parallel_sampling_ahead):
            self._num_sync_requests -= 1
        for seq in seqs:
            self._text.pop(seq.seq_id, None)
            self._grammars.pop(seq.seq_id, None)

    def _emit_step_stats(self, sched: SchedulerOutput, batch, start: float, num_out: int) -> None:
        self._step_index += 1
        if not self._step_listeners:
            return
        flops, bytes_moved = self.runner.step_cost(batch)
        bm = self.block_manager
        stats = StepStats(
            step_index=self._step_index, start_monotonic_s=start, end_monotonic_s=time.monotonic(),
            num_prefill_tokens=batch.num_prefill_tokens, num_decode_tokens=batch.num_decode_tokens,
            batch_size=len(sched.scheduled), num_kv_blocks_used=bm.num_used_blocks,
            num_kv_blocks_total=bm.num_total_blocks, num_swapped_blocks=bm.num_cpu_blocks_used,
            num_preemptions=len(sched.preempted_swap) + len(sched.preempted_recompute),
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            num_swapped=len(self.scheduler.swapped), num_output_tokens=num_out,
            flops=flops, bytes_moved=bytes_moved, num_waiting_tokens=self.scheduler.num_waiting_tokens,
        )
        for listener in self._step_listeners:
            try:
                listener(stats)
            except Exception:  # a listener never stops the engine
                log.exception("step listener failed")

    # -- introspection -------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_total_blocks": bm.num_total_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_cpu_blocks": bm.cpu.num_blocks,
            "num_cpu_blocks_used": bm.num_cpu_blocks_used,
            "num_preemptions_swap": sch.num_preemptions_swap,
            "num_preemptions_recompute": sch.num_preemptions_recompute,
            "num_swapped_out_blocks": bm.num_swapped_out_blocks,
            "num_swapped_in_blocks": bm.num_swapped_in_blocks,
            "num_running": len(sch.running),
            "num_waiting": len(sch.waiting) + len(self._compiling),
            "num_swapped": len(sch.swapped),
            "kv_cache_usage": bm.num_used_blocks / max(bm.num_total_blocks, 1),
            "num_prompt_tokens_total": self.num_prompt_tokens_total,
            "num_generation_tokens_total": self.num_generation_tokens_total,
            # Structured outputs: grammars compiled and found in the cache; mask host time.
            "num_grammars_compiled": self._grammar_compiler.num_compiled if self._grammar_compiler else 0,
            "num_grammar_cache_hits": self._grammar_compiler.num_cache_hits if self._grammar_compiler else 0,
            **self._mask_stats(),
            "block_size": bm.block_size,
            "prefix_cache_queries": bm.prefix_cache_queries,  # tokens looked up
            "prefix_cache_hits": bm.prefix_cache_hits,  # tokens found cached, not recomputed
            "num_cached_blocks": bm.num_cached_blocks,
            "num_shared_blocks": bm.num_shared_blocks,  # ref_count > 1 now
            "num_cow_copies": bm.num_cow_copies,
            "max_num_seqs": sch.max_num_seqs,  # as configured; a governor's limits tighten them
            "max_num_batched_tokens": sch.max_num_batched_tokens,
            "duty_cycle": self.step_gate.duty,
            "paced_s": self.step_gate.paused_s,  # idle time the duty cycle has asked for
        }

    def _mask_stats(self) -> dict[str, float]:
        """Grammar masks: steps and rows filled; seconds filling (on other threads), of that
        the engine's thread waited for (not hidden), catching matchers up, queuing copies."""
        t = self._mask_filler.timing if self._mask_filler is not None else None
        if t is None:
            return {"grammar_mask_steps": 0, "grammar_mask_rows": 0, "grammar_mask_s": 0.0,
                    "grammar_mask_wait_s": 0.0, "grammar_mask_sync_s": 0.0, "grammar_mask_copy_s": 0.0}
        return {"grammar_mask_steps": t.num_steps, "grammar_mask_rows": t.num_rows,
                "grammar_mask_s": t.fill_s, "grammar_mask_wait_s": t.wait_s,
                "grammar_mask_sync_s": t.sync_s, "grammar_mask_copy_s": t.copy_s}

    def waste_per_running_seq(self) -> list[int]:
        """Allocated-but-unused KV slots of each running sequence (for the KV-waste check)."""
        bs = self.block_manager.block_size
        return [len(s.block_table) * bs - s.num_computed_tokens for s in self.scheduler.running
                if s.status is SequenceStatus.RUNNING]
