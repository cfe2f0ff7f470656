"""Schemathesis fuzzes the console's mutating endpoints, generated from its own OpenAPI schema,
on a real loopback server: without a token, with a viewer's, with a revoked operator's, and
with an operator's. No answer is a 5xx; without a valid operator token nothing changes: the
console's entries in the event log, the governor's policy, objectives and caps, and the tokens stay as they
were."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.console_harness import console_server

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = 50


CONSOLE_KINDS = ("recommendation_issued", "operator_decision", "action_applied",
                 "action_outcome")


def _state(c) -> tuple:
    """What the console can change (the detectors append entries of their own meanwhile)."""
    g = c.governor.governor
    made = [e["seq"] for e in c.service.entries.of_kinds(CONSOLE_KINDS)]
    return (made, g.policy_name, g.objectives, g.caps,
            [(t.token_id, t.revoked_wall_s) for t in c.tokens.list()])


def _fuzz(c, headers: dict[str, str]) -> dict[int, int]:
    spec = httpx.get(f"{c.base}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec).include(method="POST",
                                                          path_regex="^/console/api/")
    statuses: dict[int, int] = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 6  # approve, reject, revise, propose, tokens, revoke

    for op in operations:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case) -> None:
            r = case.call(base_url=c.base, headers=headers, timeout=30)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (case.method, case.formatted_path, r.text)

        run()
    return statuses


@pytest.mark.slow
def test_mutating_endpoints_fuzzed_with_and_without_tokens(tmp_path) -> None:
    with console_server(tmp_path) as c:
        viewer = c.token("viewer", "val")
        revoked = c.token("operator", "gone")
        c.tokens.revoke(c.tokens.list()[-1].token_id)
        for i in range(3):
            c.recommend(f"rec-{i}-fz", "set_governor_policy", {"policy": "reactive"})
        before = _state(c)
        for headers in ({}, {"Authorization": f"Bearer {viewer}"},
                        {"Authorization": f"Bearer {revoked}"},
                        {"Authorization": "Bearer ondo_forged"}):
            statuses = _fuzz(c, headers)
            assert set(statuses) <= {400, 401, 403, 404, 405, 409, 422}, statuses
            assert _state(c) == before, headers
        operator = c.token("operator", "olga")
        statuses = _fuzz(c, {"Authorization": f"Bearer {operator}"})
        assert all(s < 500 for s in statuses)
