"""Constrained decoding with llguidance: grammars compiled off the engine's thread and cached
by their constraint's hash, one matcher per sequence, and each step's token masks computed
for the whole batch at once and applied to the logits on the device in one operation.

A matcher's state is the sequence's output tokens: `SequenceGrammar.sync` makes it consume
whatever the sequence has that it has not (tokens still on the device included, under
asynchronous scheduling) and roll back whatever the sequence no longer has, so it follows
the sequence through swaps and recomputation without the engine tracking either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ondo.engine.structured_outputs import StructuredOutputsParams, check

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)


@dataclass
class CompiledGrammar:
    """A matcher in its start state, copied for each sequence (the copies share the
    lexer's lazily built states, so the cache keeps that work too)."""

    key: str
    template: object  # llguidance.LLMatcher

    def new_matcher(self) -> object:
        return self.template.deep_copy()


class GrammarCompiler:
    """Compiles constraints on a thread of its own; `submit` returns at once. The first
    compilation also builds the library's view of the vocabulary (about a second for
    150k tokens), on the same thread."""

    def __init__(self, hf_tokenizer: object, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: object | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ondo-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future[CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self.num_compiled = 0
        self.num_cache_hits = 0

    def submit(self, spec: StructuredOutputsParams) -> Future[CompiledGrammar]:
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return future
            future = self._pool.submit(self._compile, key, spec)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, key: str, spec: StructuredOutputsParams) -> CompiledGrammar:
        import llguidance

        text = check(spec)
        matcher = llguidance.LLMatcher(self.tokenizer(), text)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind}: {matcher.get_error()}")
        self.num_compiled += 1
        return CompiledGrammar(key, matcher)

    def tokenizer(self) -> object:
        """llguidance's tokenizer over the model's vocabulary (rows of the logits)."""
        if self._tokenizer is None:
            import llguidance.hf

            size = max(self.vocab_size, len(self._hf_tokenizer))
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=size,
                                                           eos_token=self.eos_token_ids)
        return self._tokenizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """One sequence's matcher and how many of its output tokens it has consumed."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.compiled = compiled
        self.matcher = compiled.new_matcher()
        self.num_consumed = 0
        self.error: str | None = None
        # Nothing but EOS may follow: the output is a whole sentence of the grammar. Kept
        # here, so that reading it never touches a matcher whose mask is being filled.
        self.is_complete = False

    def fork(self) -> SequenceGrammar:
        """A matcher in the same state, for a sequence forked from this one."""
        child = SequenceGrammar.__new__(SequenceGrammar)
        child.compiled = self.compiled
        child.matcher = self.matcher.deep_copy()
        child.num_consumed = self.num_consumed
        child.error = self.error
        child.is_complete = self.is_complete
        return child

    def sync(self, token_ids: list[int], start: int, pending: int | None = None) -> None:
        """Consume the sequence's output, `token_ids[start:]` then `pending` (drawn, not yet
        appended), past what it has consumed; roll back what the sequence no longer has."""
        total = len(token_ids) - start + (pending is not None)
        if self.num_consumed > total:
            if self.matcher.rollback(self.num_consumed - total):
                self.num_consumed = total
            else:
                self.matcher.reset()
                self.num_consumed = 0
            self.is_complete = self.matcher.is_stopped()
        if self.num_consumed == total or self.error is not None:
            return
        new = token_ids[start + self.num_consumed:]
        if pending is not None:
            new.append(pending)
        if not self.matcher.consume_tokens(new):
            self.error = self.matcher.get_error() or f"tokens {new} do not match the grammar"
        self.num_consumed = total
        self.is_complete = self.error is None and self.matcher.is_stopped()


class BatchMasks:
    """Each step's allowed-token bitmask for the rows that have a grammar: filled by the
    library's thread pool (the interpreter lock released), for all rows at once."""

    def __init__(self, vocab_size: int, device: torch.device, eos_token_id: int) -> None:
        import llguidance

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.device = device
        self.eos_token_id = eos_token_id
        self._executor = llguidance.LLExecutor()
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self.num_steps = 0
        self.fill_s = 0.0  # host time filling masks, summed

    def fill(self, grammars: list[SequenceGrammar]) -> torch.Tensor:
        """[len(grammars), words] int32 bitmask on the device (bit t of row r: token t allowed)."""
        t0 = time.perf_counter()
        rows = len(grammars)
        if self._copied is not None:  # last step's copy out of the pinned buffer
            self._copied.synchronize()
        if self._host is None or self._host.shape[0] < rows:
            self._host = torch.empty((max(rows, 8), self.words), dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        host = self._host[:rows]
        work = [(g.matcher, i) for i, g in enumerate(grammars) if g.error is None]
        if work:
            self._executor.unsafe_compute_mask_ptr(work, host.data_ptr(), self.words * 4, rows)
        for i, g in enumerate(grammars):
            if g.error is not None:  # a broken matcher may only end its sequence
                host[i].zero_()
                host[i, self.eos_token_id // 32] = 1 << (self.eos_token_id % 32)
        if self.device.type == "cuda":
            out = host.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            out = host.clone()
        self.num_steps += 1
        self.fill_s += time.perf_counter() - t0
        return out


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor) -> None:
    """In place: every token whose bit is 0 in its row's mask gets -inf. `rows` picks the
    logits rows the bitmask's rows belong to (None: all, in order). A few batched kernels
    for the whole step, whatever the number of rows."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    vocab = logits.shape[1]
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
