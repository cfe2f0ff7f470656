"""One rank's model runner in a tensor-parallel engine: the same `ModelRunner` over the
rank's shard of the model and its KV heads, kept in lockstep with the other ranks.

Rank 0 (the engine's own process, which schedules) sends each step's plain data before it
runs the step: the host batch (token ids, positions, slot mapping, block tables, context
lengths, logits rows), the swap and copy-on-write mappings, and, under asynchronous
scheduling, the previous step's draws that the batch still reads from the device. The
other ranks run exactly what they receive (`serve_steps`), so every rank makes the same
kernel launches, replays the same CUDA graph (chosen from the same batch) and meets the
others at the same collectives. Only rank 0 samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ondo.distributed.group import TensorParallelGroup
from ondo.engine.model_runner import HostBatch, ModelRunner, StepBatch
from ondo.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class StepMessage:
    """What rank 0 sends the other ranks for one step (the fields `execute` reads of a
    SchedulerOutput, plus the host batch)."""

    host: HostBatch
    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    block_copies: list[tuple[int, int]]
    num_prev_tokens: int  # > 0: the previous step's draws follow on the device group


class TensorParallelError(RuntimeError):
    """The tensor-parallel ranks cannot go on together (a rank died or fell out of step)."""


class ShardedModelRunner(ModelRunner):
    """`watch`: on rank 0, the workers' watch (`TensorParallelWorkers`): checked before each
    step and asked to explain a step that failed; None on the other ranks."""

    def __init__(self, *args, group: TensorParallelGroup, watch=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.watch = watch

    def agree_num_blocks(self, num_blocks: int) -> int:
        # Every rank holds the same block ids: the cache is as large as the smallest rank's.
        agreed = self.group.min_over_ranks(num_blocks)
        if agreed < num_blocks:
            log.info("rank %d could hold %d KV blocks; the ranks agree on %d", self.group.rank,
                     num_blocks, agreed)
        return agreed

    def profile_and_allocate(self):
        # Loading takes each rank its own time: meet here, under the step group's timeout,
        # so that the device group's timeout only ever bounds a step's collectives.
        self.group.barrier()
        return super().profile_and_allocate()

    # -- rank 0 -------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput, batch: StepBatch,
                prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.watch is None:
            raise RuntimeError("only rank 0 executes scheduled steps; other ranks serve_steps()")
        self.watch.check()
        if batch.pending_dst is not None and prev_tokens is None:
            raise RuntimeError("the batch reads pending tokens but no previous draws were given")
        try:
            num_prev = 0 if batch.pending_dst is None else int(prev_tokens.shape[0])
            self.group.send_step(StepMessage(batch.host, sched.swap_out, sched.swap_in,
                                             sched.block_copies, num_prev))
            if num_prev:
                self.group.broadcast_tensor(prev_tokens.contiguous())
            return super().execute(sched, batch, prev_tokens)
        except Exception as e:
            # Whatever happened, the ranks may now wait at different collectives.
            raise self.watch.step_failed(e) from e
        except BaseException as e:  # interrupted mid-step: no step can follow this one either
            self.watch.step_failed(e, look_for_death=False)
            raise

    # -- the other ranks --------------------------------------------------------------
    def serve_steps(self) -> int:
        """Run rank 0's steps until it says stop; returns how many ran."""
        steps = 0
        while True:
            message: StepMessage | None = self.group.receive_step()
            if message is None:
                return steps
            batch = self.upload(message.host)
            prev = None
            if message.num_prev_tokens:
                prev = torch.empty(message.num_prev_tokens, dtype=torch.int64, device=self.device)
                self.group.broadcast_tensor(prev)
            super().execute(message, batch, prev)  # logits: this rank's slice, unread
            steps += 1
