"""A tensor-parallel worker process (ranks 1 to N-1): join the group, load this rank's shard,
profile and allocate its KV cache with the others, capture its CUDA graphs, then run the
steps rank 0 sends until told to stop.

A worker ignores Ctrl-C (its engine decides when it stops), dies of SIGTERM (how
multiprocessing stops it where its engine did not), and exits when its parent is gone. An error on a worker ends it (exit code 1) after sending its message to rank 0,
whose watchdog reports it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ondo.distributed.group import (
    TensorParallelGroup,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from ondo.distributed.sharded_runner import ShardedModelRunner
from ondo.engine.config import EngineArgs
from ondo.model.loader import load_model
from ondo.model.parallel_layers import Shard

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 600.0


def joined_key(rank: int) -> str:
    """The store key a worker sets once it reaches rank 0's store: rank 0 joins the group
    only when every worker has (a worker that dies before is reported, not waited for)."""
    return f"ondo/tp/joined/{rank}"


def run_worker(args: EngineArgs, rank: int, size: int, store_port: int, device_name: str,
               errors: Connection, log_level: int, num_threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # An engine process ignores SIGTERM, and ignored signals are inherited; a worker must
    # die of it (multiprocessing stops daemonic children with it at exit).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {rank}]: %(message)s")
    torch.set_num_threads(num_threads)
    _exit_with_parent()
    try:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", store_port, size, False,
                              timeout=timedelta(seconds=STORE_TIMEOUT_S))
        store.set(joined_key(rank), str(os.getpid()))
        group = init_tensor_parallel(rank, size, store, device)
        runner = build_runner(args, group)
        runner.profile_and_allocate()
        steps = runner.serve_steps()
    except BaseException as e:
        log.exception("tensor-parallel rank %d failed", rank)
        try:
            errors.send(f"{type(e).__name__}: {e}")
        except OSError:
            pass
        logging.shutdown()
        os._exit(1)  # no destructors: a collective may still hold the group
    log.info("tensor-parallel rank %d stops after %d steps", rank, steps)
    destroy_tensor_parallel()


def build_runner(args: EngineArgs, group: TensorParallelGroup) -> ShardedModelRunner:
    """This rank's shard and runner, built as rank 0 builds its own (`LLMEngine`)."""
    from ondo.engine.llm_engine import engine_limits, load_dtype

    device = group.device
    torch.manual_seed(args.seed)
    model, config = load_model(args.model, args.load_format, load_dtype(args, device), device,
                               Shard(group.rank, group.size))
    dtype = next(model.parameters()).dtype
    max_model_len, max_num_batched_tokens = engine_limits(args, config, device)
    return ShardedModelRunner(args, model, config, device, dtype, max_model_len,
                              max_num_batched_tokens, group=group)


def _exit_with_parent() -> None:
    """Exit when the parent process is gone (a killed engine process leaves no workers)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="ondo-tp-parent-watch", daemon=True).start()
