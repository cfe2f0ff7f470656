"""Test-only: a failure injected into the steps of chosen requests, to check that a step
that fails (as on a GPU out of memory) ends only its own requests and the engine goes on.

Set ONDO_INJECT_STEP_FAULT=<request id prefix> in the environment of the process that
builds the engine (an engine process inherits it): every step that schedules a sequence
of a request whose id starts with the prefix raises `torch.OutOfMemoryError` before its
forward pass. Unset (always, outside tests), nothing is wrapped and no step pays for it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "ONDO_INJECT_STEP_FAULT"


def install_from_env(engine: Any) -> None:
    prefix = os.environ.get(ENV)
    if not prefix:
        return
    log.warning("%s=%s: steps of requests %s* will fail (test only)", ENV, prefix, prefix)
    execute = engine.runner.execute

    def failing_execute(sched, batch, prev_tokens=None):
        if any(item.seq.request_id.startswith(prefix) for item in sched.scheduled):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected for requests {prefix}*)")
        return execute(sched, batch, prev_tokens)

    engine.runner.execute = failing_execute
