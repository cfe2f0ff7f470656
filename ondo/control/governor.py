"""The governor: a policy (off, reactive, predictive; switchable at run time), the objectives,
and the scheduler limits in force. `tick(inputs)` runs the policy and returns a
`GovernorDecision` whenever the limits change; a policy that raises is replaced by `off`
(logged once, recorded as a decision) and serving goes on unlimited. An operator's caps
(`set_caps`: a token budget, seats) hold under every policy, off included: the limits in
force are the policy's, tightened by the caps.

Deciding only: where the inputs come from and where the limits go is the caller's
(`service.py` on a server, the closed-loop simulator in virtual time).
"""

from __future__ import annotations

import logging
import threading
import time

from ondo.control.decision import GovernorDecision
from ondo.control.flags import POLICIES
from ondo.control.inputs import GovernorInputs
from ondo.control.objectives import Objectives
from ondo.control.policy import EngineConfig, OffPolicy, Policy, Verdict
from ondo.control.predictive import PredictivePolicy, PredictiveTuning
from ondo.control.reactive import ReactivePolicy, ReactiveTuning
from ondo.engine.scheduler_limits import UNLIMITED, SchedulerLimits
from ondo.twin.params import TwinParams

log = logging.getLogger(__name__)

__all__ = ["POLICIES", "Governor"]


class Governor:
    def __init__(self, params: TwinParams, objectives: Objectives, config: EngineConfig,
                 policy: str = "off", gpu_index: int = 0,
                 reactive: ReactiveTuning | None = None,
                 predictive: PredictiveTuning | None = None) -> None:
        self.params = params
        self.objectives = objectives
        self.config = config
        self.gpu_index = gpu_index
        self._tunings = (reactive, predictive)
        self.limits: SchedulerLimits = UNLIMITED  # in force: the policy's, tightened by caps
        self.caps: SchedulerLimits = UNLIMITED
        self._policy_limits: SchedulerLimits = UNLIMITED
        self.reason = "started"
        self.binding_gpu = gpu_index  # the GPU the latest tick's inputs were of (binding.py)
        self.binding = ""  # and the constraint that made it bind
        self.decisions = 0
        self.failures = 0
        self._failed_logged: set[str] = set()
        self._lock = threading.Lock()
        self.policy: Policy = self._make(policy)

    def _make(self, name: str) -> Policy:
        if name == "off":
            return OffPolicy()
        if name == "reactive":
            return ReactivePolicy(self.config, self._tunings[0])
        if name == "predictive":
            return PredictivePolicy(self.params, self.config, self._tunings[1])
        raise ValueError(f"unknown governor policy {name!r}; choose one of {', '.join(POLICIES)}")

    @property
    def policy_name(self) -> str:
        return self.policy.name

    @property
    def period_s(self) -> float:
        return self.policy.period_s

    def set_policy(self, name: str, now_s: float | None = None) -> GovernorDecision:
        """Switch policy (a fresh one: no state carries over); the limits go back to none
        until its first tick."""
        with self._lock:
            self.policy = self._make(name)
            return self._record(Verdict(UNLIMITED, f"policy set to {name}"), now_s, None)

    def set_objectives(self, objectives: Objectives,
                       now_s: float | None = None) -> GovernorDecision:
        """New objectives (checked by the caller, see `objectives.resolve_objectives`)."""
        with self._lock:
            self.objectives = objectives
            return self._record(Verdict(self._policy_limits, "objectives changed"), now_s,
                                None)

    def set_caps(self, caps: SchedulerLimits, now_s: float | None = None) -> GovernorDecision:
        """An operator's caps (token budget, seats, ...), replacing the previous ones; the
        policy's limits are tightened by them from now on."""
        with self._lock:
            self.caps = caps
            told = {k: v for k, v in caps.as_dict().items()
                    if v is not None and not (k == "duty_cycle" and v == 1.0)}
            why = f"operator caps {told}" if told else "operator caps lifted"
            return self._record(Verdict(self._policy_limits, why), now_s, None)

    def tick(self, inputs: GovernorInputs) -> GovernorDecision | None:
        """Run the policy; a decision if the limits changed, else None."""
        with self._lock:
            try:
                verdict = self.policy.decide(inputs, self.objectives, self.config)
            except Exception as e:  # a governor bug must not stop serving
                return self._fall_back(e, inputs)
            self.reason = verdict.reason
            self.binding_gpu, self.binding = inputs.gpu_index, inputs.binding
            if tightened(verdict.limits, self.caps) == self.limits:
                return None
            return self._record(verdict, inputs.t_monotonic_s, inputs, inputs.t_wall_s)

    def _fall_back(self, error: Exception, inputs: GovernorInputs) -> GovernorDecision:
        name = self.policy.name
        self.failures += 1
        if name not in self._failed_logged:
            self._failed_logged.add(name)
            log.exception("governor policy %s failed; falling back to off (logged once)", name)
        self.policy = OffPolicy()
        why = f"policy {name} raised {type(error).__name__}: {error}; fell back to off"
        return self._record(Verdict(UNLIMITED, why), inputs.t_monotonic_s, inputs,
                            inputs.t_wall_s)

    def _record(self, verdict: Verdict, now_s: float | None, inputs: GovernorInputs | None,
                t_wall_s: float | None = None) -> GovernorDecision:
        self._policy_limits = verdict.limits
        self.limits = tightened(verdict.limits, self.caps)
        self.reason = verdict.reason
        self.decisions += 1
        return GovernorDecision(
            t_monotonic_s=time.monotonic() if now_s is None else now_s,
            t_wall_s=time.time() if t_wall_s is None else t_wall_s,
            policy=self.policy.name, reason=verdict.reason, limits=self.limits.as_dict(),
            inputs={} if inputs is None else inputs.as_dict(), forecast=dict(verdict.forecast),
            objectives=self.objectives.as_dict(),
            gpu_index=self.binding_gpu if inputs is None else inputs.gpu_index,
        )


def tightened(limits: SchedulerLimits, caps: SchedulerLimits) -> SchedulerLimits:
    """Each limit at the tighter of the two (None: no limit)."""
    def low(a, b):
        return b if a is None else a if b is None else min(a, b)

    return SchedulerLimits(
        max_num_batched_tokens=low(limits.max_num_batched_tokens, caps.max_num_batched_tokens),
        max_num_seqs=low(limits.max_num_seqs, caps.max_num_seqs),
        max_prefill_tokens=low(limits.max_prefill_tokens, caps.max_prefill_tokens),
        prefill_tokens_per_s=low(limits.prefill_tokens_per_s, caps.prefill_tokens_per_s),
        duty_cycle=min(limits.duty_cycle, caps.duty_cycle))
