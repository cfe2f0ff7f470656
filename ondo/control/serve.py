"""The governor in `ondo serve`: its flags, their checks, and its wiring to the server.

With GPU telemetry (`--telemetry auto|nvml|sim` and a GPU source) the server runs the live
twin and the governor, whatever the policy (`--governor`, default off), so that the policy
can be switched at run time (`app.state.governor.set_policy(...)`). With `--telemetry off`
neither runs, and asking for a policy other than off is refused at start-up; so is one on a
machine where `--telemetry auto` found no GPU to read (use `--telemetry sim` to run against
the simulated GPU). Objectives the GPU cannot meet are refused at start-up too, naming the
flag, with exit code 2 like every other flag error.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from ondo.control.governor import Governor
from ondo.control.objectives import GpuFacts, ObjectiveError, Objectives, resolve_objectives
from ondo.control.policy import EngineConfig
from ondo.twin.params import TwinParams, h100_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GovernorSetup:
    policy: str
    params: TwinParams
    objectives: Objectives
    twin_params_given: bool = False  # --twin-params: the live twin starts from them too
    twin_adapt: bool = True
    telemetry_db: str | None = None


def governor_setup(args: argparse.Namespace) -> GovernorSetup:
    """The governor's settings from the flags; ValueError naming the flag otherwise."""
    if args.governor != "off" and args.telemetry == "off":
        raise ValueError(f"--governor {args.governor} needs GPU telemetry: use --telemetry "
                         "auto, nvml or sim (--telemetry off runs no governor)")
    try:
        params = TwinParams.load(args.twin_params) if args.twin_params else h100_params()
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"--twin-params {args.twin_params}: {e}") from None
    try:
        objectives = resolve_objectives(
            GpuFacts.from_params(params), power_budget_w=args.power_budget_w,
            temp_target_c=args.temp_target_c, temp_margin_c=args.temp_margin_c,
            hbm_temp_target_c=args.hbm_temp_target_c, tpot_slo_ms=args.tpot_slo_ms)
    except ObjectiveError as e:
        raise ValueError(str(e)) from None
    if (objectives.power_budget_w is not None
            and objectives.power_budget_w >= params.power_limit_w):
        log.warning("--power-budget-w %g is not under the GPU's own power limit (%g W): the "
                    "GPU's power-cap controller acts first", objectives.power_budget_w,
                    params.power_limit_w)
    return GovernorSetup(args.governor, params, objectives, bool(args.twin_params),
                         getattr(args, "twin_adapt", "on") == "on",
                         getattr(args, "telemetry_db", None))


def engine_gpu_indices(source: object, indices: list[int]) -> list[int]:
    """The GPUs the engine steps on, of those the telemetry reads: the first visible one (an
    engine runs on one GPU), or all of a simulated fleet (whose GPUs all follow the engine's
    load). Telemetry and twins cover every GPU read; the governor is bound only by these, so
    another job heating a neighbouring GPU never throttles this engine."""
    from ondo.telemetry.sim_fleet import SimulatedGpuFleet

    return list(indices) if isinstance(source, SimulatedGpuFleet) else list(indices[:1])


class ServerGovernor:
    """The live twins (one per GPU the telemetry reads) and the governor service of one
    server; the governor acts on the binding GPU's inputs."""

    def __init__(self, setup: GovernorSetup, telemetry, async_llm, registry=None,
                 apply_limits=None) -> None:
        """`apply_limits`: where the limits go (default: the engine's
        `set_scheduler_limits`; a benchmark wraps it to record them)."""
        from ondo.control.metrics import register_governor_metrics
        from ondo.control.service import GovernorService
        from ondo.telemetry.gpu_selection import source_gpu_indices
        from ondo.twin.live_adapt import gpu_identities, start_live_twins
        from ondo.twin.metrics import register_twin_metrics

        stats = async_llm.stats()
        config = EngineConfig(int(stats["max_num_seqs"]), int(stats["max_num_batched_tokens"]))
        indices = source_gpu_indices(telemetry.gpu)
        governed = engine_gpu_indices(telemetry.gpu, indices)
        self.governor = Governor(setup.params, setup.objectives, config, setup.policy,
                                 gpu_index=governed[0])
        self.twins = start_live_twins(telemetry.hub, gpu_identities(telemetry.gpu, indices),
                                      setup.params if setup.twin_params_given else None,
                                      setup.twin_adapt, setup.telemetry_db)
        self.twin = self.twins[0]  # the first GPU's (the console shows one)
        self.service = GovernorService(telemetry.hub, self.governor,
                                       apply_limits or async_llm.set_scheduler_limits,
                                       gpu_indices=governed).start()
        if registry is not None:
            register_governor_metrics(registry, self.governor, governed)
            register_twin_metrics(registry, self.twins)
        log.info("governor %s, objectives %s", self.governor.policy_name,
                 {k: v for k, v in setup.objectives.as_dict().items() if v is not None})

    def set_policy(self, name: str):
        return self.service.set_policy(name)

    def set_objectives(self, objectives: Objectives):
        return self.service.set_objectives(objectives)

    def set_caps(self, caps):
        return self.service.set_caps(caps)

    def close(self) -> None:
        self.service.stop()
        for twin in self.twins:
            twin.stop()


def start_server_governor(setup: GovernorSetup, telemetry, async_llm,
                          registry=None) -> ServerGovernor | None:
    """None where there is no GPU source to govern by (ValueError if a policy was asked for)."""
    if telemetry is None or telemetry.gpu is None:
        if setup.policy != "off":
            raise ValueError(f"--governor {setup.policy} needs a GPU to read, and telemetry "
                             "found none (NVML unavailable); --telemetry sim runs the "
                             "simulated GPU")
        return None
    return ServerGovernor(setup, telemetry, async_llm, registry)
