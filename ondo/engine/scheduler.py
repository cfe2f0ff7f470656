"""Iteration-level scheduling: which sequences run this step, how many tokens each, which blocks.

Plain deciding code: it moves sequences between the waiting, running and swapped
queues and asks the block manager for blocks; it returns a `SchedulerOutput` and
never touches a tensor. Order of work each step: running sequences first (oldest
first; when blocks run short the newest running one is preempted), then swapped
ones back in, then, only if nothing is left swapped, new ones from the waiting queue.
A new sequence starts after its longest cached prefix (prefix caching), and waits a
step when at least half of what it would compute is blocks another sequence computes
this step (it then finds them cached instead of computing them again).

`max_num_seqs` bounds the sequences running at every step, also for requests with
n > 1: such a request holds n seats from its admission on (`Sequence.num_seats`), since
it forks into n running sequences when its first token is sampled. With debug checks
on (`ONDO_DEBUG_CHECKS=1`, as in the test suite) every schedule asserts the bound.

With `allow_preemption=False` (the engine schedules ahead of a step still on the GPU)
nothing is preempted: a running sequence that gets no blocks waits, nothing new is
admitted, and the output says `blocked`, so the engine drains before the next step.

A governor may tighten the configured limits at run time (`set_limits`, see
`scheduler_limits.py`): a smaller token budget, fewer seats (admissions stop until the
running set is below them; nothing is preempted), a prefill chunk, admission pacing.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from ondo.engine.block_manager import BlockManager
from ondo.engine.scheduler_limits import UNLIMITED, PrefillPacer, SchedulerLimits
from ondo.engine.sequence import Sequence, SequenceStatus

DEBUG_CHECKS = os.environ.get("ONDO_DEBUG_CHECKS", "") not in ("", "0")


@dataclass(frozen=True)
class PreemptionCosts:
    """Measured rates the `auto` mode weighs (seconds per unit of work)."""

    kv_bytes_per_block: int
    swap_bytes_per_s: float  # host-link copy bandwidth, one direction
    prefill_tokens_per_s: float

    def swap_cost_s(self, num_blocks: int) -> float:
        # Out now and back in later.
        return 2.0 * num_blocks * self.kv_bytes_per_block / self.swap_bytes_per_s

    def recompute_cost_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    samples: bool = False  # this step reaches the last token, so a new one is sampled

    def __post_init__(self) -> None:
        seq = self.seq
        self.samples = seq.num_computed_tokens + self.num_new_tokens == len(seq.token_ids) + seq.num_pending_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu) block copies
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu) block copies
    # (src, dst) GPU block copies for copy-on-write; run after the swaps, before the forward pass.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted_swap: list[Sequence] = field(default_factory=list)
    preempted_recompute: list[Sequence] = field(default_factory=list)
    blocked: bool = False  # blocks ran short and preemption was not allowed

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str = "auto",
        costs: PreemptionCosts | None = None,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        debug_checks: bool = DEBUG_CHECKS,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.costs = costs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_model_len = max_model_len
        self.debug_checks = debug_checks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions_swap = 0
        self.num_preemptions_recompute = 0
        self.num_waiting_tokens = 0  # tokens of the waiting sequences: the prefill work ahead
        self.clock = time.monotonic  # for admission pacing (the simulator's runs in virtual time)
        self.set_limits(UNLIMITED)

    def set_limits(self, limits: SchedulerLimits) -> None:
        """Tighten the configured limits at run time (a governor's actuators)."""
        self.limits = limits
        self._token_budget = min(self.max_num_batched_tokens,
                                 limits.max_num_batched_tokens or self.max_num_batched_tokens)
        self._seat_limit = min(self.max_num_seqs, limits.max_num_seqs or self.max_num_seqs)
        self._prefill_cap = limits.max_prefill_tokens if self.enable_chunked_prefill else None
        rate = limits.prefill_tokens_per_s
        old = getattr(self, "_pacer", None)
        if rate is None:
            self._pacer = None
        elif old is None or old.rate_per_s != rate:
            self._pacer = PrefillPacer(rate, self.clock(), None if old is None else old.level)

    # -- queue changes --------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.num_waiting_tokens += seq.num_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of whichever queue holds it and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.num_waiting_tokens -= seq.num_tokens
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = reason

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` beside `parent`, sharing its blocks (parallel sampling)."""
        self.block_manager.fork(parent, child)
        parent.forked = True  # its seats pass to the children, one each
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    @property
    def num_seats_running(self) -> int:
        """Seats of `max_num_seqs` the running sequences hold (n for an unforked n > 1 request)."""
        return sum(seq.num_seats for seq in self.running)

    # -- the decision ----------------------------------------------------------
    def schedule(self, allow_preemption: bool = True) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._token_budget
        allowance = self._prefill_allowance()  # prompt tokens this step may compute
        prefill = 0  # prompt tokens scheduled
        running: list[Sequence] = []

        # 1. Running sequences, oldest first; preempt from the tail when blocks run out.
        queue = deque(self.running)
        has_slot = self.block_manager.has_slot_for_next_token
        while queue and budget > 0:
            seq = queue.popleft()
            remaining = len(seq.token_ids) + seq.num_pending_tokens - seq.num_computed_tokens  # inlined property
            if (remaining == 1 and has_slot(seq)
                    and not (seq.num_pending_tokens and self._ends_with_pending(seq))):
                # A decode token with room in its own last block: the general path below
                # would decide the same, at several times the cost per sequence.
                out.scheduled.append(ScheduledSeq(seq, 1))
                running.append(seq)
                budget -= 1
                continue
            num_new = self._tokens_for(remaining, budget)
            in_prefill = remaining > 1
            if in_prefill:
                num_new = self._limit_prefill(num_new, allowance - prefill)
            if num_new == 0 or self._ends_with_pending(seq):
                running.append(seq)
                continue
            if self._allocate_or_preempt(seq, num_new, queue, out, allow_preemption):
                out.scheduled.append(ScheduledSeq(seq, num_new))
                running.append(seq)
                budget -= num_new
                if in_prefill:
                    prefill += num_new
            elif seq.status is SequenceStatus.RUNNING:  # short of blocks, not preempted
                running.append(seq)
                out.blocked = True
                break
        running.extend(queue)  # left for lack of token budget, still running
        self.running = running

        # 2. Swapped sequences come back before any new one is admitted.
        preempted = bool(out.preempted_swap or out.preempted_recompute or out.blocked)
        seats = self.num_seats_running if (self.swapped or self.waiting) and not preempted else 0
        while self.swapped and not preempted and budget > 0:
            seq = self.swapped[0]
            if seats + seq.num_seats > self._seat_limit:
                break
            remaining = seq.num_uncomputed_tokens
            num_new = self._tokens_for(remaining, budget)
            in_prefill = remaining > 1
            if in_prefill:
                num_new = self._limit_prefill(num_new, allowance - prefill)
            if num_new == 0 or not self.block_manager.can_swap_in(seq, num_new):
                break
            self.swapped.popleft()
            out.swap_in.extend(self.block_manager.swap_in(seq))
            self.block_manager.allocate_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats += seq.num_seats
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            if in_prefill:
                prefill += num_new

        # 3. New sequences, first come first served.
        computing: set[bytes] = set()  # hashes of full blocks this step computes
        while (self.waiting and not self.swapped and not preempted and budget > 0
               and prefill < allowance):
            seq = self.waiting[0]
            if seats + seq.num_seats > self._seat_limit:
                break
            cached = self.block_manager.find_cached_prefix(seq)
            if computing and self._mostly_computing(seq, len(cached), computing):
                break  # next step it finds those blocks cached
            num_new = self._tokens_for(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            num_new = self._limit_prefill(num_new, allowance - prefill)
            if num_new == 0:
                break
            if not self.block_manager.allocate_with_prefix(seq, cached, num_new):
                break
            self.waiting.popleft()
            self.num_waiting_tokens -= seq.num_tokens
            prefill += num_new
            if self.block_manager.enable_prefix_caching:
                full = (seq.num_computed_tokens + num_new) // self.block_manager.block_size
                computing.update(seq.block_hashes[len(cached):full])
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats += seq.num_seats
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        out.block_copies = self.block_manager.take_copies()
        if self._pacer is not None and prefill:
            self._pacer.take(prefill)
        if self.debug_checks:
            self._check_invariants(out, prefill)
        return out

    def _prefill_allowance(self) -> int | float:
        """Prompt tokens this step may compute: the chunk limit and what the pacing bucket
        holds (without chunked prefill, a whole prompt once the bucket is not empty)."""
        allowance = self._prefill_cap if self._prefill_cap is not None else float("inf")
        if self._pacer is not None:
            level = self._pacer.refill(self.clock())
            if level <= 0:
                return 0
            if self.enable_chunked_prefill:
                allowance = min(allowance, level)
        return allowance

    def _limit_prefill(self, num_new: int, left: int | float) -> int:
        if num_new <= left:
            return num_new
        if left <= 0:
            return 0
        # Chunked prefill computes what the allowance holds; without it a prompt runs whole
        # (the pacer then goes into debt) rather than waiting forever.
        return int(left) if self.enable_chunked_prefill else num_new

    def _check_invariants(self, out: SchedulerOutput, prefill_tokens: int) -> None:
        seats = self.num_seats_running
        assert seats <= self.max_num_seqs, f"{seats} seats running, max_num_seqs={self.max_num_seqs}"
        assert len(out.scheduled) <= self.max_num_seqs, f"{len(out.scheduled)} sequences scheduled"
        assert out.num_tokens <= self._token_budget, f"{out.num_tokens} tokens scheduled"
        if self._prefill_cap is not None:
            assert prefill_tokens <= self._prefill_cap, f"{prefill_tokens} prefill tokens scheduled"
        assert self.num_waiting_tokens == sum(s.num_tokens for s in self.waiting)
        assert all(s.seq.status is SequenceStatus.RUNNING for s in out.scheduled)

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, queue: deque[Sequence],
                             out: SchedulerOutput, allow_preemption: bool) -> bool:
        """Blocks for `seq`, preempting from the tail of `queue` (then `seq` itself) if allowed."""
        while not self.block_manager.allocate_slots(seq, num_new):
            if not allow_preemption:
                return False
            victim = queue.pop() if queue else seq
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _mostly_computing(self, seq: Sequence, num_cached: int, computing: set[bytes]) -> bool:
        """At least half of what the sequence would compute is blocks this step computes."""
        run = 0
        for h in seq.block_hashes[num_cached:]:
            if h not in computing:
                break
            run += 1
        uncached = seq.num_tokens - num_cached * self.block_manager.block_size
        return run > 0 and 2 * run * self.block_manager.block_size >= uncached

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """Its token still on the device is its last: computing after it would be wasted."""
        return (seq.num_pending_tokens > 0 and self.max_model_len is not None
                and seq.reaches_length_limit(self.max_model_len))

    def _tokens_for(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget if self.enable_chunked_prefill else 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if self._choose_swap(seq):
            out.swap_out.extend(self.block_manager.swap_out(seq))
            seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
            out.preempted_swap.append(seq)
            self.num_preemptions_swap += 1
        else:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
            self.num_waiting_tokens += seq.num_tokens
            out.preempted_recompute.append(seq)
            self.num_preemptions_recompute += 1

    def _choose_swap(self, seq: Sequence) -> bool:
        if not seq.block_table or not self.block_manager.can_swap_out(seq):
            return False
        if self.preemption_mode == "swap":
            return True
        if self.preemption_mode == "recompute":
            return False
        if self.costs is None:
            return False
        swap_s = self.costs.swap_cost_s(len(seq.block_table))
        recompute_s = self.costs.recompute_cost_s(seq.num_computed_tokens)
        return swap_s < recompute_s
