"""The console's deciding parts without a server: proposals folded from log entries, the rules
of deciding, the outcome's judgement, the what-if's load levels, the governor's operator caps,
and decisions with their reasons and outcomes retrieved by the agent."""

from __future__ import annotations

import pytest

from ondo.console.auth import Principal, Role
from ondo.console.outcome import judge, measure_outcome
from ondo.console.proposals import DecisionRefused, check_decision, fold_proposals, revision_id
from ondo.console.series import ConsolePoint
from ondo.console.whatif import LoadContext, level_meeting, what_if
from ondo.control.governor import Governor, tightened
from ondo.control.objectives import GpuFacts, resolve_objectives
from ondo.control.policy import EngineConfig
from ondo.engine.scheduler_limits import SchedulerLimits
from ondo.twin.params import h100_params
from ondo.twin.plant import Load, steady_state

ALICE = Principal("alice", Role.OPERATOR)
BOB = Principal("bob", Role.ADMIN)
VAL = Principal("val", Role.VIEWER)


def _e(seq: int, kind: str, payload: dict, evidence=(), subject=None) -> dict:
    return {"seq": seq, "t_wall_s": 1000.0 + seq, "kind": kind, "payload": payload,
            "evidence": list(evidence), "subject": subject or {}}


def _rec(seq: int, rid: str, **extra) -> dict:
    return _e(seq, "recommendation_issued", {"recommendation_id": rid, "action":
                                             "set_governor_policy",
                                             "parameters": {"policy": "reactive"},
                                             "rationale": "hot", **extra}, ["event:1"],
              {"recommendation_id": rid, "incident": 1})


def test_a_proposal_folds_through_approval_application_and_outcome() -> None:
    log = [_rec(2, "rec-1-a"),
           _e(3, "operator_decision", {"recommendation_id": "rec-1-a", "decision": "approve",
                                       "operator": "alice"}),
           _e(4, "action_applied", {"action_id": "act-3", "action": "set_governor_policy",
                                    "parameters": {"policy": "reactive"},
                                    "recommendation_id": "rec-1-a"}),
           _e(5, "action_outcome", {"action_id": "act-3", "outcome": "throttling stopped",
                                    "metrics": {}})]
    p = fold_proposals(log)["rec-1-a"]
    assert (p.status, p.incident, p.evidence) == ("applied", 1, [1])
    assert p.decision.operator == "alice" and p.applied["action_id"] == "act-3"
    assert p.outcome["outcome"] == "throttling stopped"  # found by its action id
    with pytest.raises(DecisionRefused) as e:
        check_decision(p, BOB, "approve")
    assert e.value.status == 409 and "already applied by alice" in e.value.message


def test_deciding_rules_roles_own_proposals_revisions() -> None:
    props = fold_proposals([_rec(2, "rec-1-a"), _rec(3, "man-x", proposed_by="alice",
                                                     source="manual")])
    with pytest.raises(DecisionRefused) as e:
        check_decision(props["rec-1-a"], VAL, "approve")
    assert e.value.status == 403 and "viewer role cannot approve" in e.value.message
    with pytest.raises(DecisionRefused) as e:
        check_decision(props["man-x"], ALICE, "approve")
    assert e.value.status == 403
    assert check_decision(props["man-x"], BOB, "approve").recommendation_id == "man-x"
    assert check_decision(props["man-x"], ALICE, "reject").recommendation_id == "man-x"
    with pytest.raises(DecisionRefused) as e:
        check_decision(None, ALICE, "approve", "nope")
    assert e.value.status == 404
    assert revision_id(props, props["rec-1-a"]) == "rec-1-a-r2"
    log = [_rec(2, "rec-1-a"), _rec(3, "rec-1-a-r2", revision_of="rec-1-a", proposed_by="bob")]
    props = fold_proposals(log)
    assert props["rec-1-a"].status == "revised" and props["rec-1-a"].revised_by == "rec-1-a-r2"
    assert revision_id(props, props["rec-1-a-r2"]) == "rec-1-a-r3"
    with pytest.raises(DecisionRefused) as e:
        check_decision(props["rec-1-a"], ALICE, "approve")
    assert e.value.status == 409 and "revision rec-1-a-r2" in e.value.message


def _pt(t: int, power_w: float, temp_c: float, bits: int = 0, tpot_s: float | None = None):
    return ConsolePoint(t, gpu_samples=20, temp_c=temp_c, temp_max_c=temp_c,
                        power_w=power_w, power_max_w=power_w, throttle_reasons=bits,
                        tpot_n=0 if tpot_s is None else 2,
                        tpot_sum_s=0.0 if tpot_s is None else 2 * tpot_s)


def test_the_outcome_compares_the_window_before_with_the_window_after() -> None:
    pts = [_pt(t, 650.0, 80.0, 4, 0.05) for t in range(100, 110)] + \
          [_pt(t, 590.0, 74.0, 0, 0.03) for t in range(110, 120)]
    outcome, m = measure_outcome("set_power_budget", {"power_budget_w": 600}, pts, 110.0, 9.0)
    assert outcome == "power under the budget"
    assert m["before"]["power_max_w"] == 650.0 and m["after"]["power_max_w"] == 590.0
    assert m["before"]["throttle_fraction"] == 1.0 and m["after"]["throttle_fraction"] == 0.0
    assert measure_outcome("set_power_budget", {"power_budget_w": 560}, pts, 110.0, 9.0)[0] \
        == "power over the budget"
    assert measure_outcome("set_governor_policy", {"policy": "predictive"}, pts, 110.0,
                           9.0)[0] == "throttling stopped"
    assert measure_outcome("set_token_budget", {"max_num_batched_tokens": 512}, pts, 110.0,
                           9.0)[0] == "tpot lower"
    assert measure_outcome("set_temperature_target", {"temp_target_c": 70}, pts, 110.0,
                           9.0)[0] == "die over the target"
    empty = {"gpu_seconds": 0, "tpot_mean_s": None}
    assert judge("set_power_budget", {"power_budget_w": 600}, empty, empty) == "no telemetry"


def test_the_what_if_holds_a_budget_the_load_exceeds() -> None:
    p = h100_params()
    busy = steady_state(p, Load(0.8, 0.8), 25.0)
    assert float(busy.power_avg_w) > 500
    u = level_meeting(p, 0.8, 0.8, 25.0, power_w=400.0)
    assert 0.1 < u < 1.0
    assert float(steady_state(p, Load(0.8 * u, 0.8 * u), 25.0).power_avg_w) <= 400.0
    state = {"die_c": float(busy.die_c), "hbm_c": float(busy.hbm_c),
             "sink_c": float(busy.sink_c), "board_c": float(busy.board_c),
             "die_sensor_c": float(busy.die_sensor_c), "hbm_sensor_c": float(busy.hbm_sensor_c),
             "ambient_c": 25.0, "power_w": float(busy.power_avg_w),
             "power_instant_w": float(busy.power_avg_w), "sm_mhz": float(busy.sm_mhz),
             "compute_activity": 0.8, "memory_activity": 0.8, "throttle_reasons": 0.0}
    out = what_if("set_power_budget", {"power_budget_w": 400}, p, state, LoadContext(),
                  horizon_s=30.0)
    assert out["level_compute"] == u and len(out["t_s"]) == 30
    assert out["with"]["power_w"][-1] < 420.0 < out["without"]["power_w"][-1]
    assert out["with"]["die_c"][-1] < out["without"]["die_c"][-1]
    same = what_if("page_human", {"reason": "look"}, p, state, LoadContext(), horizon_s=5.0)
    assert same["with"]["die_c"] == same["without"]["die_c"]
    cap = what_if("cap_running_sequences", {"max_num_seqs": 16}, p, state,
                  LoadContext(num_running=64), horizon_s=5.0)
    assert cap["level_compute"] == 0.25


def test_operator_caps_hold_under_every_policy() -> None:
    p = h100_params()
    g = Governor(p, resolve_objectives(GpuFacts.from_params(p)), EngineConfig(64, 2048),
                 "reactive")
    d = g.set_caps(SchedulerLimits(max_num_batched_tokens=256))
    assert d.limits["max_num_batched_tokens"] == 256 and "operator caps" in d.reason
    g.set_policy("off")
    assert g.limits.max_num_batched_tokens == 256  # the new policy's limits, tightened
    g.set_caps(SchedulerLimits())
    assert g.limits == SchedulerLimits()
    both = tightened(SchedulerLimits(max_num_seqs=32, duty_cycle=0.5),
                     SchedulerLimits(max_num_seqs=48, max_num_batched_tokens=128))
    assert both == SchedulerLimits(max_num_batched_tokens=128, max_num_seqs=32, duty_cycle=0.5)


@pytest.mark.slow
def test_decisions_and_outcomes_are_retrieved_by_the_agent(tmp_path) -> None:
    from ondo.agent.knowledge import KnowledgeBase, event_doc
    from ondo.agent.retrieval import search

    rec = {"action": "set_power_budget", "parameters": {"power_budget_w": 600},
           "rationale": "power over the rack budget"}
    recs = {"rec-4-p": rec}
    reject = _e(9, "operator_decision", {"recommendation_id": "rec-4-p", "decision": "reject",
                                         "operator": "bob",
                                         "comment": "the rack feed was upgraded last week"})
    outcome = _e(12, "action_outcome", {"action_id": "act-10", "outcome":
                                        "power under the budget", "metrics": {"window_s": 60},
                                        "recommendation_id": "rec-4-p",
                                        "action": "set_power_budget"})
    kb = KnowledgeBase(tmp_path / "kb.db")
    try:
        kb.add([event_doc(reject, recs), event_doc(outcome, recs)])
        hits = search(kb, "power over the budget of the rack", kinds=("decision",), k=5)
        bodies = {h.ref: h.body for h in hits}
        assert "rack feed was upgraded" in bodies["event:9"]
        assert "power under the budget" in bodies["event:12"]
        assert "set power budget" in bodies["event:12"]
    finally:
        kb.close()
