"""Hybrid retrieval: BM25 (SQLite FTS5) and dense vectors (sqlite-vec KNN on MiniLM
embeddings), fused by reciprocal rank.

    fused(d) = sum over the rankings r that hold d of 1 / (RRF_K + rank_r(d))     (rank from 1)

RRF_K = 60 as in Cormack et al. (2009): ranks, not raw scores, are combined, so BM25's
unbounded scores and cosine distances need no calibration against each other. Each ranking
takes the best `depth` documents of the kinds asked for.

A query's text goes to FTS5 as its words joined by OR (each quoted), so no character a user
types can be read as FTS5 syntax.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ondo.agent.knowledge import DOC_KINDS, KnowledgeBase

RRF_K = 60
DEFAULT_DEPTH = 50
MODES = ("fused", "bm25", "vector")
_WORD = re.compile(r"[A-Za-z0-9]+")
_STOP = frozenset("""a an and are as at be by for from has have in is it its of on or that the
this to was were will with what when which while who why how not no than then there these
they their them do does""".split())


@dataclass
class Hit:
    doc_id: int
    kind: str
    ref: str
    title: str
    body: str
    meta: dict[str, Any]
    score: float  # the ranking's own: fused RRF, BM25 (higher is better), or cosine similarity
    bm25_rank: int | None = None
    bm25_score: float | None = None
    vector_rank: int | None = None
    cosine: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "kind": self.kind, "title": self.title, "score": self.score,
                "bm25_rank": self.bm25_rank, "bm25": self.bm25_score,
                "vector_rank": self.vector_rank, "cosine": self.cosine, "meta": self.meta}


def fts_query(text: str) -> str | None:
    """`text` as an FTS5 query: its words (stop words left out), each quoted, joined by OR."""
    words: list[str] = []
    for w in _WORD.findall(text.lower()):
        if w not in _STOP and w not in words:
            words.append(w)
    return " OR ".join(f'"{w}"' for w in words) or None


def _kinds_sql(kinds: Sequence[str]) -> tuple[str, list[str]]:
    for k in kinds:
        if k not in DOC_KINDS:
            raise ValueError(f"document kind {k!r} is not one of {', '.join(DOC_KINDS)}")
    return ", ".join("?" * len(kinds)), list(kinds)


def bm25_ranking(kb: KnowledgeBase, query: str, kinds: Sequence[str],
                 depth: int = DEFAULT_DEPTH) -> list[tuple[int, float]]:
    """(doc id, BM25 score: higher is better) best first."""
    q = fts_query(query)
    if q is None:
        return []
    marks, args = _kinds_sql(kinds)
    rows = kb.conn.execute(
        f"SELECT f.rowid, bm25(kb_fts, 2.0, 1.0) AS s FROM kb_fts f JOIN kb_docs d "
        f"ON d.id = f.rowid WHERE kb_fts MATCH ? AND d.kind IN ({marks}) ORDER BY s LIMIT ?",
        (q, *args, depth))
    return [(int(i), -float(s)) for i, s in rows]  # FTS5's bm25() is lower-is-better


def vector_ranking(kb: KnowledgeBase, query: str, kinds: Sequence[str],
                   depth: int = DEFAULT_DEPTH,
                   vector: np.ndarray | None = None) -> list[tuple[int, float]]:
    """(doc id, cosine similarity) best first."""
    if vector is None:
        vector = kb.embedder.embed([query])[0]
    blob = np.asarray(vector, np.float32).tobytes()
    out: list[tuple[int, float]] = []
    for kind in kinds:  # vec0 filters a KNN query by equality on a metadata column
        _kinds_sql([kind])
        rows = kb.conn.execute(
            "SELECT rowid, distance FROM kb_vec WHERE embedding MATCH ? AND k = ? AND kind = ?",
            (blob, depth, kind))
        out += [(int(i), 1.0 - float(d)) for i, d in rows]
    out.sort(key=lambda x: -x[1])
    return out[:depth]


def search(kb: KnowledgeBase, query: str, *, kinds: Sequence[str] = ("runbook",), k: int = 5,
           mode: str = "fused", depth: int = DEFAULT_DEPTH) -> list[Hit]:
    """The best `k` documents of `kinds` for `query` by `mode` (fused, bm25 or vector)."""
    if mode not in MODES:
        raise ValueError(f"retrieval mode {mode!r} is not one of {', '.join(MODES)}")
    lexical = bm25_ranking(kb, query, kinds, depth) if mode != "vector" else []
    dense = vector_ranking(kb, query, kinds, depth) if mode != "bm25" else []
    b = {i: (r, s) for r, (i, s) in enumerate(lexical, 1)}
    v = {i: (r, s) for r, (i, s) in enumerate(dense, 1)}
    if mode == "bm25":
        scored = [(i, s) for i, s in lexical]
    elif mode == "vector":
        scored = [(i, s) for i, s in dense]
    else:
        fused: dict[int, float] = {}
        for ranking in (b, v):
            for i, (r, _) in ranking.items():
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + r)
        scored = sorted(fused.items(), key=lambda x: (-x[1], x[0]))
    top = scored[:k]
    docs = kb.docs(i for i, _ in top)
    hits = []
    for i, score in top:
        d = docs[i]
        hits.append(Hit(i, d["kind"], d["ref"], d["title"], d["body"], d["meta"], float(score),
                        b.get(i, (None, None))[0], b.get(i, (None, None))[1],
                        v.get(i, (None, None))[0], v.get(i, (None, None))[1]))
    return hits


def rank_runbooks(hits: Sequence[Hit]) -> list[str]:
    """Runbook ids in the order of their best section among `hits`."""
    out: list[str] = []
    for h in hits:
        rid = h.meta.get("runbook")
        if rid and rid not in out:
            out.append(rid)
    return out


def search_runbooks(kb: KnowledgeBase, query: str, n: int = 3, mode: str = "fused",
                    per_runbook: int = 4) -> tuple[list[str], list[Hit]]:
    """The best `n` runbooks for `query` (by their best section) and the section hits."""
    hits = search(kb, query, kinds=("runbook",), k=n * per_runbook, mode=mode)
    return rank_runbooks(hits)[:n], hits


QUERY_WEIGHTS = (1.0, 0.6, 0.3)  # the first query, the second, every other
QUERY_RANK_K = 1  # rank 1 scores 1/2, rank 2 1/3: a query's best runbook counts most


def search_runbooks_multi(kb: KnowledgeBase, queries: Sequence[str], n: int = 3,
                          mode: str = "fused",
                          lead: bool = False) -> tuple[list[str], list[Hit]]:
    """Runbooks for several queries, most telling first: each query ranks runbooks (fused),
    and a runbook scores sum(weight_q / (QUERY_RANK_K + rank_q)) over the queries. With
    `lead`, the first query's best runbook comes first whatever the others say."""
    score: dict[str, float] = {}
    hits: list[Hit] = []
    leader: str | None = None
    for q_index, query in enumerate(queries):
        weight = QUERY_WEIGHTS[min(q_index, len(QUERY_WEIGHTS) - 1)]
        ids, q_hits = search_runbooks(kb, query, n=n, mode=mode)
        if q_index == 0 and ids:
            leader = ids[0]
        hits += q_hits
        for rank, rid in enumerate(ids, 1):
            score[rid] = score.get(rid, 0.0) + weight / (QUERY_RANK_K + rank)
    order = sorted(score, key=lambda r: (-score[r], r))
    if lead and leader is not None:
        order = [leader] + [r for r in order if r != leader]
    order = order[:n]
    best: dict[str, Hit] = {}
    for h in hits:
        rid = h.meta.get("runbook")
        if rid in order and (rid not in best or h.score > best[rid].score):
            best[rid] = h
    return order, [best[r] for r in order]
