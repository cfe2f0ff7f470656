"""Runbooks, the knowledge base in the telemetry SQLite file, and hybrid retrieval (the real
all-MiniLM-L6-v2 weights, real FTS5 and sqlite-vec)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from ondo.agent.actions import ACTIONS, GpuLimits
from ondo.agent.embedding import EMBED_DIM, shared_embedder
from ondo.agent.eval.retrieval_set import LABELLED, score_retrieval
from ondo.agent.knowledge import KnowledgeBase
from ondo.agent.process import AgentProcess
from ondo.agent.retrieval import fts_query, search
from ondo.agent.runbook import RunbookError, evaluate, load_runbooks, parse_runbook
from ondo.events.log import EventLog
from ondo.events.schema import EventDraft, EventKind
from ondo.events.table import EVENTS_TABLE
from ondo.events.verify import verify
from ondo.telemetry.schema import GpuSample
from ondo.telemetry.store import TelemetryStore

FAILURE_MODES = ("power-cap-sustained", "thermal-margin-low", "hbm-hot", "high-inlet",
                 "degraded-cooling", "preemption-storm", "swap-thrashing",
                 "kv-cache-undersized", "queue-backlog-slo", "sensor-stale-or-failed",
                 "noisy-neighbour", "energy-per-token-drift")


def test_packaged_runbooks_cover_the_failure_modes_with_valid_actions():
    books = {b.id: b for b in load_runbooks()}
    assert len(books) >= 12
    assert set(FAILURE_MODES) <= set(books)
    for b in books.values():
        assert [s.section for s in b.sections][:3] == ["symptoms", "diagnosis", "actions"]
        assert b.symptoms and b.event_kinds
        assert all(a.action in ACTIONS for a in b.actions)


GOOD = """---
id: demo
title: Demo
symptoms: [it is hot]
event_kinds: [thermal_margin_low]
actions:
  - action: set_power_budget
    params: {power_budget_w: "0.8 * power_limit_w"}
---
# Demo
## Symptoms
Hot.
## Actions
Cool it.
"""


@pytest.mark.parametrize("change, field", [
    (("action: set_power_budget", "action: reboot_the_rack"), "actions[0]"),
    (("[thermal_margin_low]", "[gpu_on_fire]"), "event_kinds"),
    (('"0.8 * power_limit_w"', '"lots"'), "params.power_budget_w"),
    (("{power_budget_w", "{policy"), "actions[0]"),
    (("---\nid: demo", "id: demo"), "front matter"),
    (("id: demo", "id: Demo Runbook"), "id"),
])
def test_a_bad_runbook_is_refused_naming_the_field(change, field):
    with pytest.raises(RunbookError, match="demo.md") as err:
        parse_runbook(GOOD.replace(*change), "demo.md")
    assert field in str(err.value)


def test_parameter_expressions_read_the_facts():
    facts = {"power_limit_w": 700.0, "die_limit_c": 87.0, "num_running": 40.0}
    assert evaluate("0.9 * power_limit_w", facts) == pytest.approx(630.0)
    assert evaluate("die_limit_c - 5", facts) == 82.0
    assert evaluate("num_running * 0.5", facts) == 20.0
    assert evaluate(12, facts) == 12
    assert evaluate("predictive", facts, numeric=False) == "predictive"
    with pytest.raises(KeyError):
        evaluate("0.5 * max_batched_tokens", facts)


def test_embeddings_are_unit_vectors_and_put_paraphrases_closer():
    v = shared_embedder().embed(["the GPU is power capped at 700 W",
                                 "power limit throttling the clocks",
                                 "the queue of waiting requests grows"])
    assert v.shape == (3, EMBED_DIM)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_fts_queries_quote_every_word_so_user_text_is_never_syntax():
    assert fts_query('power "cap" AND NEAR(x) -hot*') == \
        '"power" OR "cap" OR "near" OR "x" OR "hot"'
    assert fts_query("the and of") is None


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    kb = KnowledgeBase(tmp_path_factory.mktemp("kb") / "ondo.db")
    kb.sync_runbooks()
    yield kb
    kb.close()


def test_retrieval_recall_at_3_on_the_labelled_set(kb):
    assert len(LABELLED) >= 30
    scores = {s.mode: s for s in score_retrieval(kb)}
    assert set(scores) == {"fused", "bm25", "vector"}
    assert scores["fused"].recall_at_3 >= 0.9, scores["fused"].misses
    for s in scores.values():  # each ranking alone is real retrieval, not noise
        assert s.recall_at_3 >= 0.8, (s.mode, s.misses)


def test_search_reports_both_rankings_and_the_fused_score(kb):
    hits = search(kb, "HBM memory temperature near its maximum during decode", k=4)
    assert hits[0].meta["runbook"] == "hbm-hot"
    top = hits[0]
    assert top.bm25_rank is not None and top.vector_rank is not None
    expected = 1 / (60 + top.bm25_rank) + 1 / (60 + top.vector_rank)
    assert top.score == pytest.approx(expected)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    bm25_only = search(kb, "HBM memory temperature", k=3, mode="bm25")
    assert all(h.vector_rank is None for h in bm25_only)


def test_runbook_sync_is_idempotent_and_reindexes_a_changed_section(kb):
    books = load_runbooks()
    assert kb.sync_runbooks(books) == 0
    n = kb.count("runbook")
    first = books[0]
    changed = dataclasses.replace(first, sections=(
        dataclasses.replace(first.sections[0], text="Zebra stripes on the heat sink."),
        *first.sections[1:]))
    assert kb.sync_runbooks((changed, *books[1:])) == 1
    assert kb.count("runbook") == n
    assert search(kb, "zebra stripes", k=1, mode="bm25")[0].ref == \
        f"runbook:{first.id}#{first.sections[0].section}"
    assert kb.sync_runbooks(books) == 1  # and back


def _entry(seq, kind, payload, subject=None, t=10.0):
    return {"seq": seq, "kind": kind, "severity": "info", "t_monotonic_s": t + seq,
            "t_wall_s": 1000.0 + seq, "subject": subject or {}, "payload": payload,
            "evidence": []}


def test_decisions_and_their_reasons_become_searchable_knowledge(tmp_path):
    kb = KnowledgeBase(tmp_path / "ondo.db")
    try:
        rec = {"recommendation_id": "rec-7-abc", "action": "set_power_budget",
               "parameters": {"power_budget_w": 630}, "rationale": "sustained power cap"}
        entries = [
            _entry(7, "power_cap_sustained", {"held_s": 5.0, "since_s": 3.0}, {"gpu": 0}),
            _entry(8, "recommendation_issued", rec, {"recommendation_id": "rec-7-abc"}),
            _entry(9, "operator_decision", {"recommendation_id": "rec-7-abc",
                                            "decision": "reject", "operator": "kim",
                                            "comment": "batch jobs run tonight, keep full "
                                                       "power until 6 am"},
                   {"recommendation_id": "rec-7-abc"}),
        ]
        assert kb.index_entries(entries) == 3
        assert kb.index_entries(entries) == 0  # already indexed
        hits = search(kb, "why was the power budget rejected", kinds=("decision",), k=1)
        assert hits[0].ref == "event:9"
        assert "batch jobs" in hits[0].body and "set power budget" in hits[0].body
        assert hits[0].meta["action"] == "set_power_budget"
        assert search(kb, "power cap held", kinds=("event",), k=1)[0].ref == "event:7"
    finally:
        kb.close()


def test_the_knowledge_base_shares_the_file_with_the_telemetry_writer(tmp_path):
    """The store writes the file with Python's sqlite3 while the knowledge base indexes it
    with apsw from its own process, as in `ondo serve`: nothing is lost or refused, the
    chain verifies. (From one process the two copies of SQLite do not see each other's
    locks and entries are lost: process.py.)"""
    db = tmp_path / "ondo.db"
    store = TelemetryStore(db, tables=[EVENTS_TABLE])
    log = EventLog(sinks=[store.submit])
    proc = AgentProcess(str(db), None, GpuLimits())
    written = threading.Event()

    def write() -> None:  # the server's side: samples, and an entry every 100 of them
        for i in range(2000):
            store.submit(GpuSample(0, "sim", float(i), 1e9 + i, 0.05, None, temp_c=40.0))
            if i % 100 == 0:
                log.append(EventDraft(EventKind.QUEUE_BACKLOG, float(i), 1e9 + i,
                                      {"engine": 0}, {"num_waiting": 40, "num_running": 8,
                                                      "threshold": 32, "since_s": float(i)}))
            time.sleep(0.002)
        written.set()

    writer = threading.Thread(target=write)
    try:
        proc.index([])  # starts the process: the embedding model, the runbooks written
        writer.start()
        calls = 0
        while not written.is_set():  # the knowledge base's side, meanwhile
            proc.index([])
            calls += 1
        writer.join()
        assert store.flush(30.0)
        proc.index([])
    finally:
        proc.close()
        store.close()
    assert calls >= 3
    assert store.dropped == 0 and store.rejected == 0 and store.stored == 2020
    report = verify(db)
    assert report.ok and report.entries == 20
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM kb_docs WHERE kind = 'event'").fetchone()[0] \
            == 20
        assert conn.execute("SELECT COUNT(*) FROM kb_docs WHERE kind = 'runbook'"
                            ).fetchone()[0] >= 48
        state = dict(conn.execute("SELECT key, value FROM kb_state"))
        assert json.loads(state["last_event_seq"]) == 20
    finally:
        conn.close()
