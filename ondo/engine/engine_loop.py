"""The engine's side of `AsyncLLM`: apply queued commands, step, publish what happened.

One `EngineLoop` drives one `LLMEngine`, either on a thread of the server's process or
alone in an engine process (`ondo.engine.engine_process`). Both placements talk to
`AsyncLLM` through the same two channels, commands in and `Published` batches out, so
they behave the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ondo.engine.llm_engine import LLMEngine
from ondo.engine.outputs import CompletionOutput, RequestOutput
from ondo.engine.sampling_params import SamplingParams
from ondo.engine.scheduler_limits import SchedulerLimits
from ondo.engine.step_stats import StepStats

log = logging.getLogger(__name__)


@dataclass
class AddRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    arrival_time_s: float
    detokenize: bool = True  # False: the caller turns streamed token deltas into text


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class SetSchedulerLimits:
    """A governor's limits on the scheduler (see `ondo.engine.scheduler_limits`)."""

    limits: SchedulerLimits


Command = AddRequest | AbortRequest | SetSchedulerLimits


@dataclass
class Rejected:
    """A request the engine would not take: `invalid` for bad input (a 400), else its fault."""

    request_id: str
    message: str
    invalid: bool


@dataclass
class Published:
    """What one pass of the loop did: the step's outputs, the requests it refused, how many
    add commands it consumed, and the engine's counters after it."""

    outputs: list[RequestOutput]
    rejected: list[Rejected]
    num_added: int
    stats: dict[str, float]
    step_stats: list[StepStats] = field(default_factory=list)


# take(block) returns the commands queued since the last call, waiting for one when block
# is set; None means stop.
TakeCommands = Callable[[bool], "list[Command] | None"]


class EngineLoop:
    def __init__(self, engine: LLMEngine, take: TakeCommands, publish: Callable[[Published], None],
                 step_stats: list[StepStats] | None = None) -> None:
        self.engine = engine
        self.take = take
        self.publish = publish
        self.step_stats = step_stats  # filled by an engine step listener, shipped with each batch

    def run(self) -> str | None:
        """Loop until told to stop; then abort what is left. Returns why the loop died, or
        None when it was stopped."""
        engine = self.engine
        busy = False
        dead: str | None = None
        try:
            while True:
                commands = self.take(not busy)
                if commands is None:
                    break
                num_added, rejected = self._apply(commands)
                outputs: list[RequestOutput] = []
                pause_s = 0.0
                if engine.has_unfinished_requests():
                    try:
                        t0 = time.monotonic()
                        outputs = engine.step()
                        pause_s = self._pace(time.monotonic() - t0, outputs)
                    except Exception as e:
                        log.exception("engine step failed")
                        outputs = self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                busy = engine.has_unfinished_requests()
                self.publish(Published(outputs, rejected, num_added, engine.stats(), self._drain_step_stats()))
                if pause_s > 0:
                    time.sleep(pause_s)
        except BaseException as e:  # a bug in this loop: the caller fails everyone, loudly
            log.exception("engine loop died")
            dead = f"{type(e).__name__}: {e}"
        self._abort_all()
        try:  # the counters with every block freed
            self.publish(Published([], [], 0, engine.stats()))
        except Exception:
            log.exception("could not publish the engine's final counters")
        return dead

    def _pace(self, step_s: float, outputs: list[RequestOutput]) -> float:
        """Step pacing (a governor's duty cycle): at the end of a slice of steps, let the GPU
        finish and return the idle time owed."""
        gate = self.engine.step_gate
        gate.add_busy(step_s)
        if not gate.slice_over():
            return 0.0
        t0 = time.monotonic()
        outputs.extend(self.engine.drain())
        gate.add_busy(time.monotonic() - t0)
        return gate.end_slice()

    def _apply(self, commands: list[Command]) -> tuple[int, list[Rejected]]:
        num_added, rejected = 0, []
        for cmd in commands:
            if isinstance(cmd, AbortRequest):
                self.engine.abort_request(cmd.request_id)
                continue
            if isinstance(cmd, SetSchedulerLimits):
                self.engine.set_scheduler_limits(cmd.limits)
                continue
            num_added += 1
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params,
                                        prompt_token_ids=cmd.prompt_token_ids,
                                        arrival_time_s=cmd.arrival_time_s,
                                        detokenize=cmd.detokenize)
            except ValueError as e:
                rejected.append(Rejected(cmd.request_id, str(e), invalid=True))
            except Exception as e:
                log.exception("add_request %s failed", cmd.request_id)
                rejected.append(Rejected(cmd.request_id, f"the engine could not take the request: {e}",
                                         invalid=False))
        return num_added, rejected

    def _fail_all(self, reason: str) -> list[RequestOutput]:
        """After a failed step the batch's state is unknown: end every request in the engine
        with finish_reason "error" and the reason, and free their blocks."""
        failed = self.engine.unfinished_request_ids()
        for request_id in failed:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort of %s after a failed step also failed", request_id)
        return [final_output(request_id, "error", reason) for request_id in failed]

    def _abort_all(self) -> None:
        for request_id in self.engine.unfinished_request_ids():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort of %s at engine exit failed", request_id)

    def _drain_step_stats(self) -> list[StepStats]:
        if not self.step_stats:
            return []
        stats = list(self.step_stats)
        self.step_stats.clear()
        return stats


def final_output(request_id: str, finish_reason: str, reason: str) -> RequestOutput:
    """The last output of a request the engine could not finish itself; says why."""
    completion = CompletionOutput(0, "", [], finish_reason=finish_reason, stop_reason=reason)
    error = reason if finish_reason == "error" else None
    return RequestOutput(request_id, None, [], [completion], True, error=error)
