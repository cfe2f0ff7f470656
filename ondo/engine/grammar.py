"""Constrained decoding with llguidance: grammars compiled off the engine's thread and cached
by their constraint's hash, and one matcher per sequence (each step's masks are
`token_masks.py`'s).

A matcher's state is the sequence's output tokens: `SequenceGrammar.sync` makes it consume
whatever the sequence has that it has not (tokens still on the device included, under
asynchronous scheduling) and roll back whatever the sequence no longer has, so it follows
the sequence through swaps and recomputation without the engine tracking either.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ondo.engine.structured_outputs import StructuredOutputsParams, check

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)


@dataclass
class CompiledGrammar:
    """Matchers in their start state, one per shard, copied for each sequence. The copies
    of one matcher share its lexer's lazily built states (so the cache keeps that work
    too) behind one lock of the library's: threads filling masks of copies of one matcher
    take turns, and one pool thread was no slower than many. So the grammar is compiled
    once per fill thread, sequences are dealt to the shards in turn, and the fill hands
    each thread rows of one shard (`token_masks.py`)."""

    key: str
    templates: list[object]  # llguidance.LLMatcher, one per shard
    _turn: itertools.count = field(default_factory=itertools.count, repr=False)

    @property
    def template(self) -> object:
        return self.templates[0]

    def new_matcher(self) -> tuple[object, int]:
        """A matcher in the start state and its shard."""
        shard = next(self._turn) % len(self.templates)
        return self.templates[shard].deep_copy(), shard


class GrammarCompiler:
    """Compiles constraints on a thread of its own; `submit` returns at once. The first
    compilation also builds the library's view of the vocabulary (about a second for
    150k tokens), on the same thread."""

    def __init__(self, hf_tokenizer: object, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = CACHE_SIZE, num_shards: int = 1) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        self.num_shards = num_shards
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
        shards = [matcher] + [llguidance.LLMatcher(self.tokenizer(), text)
                              for _ in range(self.num_shards - 1)]
        self.num_compiled += 1
        return CompiledGrammar(key, shards)

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
        self.matcher, self.shard = compiled.new_matcher()
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
        child.shard = self.shard
        child.num_consumed = self.num_consumed
        child.error = self.error
        child.is_complete = self.is_complete
        return child

    def next_token(self, token_ids: list[int], start: int, pending: int | None = None) -> int | None:
        """The one token `sync` would consume, where that is all it would do (the common case
        each step); None otherwise (nothing, several tokens, a rollback, an error)."""
        total = len(token_ids) - start + (pending is not None)
        if total != self.num_consumed + 1 or self.error is not None:
            return None
        return pending if pending is not None else token_ids[-1]

    def consumed(self, ok: bool) -> None:
        """`next_token`'s token was consumed (by the library, for a batch at once)."""
        self.num_consumed += 1
        if not ok:
            self.error = self.matcher.get_error() or "a token does not match the grammar"
        self.is_complete = ok and self.matcher.is_stopped()

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
