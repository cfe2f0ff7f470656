"""A labelled set for retrieval: what an operator (or the agent's own query) asks, and the
runbook that answers it. Recall@3: the labelled runbook is among the three best runbooks
(each ranked by its best section). Written in words other than the runbooks' own where an
operator would use them."""

from __future__ import annotations

from dataclasses import dataclass

from ondo.agent.knowledge import KnowledgeBase
from ondo.agent.retrieval import MODES, search_runbooks

LABELLED: tuple[tuple[str, str], ...] = (
    ("GPU pinned at 700 W and clocks keep dropping under load", "power-cap-sustained"),
    ("power cap sustained; throttle started sw power cap", "power-cap-sustained"),
    ("throughput flat even though I raised the batch size, power at the board limit",
     "power-cap-sustained"),
    ("die temperature 83 C, only 4 degrees from slowdown, inlet normal", "thermal-margin-low"),
    ("thermal margin low measured; throttle predicted sw thermal slowdown",
     "thermal-margin-low"),
    ("the twin forecasts thermal throttling in 5 seconds", "thermal-margin-low"),
    ("memory temperature 93 C while the core is at 50 C", "hbm-hot"),
    ("hbm margin low during long-context decode", "hbm-hot"),
    ("HBM stacks overheating with big decode batches", "hbm-hot"),
    ("every GPU in the rack is hot before any load; idle at 60 C", "high-inlet"),
    ("datacenter cooling failure, air intake too warm", "high-inlet"),
    ("idle temperature 25 C above normal: hot inlet air; thermal margin low", "high-inlet"),
    ("this one GPU runs 15 degrees hotter than its twin predicts at the same watts",
     "degraded-cooling"),
    ("fan failure or dried thermal paste suspected on one card", "degraded-cooling"),
    ("die heats more per watt than the fitted model: degraded cooling", "degraded-cooling"),
    ("scheduler keeps evicting running requests and recomputing them", "preemption-storm"),
    ("preemption events every few seconds, output tokens per second collapsed",
     "preemption-storm"),
    ("KV blocks copied back and forth over PCIe to host memory", "swap-thrashing"),
    ("swap storm: half the cache crossed the host link", "swap-thrashing"),
    ("kv cache 98% full with only four requests; long prompts wait for blocks",
     "kv-cache-undersized"),
    ("need a bigger KV cache, raise gpu memory utilization", "kv-cache-undersized"),
    ("hundreds of requests queued, time to first token 8 seconds", "queue-backlog-slo"),
    ("queue backlog; slo violation ttft", "queue-backlog-slo"),
    ("users see slow token streaming but requests start fast", "tpot-slo-breach"),
    ("slo violation tpot; decode steps stretched by large prefill chunks", "tpot-slo-breach"),
    ("power reading has not changed for 10 seconds although load changed",
     "sensor-stale-or-failed"),
    ("nvmlDeviceGetTemperature returns an error; XID in dmesg", "sensor-stale-or-failed"),
    ("sensor stale power_w; telemetry gap", "sensor-stale-or-failed"),
    ("GPU at full power but our engine is idle: another process on the card",
     "noisy-neighbour"),
    ("someone else's training job shares this GPU", "noisy-neighbour"),
    ("joules per token creeping up over the day", "energy-per-token-drift"),
    ("efficiency getting worse: more energy for the same output tokens",
     "energy-per-token-drift"),
    ("the governor cut the token budget and now requests queue while the GPU is cool",
     "governor-overlimiting"),
    ("governor decision with tight limits followed by slo violations",
     "governor-overlimiting"),
    ("rack power over our 450 W allocation but the GPU is not throttling",
     "power-budget-exceeded"),
    ("power budget exceeded with the governor off", "power-budget-exceeded"),
    ("a second of power capping at the start of each burst, nothing else",
     "transient-throttle"),
    ("short throttle started and throttle ended pairs, none sustained", "transient-throttle"),
)


@dataclass(frozen=True)
class RetrievalScore:
    mode: str
    recall_at_1: float
    recall_at_3: float
    misses: tuple[tuple[str, str, tuple[str, ...]], ...]  # (query, expected, got top 3)


def score_retrieval(kb: KnowledgeBase,
                    labelled: tuple[tuple[str, str], ...] = LABELLED) -> list[RetrievalScore]:
    out = []
    for mode in MODES:
        hits1 = hits3 = 0
        misses = []
        for query, expected in labelled:
            top, _ = search_runbooks(kb, query, n=3, mode=mode)
            hits1 += bool(top) and top[0] == expected
            if expected in top:
                hits3 += 1
            else:
                misses.append((query, expected, tuple(top)))
        n = len(labelled)
        out.append(RetrievalScore(mode, hits1 / n, hits3 / n, tuple(misses)))
    return out
