"""The tensor-parallel process group of this process, and the collectives the ranks run.

A process serves at most one tensor-parallel engine, so the group is held here, the way
Megatron and vLLM hold theirs, and the model's layers find it (`tensor_parallel_group()`)
instead of carrying it: a loaded shard is plain data.

Two groups over the same ranks:
- the device group (NCCL on CUDA, gloo on the CPU) carries the forward pass's collectives:
  the row-parallel layers' and the embedding's all-reduces, the logits' gather, and the
  previous step's draws under asynchronous scheduling. Its timeout bounds each of them
  (`ONDO_TP_COLLECTIVE_TIMEOUT_S`, 600 s by default), so a rank that hangs fails the others.
- the step group (gloo, on the host) carries rank 0's plain data for each step. Workers
  wait on it between steps for as long as the engine idles, so its timeout is a year; a
  rank that dies closes its sockets, which fails a pending wait at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ondo.distributed.collective_timer import CollectiveTimer

log = logging.getLogger(__name__)

STEP_GROUP_TIMEOUT = timedelta(days=365)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0

_GROUP: TensorParallelGroup | None = None


def collective_timeout_s() -> float:
    return float(os.environ.get("ONDO_TP_COLLECTIVE_TIMEOUT_S", DEFAULT_COLLECTIVE_TIMEOUT_S))


@dataclass
class TensorParallelGroup:
    rank: int
    size: int
    device: torch.device
    device_group: Any  # ProcessGroup
    step_group: Any  # ProcessGroup (gloo)
    timer: CollectiveTimer | None = None  # set to time the forward's collectives (eager steps)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        if self.timer is None:
            dist.all_reduce(x, group=self.device_group)
            return x
        with self.timer.span("all_reduce", x.device):
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shape everywhere), in rank order, on rank 0; None elsewhere."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        if self.timer is None:
            dist.gather(x, parts, dst=0, group=self.device_group)
        else:
            with self.timer.span("gather", x.device):
                dist.gather(x, parts, dst=0, group=self.device_group)
        return parts

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (contiguous, same shape and dtype)."""
        dist.broadcast(x, src=0, group=self.device_group)
        return x

    def send_step(self, message: object) -> None:
        """Rank 0: one step's plain data (picklable) to every other rank."""
        dist.broadcast_object_list([message], src=0, group=self.step_group)

    def receive_step(self) -> Any:
        """Other ranks: wait for rank 0's next `send_step` and return its message."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.step_group)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.step_group)
        return int(t.item())

    def barrier(self) -> None:
        """Wait for every rank, however long (the step group's timeout): start-up only."""
        dist.barrier(group=self.step_group)

    def abort(self) -> None:
        """From another thread: abort the device group's communicators, so that a collective
        waiting on a dead rank returns with an error instead of waiting out its timeout
        (NCCL; gloo fails such a collective by itself when the rank's sockets close)."""
        if self.device.type != "cuda":
            return
        abort = getattr(self.device_group, "abort", None)
        if abort is None:
            log.warning("this torch cannot abort a process group; collectives wait out their timeout")
            return
        try:
            abort()
        except Exception:
            log.exception("aborting the tensor-parallel device group failed")


def tensor_parallel_group() -> TensorParallelGroup:
    if _GROUP is None:
        raise RuntimeError("no tensor-parallel group in this process: a sharded model runs only "
                           "inside a tensor-parallel engine")
    return _GROUP


def current_group() -> TensorParallelGroup | None:
    return _GROUP


def init_tensor_parallel(rank: int, size: int, store: Any, device: torch.device,
                         timeout_s: float | None = None) -> TensorParallelGroup:
    """Join the ranks' groups through `store` (a TCPStore on rank 0's loopback port);
    blocks until every rank has joined."""
    global _GROUP
    if _GROUP is not None or dist.is_initialized():
        raise RuntimeError("this process already has a torch.distributed process group (one "
                           "tensor-parallel engine per process: close the other one first)")
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else collective_timeout_s())
    if device.type == "cuda":
        # Errors abort the communicators and surface as exceptions rather than killing the
        # process, so the engine can say which rank died (unless the user chose otherwise).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        dist.init_process_group("nccl", store=store, rank=rank, world_size=size, timeout=timeout,
                                device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    step_group = dist.new_group(backend="gloo", timeout=STEP_GROUP_TIMEOUT)
    _GROUP = TensorParallelGroup(rank, size, device, dist.group.WORLD, step_group)
    log.info("tensor-parallel rank %d of %d on %s joined (%s)", rank, size, device,
             "nccl" if device.type == "cuda" else "gloo")
    return _GROUP


def destroy_tensor_parallel() -> None:
    """Leave and destroy this process's groups; idempotent."""
    global _GROUP
    _GROUP = None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group aborted after a rank died
            log.exception("destroying the tensor-parallel process group failed")
