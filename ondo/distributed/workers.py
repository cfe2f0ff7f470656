"""Rank 0's side of a tensor-parallel engine: start ranks 1 to N-1 as processes of their own
(multiprocessing spawn, one device each), join their process group, watch that they live,
and stop them.

A watchdog thread waits on the workers' process sentinels. When one dies, the engine can
no longer step: the death is recorded (rank, pid, exit code or signal, and the worker's own
error where it could send one), the device group is aborted so that a collective waiting
on the dead rank returns (on CUDA; gloo fails such a wait by itself), and the next or
current step raises `WorkerDied` with that description. Rank 0 never waits on a dead rank
for longer than it takes to notice.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from ondo.distributed.checks import FLAG, check_tensor_parallel, rank_device
from ondo.distributed.group import (
    TensorParallelGroup,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from ondo.distributed.sharded_runner import TensorParallelError
from ondo.distributed.worker import joined_key, run_worker
from ondo.engine.config import EngineArgs
from ondo.model.loader import read_model_config
from ondo.model.parallel_layers import Shard

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 600.0  # spawning a worker and importing torch on a busy machine
EXPLAIN_WAIT_S = 3.0  # after a failed step: how long to look for a worker that died


class WorkerDied(TensorParallelError):
    """A worker process of the tensor-parallel engine died; the message says which and how."""


@dataclass
class _Worker:
    rank: int
    device: torch.device
    process: mp.process.BaseProcess
    errors: Connection  # the worker's last words, if it could send them


class TensorParallelWorkers:
    def __init__(self, args: EngineArgs, device: torch.device) -> None:
        self.size = args.tensor_parallel_size
        self.shard = Shard(0, self.size)
        self.device = device
        self.group: TensorParallelGroup | None = None
        self._failure: str | None = None  # a worker died
        self._broken: str | None = None  # rank 0 failed mid-step
        self._closed = False
        self._lock = threading.Lock()
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed process group (one "
                               "tensor-parallel engine per process: close the other one first)")
        self._store = dist.TCPStore("127.0.0.1", 0, self.size, True, wait_for_workers=False,
                                    timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // self.size)
        level = logging.getLogger().level
        self._workers: list[_Worker] = []
        with _children_allowed():
            for rank in range(1, self.size):
                errors, errors_send = ctx.Pipe(duplex=False)
                rank_dev = rank_device(device, rank)
                process = ctx.Process(target=run_worker, name=f"ondo-tp-rank{rank}", daemon=True,
                                      args=(args, rank, self.size, self._store.port, str(rank_dev),
                                            errors_send, level, threads))
                process.start()
                errors_send.close()
                self._workers.append(_Worker(rank, rank_dev, process, errors))
        self._watchdog = threading.Thread(target=self._watch, name="ondo-tp-watchdog", daemon=True)
        self._watchdog.start()
        try:
            self._wait_joined()
            rank0 = rank_device(device, 0)
            if rank0.type == "cuda":
                torch.cuda.set_device(rank0)
            self.group = init_tensor_parallel(0, self.size, self._store, rank0)
        except BaseException:
            self.close()
            raise
        log.info("tensor parallelism over %d ranks: workers %s", self.size,
                 ", ".join(f"rank {w.rank} pid {w.process.pid} on {w.device}" for w in self._workers))

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    @property
    def ok(self) -> bool:
        """Every rank alive and in step."""
        return self._failure is None and self._broken is None and not self._closed

    def check(self) -> None:
        """Raise where the ranks cannot run a step together."""
        if self._failure is not None:
            raise WorkerDied(self._failure)
        if self._broken is not None:
            raise TensorParallelError(self._broken)
        if self._closed:
            raise TensorParallelError("the tensor-parallel engine is closed")

    def step_failed(self, error: BaseException, look_for_death: bool = True) -> TensorParallelError:
        """Rank 0's step raised: the ranks may now wait at different collectives, so no step
        can follow. The error to raise: the worker that died (looked for briefly: a closed
        socket can be seen before the process's exit), else rank 0's own failure."""
        deadline = time.monotonic() + (EXPLAIN_WAIT_S if look_for_death else 0.0)
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._failure is not None:
            return WorkerDied(self._failure)
        with self._lock:
            self._broken = (f"a step failed on rank 0 ({type(error).__name__}: {error}); the "
                            f"{self.size} tensor-parallel ranks are out of step and the engine "
                            "cannot go on")
        return TensorParallelError(self._broken)

    def abandon(self) -> None:
        """Stop the workers at once, where the ranks may be anywhere (rank 0 failed while
        starting): kill them rather than ask."""
        with self._lock:
            if self._broken is None and self._failure is None:
                self._broken = "the engine failed while its ranks were starting"
        self.close()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the workers (asked, then killed after `timeout_s`) and leave the group."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            in_step = self._failure is None and self._broken is None and self.group is not None
        if in_step:
            try:
                self.group.send_step(None)  # leave serve_steps
            except Exception as e:
                log.warning("could not tell the tensor-parallel workers to stop: %s", e)
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            w.process.join(max(deadline - time.monotonic(), 0.1) if in_step else 0.1)
            if w.process.is_alive():
                if in_step:
                    log.warning("tensor-parallel rank %d did not stop within %.0f s: killing it",
                                w.rank, timeout_s)
                w.process.kill()
                w.process.join(5.0)
        if self._watchdog is not threading.current_thread():
            self._watchdog.join(5.0)
        destroy_tensor_parallel()
        self.group = None

    # -- watching ---------------------------------------------------------------------
    def _wait_joined(self) -> None:
        keys = [joined_key(w.rank) for w in self._workers]
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not self._store.check(keys):
            if self._failure is not None:
                raise WorkerDied(self._failure)
            if time.monotonic() > deadline:
                raise TensorParallelError(f"the tensor-parallel workers did not start within "
                                          f"{JOIN_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def _watch(self) -> None:
        by_sentinel = {w.process.sentinel: w for w in self._workers}
        while not self._closed:
            ready = wait(list(by_sentinel), timeout=0.5)
            if not ready or self._closed:
                continue
            dead = [by_sentinel[s] for s in ready]
            for w in dead:
                w.process.join(1.0)
            with self._lock:
                if self._closed:
                    return
                self._failure = "; ".join(self._describe(w) for w in dead) + (
                    f"; the engine cannot go on with {FLAG} {self.size}")
            log.error("%s", self._failure)
            if self.group is not None:
                self.group.abort()
            return

    def _describe(self, w: _Worker) -> str:
        code = w.process.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            how += f" ({signal.Signals(-code).name})"
        said = None
        try:
            if w.errors.poll():
                said = w.errors.recv()
        except (EOFError, OSError):
            pass
        return (f"tensor-parallel worker rank {w.rank} (pid {w.process.pid}, {w.device}) died "
                f"with {how}" + (f": {said}" if said else ""))


def start_tensor_parallel(args: EngineArgs, device: torch.device) -> TensorParallelWorkers:
    """Check the size against the model's shape and the machine (reading only the model's
    config), then start the workers and join their group."""
    config = read_model_config(args.model, args.load_format)
    num_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    check_tensor_parallel(args.tensor_parallel_size, config, device, num_gpus)
    return TensorParallelWorkers(args, device)


@contextmanager
def _children_allowed() -> Iterator[None]:
    """An engine process is daemonic (it dies with its server), and multiprocessing forbids a
    daemonic process children. The workers exit with their parent anyway (they watch it,
    and its sockets close under them), so the rule is lifted while they start."""
    me = mp.current_process()
    daemon = me._config.get("daemon")
    me._config["daemon"] = False
    try:
        yield
    finally:
        if daemon is None:
            me._config.pop("daemon", None)
        else:
            me._config["daemon"] = daemon
