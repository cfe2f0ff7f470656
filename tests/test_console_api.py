"""The console's JSON endpoints on a real loopback server over the simulated GPU, the event log
and the governor: who may do what, approvals that change the running governor and are
recorded with their outcome, rejections with a reason, revisions, the four-eyes rule, the
live stream resuming from Last-Event-ID, and the database and memory series agreeing."""

from __future__ import annotations

import json

import httpx
import pytest

from ondo.console.app import build_offline_app
from ondo.console.history import chart_from_db, chart_from_points, open_db
from ondo.console.service import ConsoleService
from ondo.events.verify import verify
from tests.console_harness import console_server
from tests.server_harness import ServerThread, wait_for


def _message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def test_without_tokens_reads_are_open_and_changes_refused(tmp_path) -> None:
    with console_server(tmp_path) as c:
        rid = "rec-1-aaaa"
        c.recommend(rid, "set_governor_policy", {"policy": "reactive"})
        assert c.get("/api/whoami").json() == {"name": "anonymous", "role": "viewer",
                                               "live": True, "tokens_configured": False}
        r = c.post(f"/api/recommendations/{rid}/approve", {})
        assert r.status_code == 401
        assert "ondo console token create" in _message(r)
        assert c.governor.governor.policy_name == "off"
        assert c.get("/api/recommendations").json()["counts"]["pending"] == 1


def test_roles_header_only_changes_and_an_approval_that_changes_the_governor(tmp_path) -> None:
    with console_server(tmp_path, outcome_after_s=2.0) as c:
        viewer, alice = c.token("viewer", "val"), c.token("operator", "alice")
        rid = "rec-7-tpot"
        c.recommend(rid, "set_token_budget", {"max_num_batched_tokens": 256})
        assert c.get("/api/recommendations").status_code == 401  # tokens exist now
        assert c.get("/api/recommendations", cookies={"ondo_console_token": viewer}
                     ).status_code == 200
        assert c.get("/api/whoami", token="ondo_not-a-token").status_code == 401
        # A cookie alone never changes anything (no CSRF), whatever its role.
        r = c.post(f"/api/recommendations/{rid}/approve", {},
                   cookies={"ondo_console_token": alice})
        assert r.status_code == 401 and "Authorization header" in _message(r)
        r = c.post(f"/api/recommendations/{rid}/approve", {}, token=viewer)
        assert r.status_code == 403
        assert _message(r) == ("the viewer role cannot approve: an operator or admin token is "
                               "needed")
        assert c.governor.governor.caps.max_num_batched_tokens is None

        r = c.post(f"/api/recommendations/{rid}/approve", {"comment": "halve the chunk"},
                   token=alice)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["applied"] and out["action_id"] == f"act-{out['decision_seq']}"
        assert out["governor"]["caps"]["max_num_batched_tokens"] == 256
        assert c.governor.governor.limits.max_num_batched_tokens == 256
        assert wait_for(lambda: any(lim.max_num_batched_tokens == 256 for lim in c.engine.sent),
                        5.0)
        # The same proposal cannot be decided twice.
        again = c.post(f"/api/recommendations/{rid}/approve", {}, token=alice)
        assert again.status_code == 409 and "already applied by alice" in _message(again)

        decision = c.entries("operator_decision")[-1]
        assert decision["payload"] == {"recommendation_id": rid, "decision": "approve",
                                       "operator": "alice", "comment": "halve the chunk"}
        applied = c.entries("action_applied")[-1]
        assert applied["payload"]["parameters"] == {"max_num_batched_tokens": 256}
        assert f"event:{decision['seq']}" in applied["evidence"]
        # After outcome_after_s the observed effect is recorded.
        assert wait_for(lambda: c.entries("action_outcome"), 10.0)
        outcome = c.entries("action_outcome")[-1]["payload"]
        assert outcome["recommendation_id"] == rid and outcome["action"] == "set_token_budget"
        assert outcome["outcome"] == "no requests to compare"  # no engine, no requests
        assert outcome["metrics"]["after"]["gpu_seconds"] >= 1
        assert outcome["metrics"]["window_s"] == 2.0
        detail = c.get(f"/api/recommendations/{rid}", token=viewer).json()
        assert detail["proposal"]["status"] == "applied"
        assert detail["proposal"]["outcome"]["outcome"] == "no requests to compare"
        assert detail["runbook"]["id"] == "tpot-slo-breach"
        audit = c.get("/api/audit", token=viewer).json()
        assert audit["decisions"][0]["operator"] == "alice"
        assert audit["decisions"][0]["decision"] == "approve"
    assert verify(c.db).ok


def test_reject_needs_a_reason_and_the_audit_keeps_it(tmp_path) -> None:
    with console_server(tmp_path) as c:
        bob = c.token("operator", "bob")
        rid = "rec-3-page"
        c.recommend(rid, "set_governor_policy", {"policy": "predictive"})
        r = c.post(f"/api/recommendations/{rid}/reject", {"reason": "   "}, token=bob)
        assert r.status_code == 400 and c.entries("operator_decision") == []
        r = c.post(f"/api/recommendations/{rid}/reject", {}, token=bob)
        assert r.status_code == 400
        r = c.post(f"/api/recommendations/{rid}/reject",
                   {"reason": "load is light; predictive would only cost tokens"}, token=bob)
        assert r.status_code == 200 and r.json()["applied"] is False
        assert c.governor.governor.policy_name == "off"
        audit = c.get("/api/audit", token=bob).json()
        row = audit["decisions"][0]
        assert (row["decision"], row["operator"], row["status"]) == ("reject", "bob", "rejected")
        assert row["comment"] == "load is light; predictive would only cost tokens"
        assert audit["chain"]["ok"] is True


def test_nobody_approves_their_own_proposal_and_revisions_link_back(tmp_path) -> None:
    with console_server(tmp_path) as c:
        alice, bob = c.token("operator", "alice"), c.token("admin", "bob")
        r = c.post("/api/proposals", {"action": "set_governor_policy",
                                      "params": {"policy": "reactive"},
                                      "rationale": "hot afternoon"}, token=alice)
        assert r.status_code == 200, r.text
        mine = r.json()["recommendation_id"]
        r = c.post(f"/api/recommendations/{mine}/approve", {}, token=alice)
        assert r.status_code == 403 and "another operator must approve" in _message(r)
        r = c.post(f"/api/recommendations/{mine}/approve", {}, token=bob)
        assert r.status_code == 200 and c.governor.governor.policy_name == "reactive"

        rid = "rec-9-cap"
        c.recommend(rid, "cap_running_sequences", {"max_num_seqs": 48})
        r = c.post(f"/api/recommendations/{rid}/revise", {"params": {"max_num_seqs": 0}},
                   token=bob)
        assert r.status_code == 400 and "max_num_seqs" in _message(r)
        r = c.post(f"/api/recommendations/{rid}/revise",
                   {"params": {"max_num_seqs": 24}, "comment": "tighter"}, token=bob)
        assert r.status_code == 200
        rev = r.json()["recommendation_id"]
        assert rev == f"{rid}-r2" and r.json()["revision_of"] == rid
        orig = c.get(f"/api/recommendations/{rid}", token=bob).json()
        assert orig["proposal"]["status"] == "revised" and orig["revisions"] == [rid, rev]
        assert c.post(f"/api/recommendations/{rid}/approve", {}, token=alice).status_code == 409
        assert c.post(f"/api/recommendations/{rev}/approve", {}, token=bob).status_code == 403
        r = c.post(f"/api/recommendations/{rev}/approve", {}, token=alice)
        assert r.status_code == 200
        assert c.governor.governor.caps.max_num_seqs == 24
        assert c.governor.governor.limits.max_num_seqs == 24  # under the reactive policy too


def test_an_action_the_gpu_cannot_take_is_refused_before_anything_is_recorded(tmp_path) -> None:
    with console_server(tmp_path) as c:
        alice = c.token("operator", "alice")
        c.recommend("rec-2-cold", "set_temperature_target", {"temp_target_c": 36})
        r = c.post("/api/recommendations/rec-2-cold/approve", {}, token=alice)
        assert r.status_code == 409 and "temp_target_c" in _message(r)
        assert c.entries("operator_decision") == []
        assert c.governor.governor.objectives.temp_target_c == 82.0
        assert c.post("/api/recommendations/nope/approve", {}, token=alice).status_code == 404


def _read_entries(resp: httpx.Response, n: int) -> list[tuple[int, dict]]:
    got: list[tuple[int, dict]] = []
    ident = None
    for line in resp.iter_lines():
        if line.startswith("id: "):
            ident = int(line[4:])
        elif line.startswith("data: ") and ident is not None:
            got.append((ident, json.loads(line[6:])))
            ident = None
            if len(got) == n:
                break
    return got


def test_the_stream_resumes_from_last_event_id_without_loss_or_repeat(tmp_path) -> None:
    with console_server(tmp_path) as c:
        h0 = c.service.entries.head_seq()
        for i in range(3):
            c.recommend(f"rec-{i}-s", "no_action", {})
        with httpx.stream("GET", c.url(f"/api/stream?after={h0}&points=false"),
                          timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            first = _read_entries(r, 3)
        assert [s for s, _ in first] == [h0 + 1, h0 + 2, h0 + 3]
        last = first[-1][0]
        for i in range(3, 6):  # appended while no one listens
            c.recommend(f"rec-{i}-s", "no_action", {})
        head = c.service.entries.head_seq()
        # The URL still says after=h0: the header wins, as when a browser reconnects.
        with httpx.stream("GET", c.url(f"/api/stream?after={h0}&points=false"), timeout=30,
                          headers={"Last-Event-ID": str(last)}) as r:
            second = _read_entries(r, head - last)
        assert [s for s, _ in second] == list(range(last + 1, head + 1))
        for seq, e in second:
            assert e["hash"] == c.service.entries.get(seq)["hash"]
        seen = [e["payload"].get("recommendation_id") for _, e in first + second]
        assert [x for x in seen if x] == [f"rec-{i}-s" for i in range(6)]


@pytest.mark.slow
def test_series_from_the_database_agree_with_those_in_memory(tmp_path) -> None:
    with console_server(tmp_path) as c:
        assert wait_for(lambda: len(c.service.series.points()) >= 8, 30.0, 0.2)
        ov = c.get("/api/overview?range_s=60").json()
        assert ov["live"] and ov["bucket_s"] == 1
        assert sum(t is not None for t in ov["series"]["temp_c"]) >= 5
        c.events.store.flush()
    pts = c.service.series.points()
    # The seconds closed while the server ran (those closed at shutdown are partial).
    t0, t1 = pts[1].t_wall_s, pts[-4].t_wall_s
    _, mem = chart_from_points(pts, t0, t1)
    conn = open_db(c.db)
    try:
        _, db = chart_from_db(conn, t0, t1)
    finally:
        conn.close()
    assert db["t"] == mem["t"]
    for col in ("temp_c", "power_w", "twin_die_c", "tok_s"):
        for a, b in zip(db[col], mem[col]):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-6), col


def test_a_stored_database_is_reviewed_read_only(tmp_path) -> None:
    with console_server(tmp_path) as c:
        alice = c.token("operator", "alice")
        c.recommend("rec-4-r", "set_governor_policy", {"policy": "reactive"})
        c.events.store.flush()
    service = ConsoleService(db=c.db)
    with ServerThread(build_offline_app(service)) as server:
        base = f"{server.base_url}/console"
        h = {"Authorization": f"Bearer {alice}"}
        props = httpx.get(f"{base}/api/recommendations", headers=h, timeout=30).json()
        assert [p["recommendation_id"] for p in props["proposals"]] == ["rec-4-r"]
        r = httpx.post(f"{base}/api/recommendations/rec-4-r/approve", json={}, headers=h,
                       timeout=30)
        assert r.status_code == 409 and "reviews a stored database" in r.json()["error"]["message"]
        page = httpx.get(f"{base}/recommendations/rec-4-r", cookies={
            "ondo_console_token": alice}, timeout=30)
        assert page.status_code == 200 and "read-only" in page.text
        assert httpx.get(f"{base}/api/audit", headers=h, timeout=30).json()["chain"]["ok"]
