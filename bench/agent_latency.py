"""How long the agent takes to recommend on an incident: retrieval, the model's answer under
the JSON schema (the server's structured outputs), the check, the entry in the log.

Starts `ondo serve` (the embedded SmolLM2-135M-Instruct by default, or a model shape with
dummy weights) as the agent's endpoint, replays the scripted incidents of `ondo agent eval`
into databases (not timed), warms the endpoint with one recommendation, then times one
recommendation per incident. Inside `ondo serve` the agent waits `SETTLE_S` after an
incident for the entries that come with it before it starts: the incident-to-recommendation
time there is that plus the figure measured here (the "served" column).

    python bench/agent_latency.py --smoke                         # CPU, 3 incidents
    python bench/agent_latency.py                                 # CPU, every incident
    python bench/agent_latency.py --device cuda                   # the embedded model on a GPU
    python bench/agent_latency.py --device cuda --shape qwen3-0.6b   # dummy weights (5 s target)
    python bench/agent_latency.py --smoke --shape qwen3-0.6b      # the same path, tiny, on a CPU

With `--shape` the model has random weights and a byte-level tokenizer of the shape's full
vocabulary (and a ChatML template): its answers make no sense, and most are cut at the
token limit or fail the check, so the rules answer; the grammar still constrains every step,
so the time is that of a real answer's length or longer (up to the token limit). The figure
there is the latency, not the answer. `--smoke --shape` keeps the vocabulary and shrinks the
layers (a check of the path on a CPU, no figure).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The agent's packages are checked before anything imports them: a machine without them
# gets their names, not a traceback.
from ondo.agent.packages import INSTALL_HINT, missing_packages  # noqa: E402

# The shape's layers shrunk for `--smoke` (the vocabulary, the tokenizer and the grammar's
# work per step stay the shape's).
SMOKE_OVERRIDES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def dummy_model_folder(shape: str, smoke: bool) -> str:
    """A shape's config with a byte-level tokenizer (grammars need a token's bytes) and a
    ChatML chat template (the agent asks for chat completions)."""
    from ondo.bench.shapes import shape_folder

    folder = shape_folder(shape, tokenizer="bytes", overrides=SMOKE_OVERRIDES if smoke else None)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["chat_template"] = CHATML
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shape", default=None, help="a model shape with dummy weights "
                                                  "(ondo.bench.shapes), e.g. qwen3-0.6b")
    ap.add_argument("--base-url", default=None, help="use this endpoint instead of starting one")
    ap.add_argument("--incidents", type=int, default=None, help="the first N (default all)")
    ap.add_argument("--smoke", action="store_true", help="3 incidents (a quick check on a CPU)")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    args = ap.parse_args()
    missing = missing_packages()
    if missing:
        print(f"error: the agent needs {', '.join(missing)}, not installed here; "
              f"{INSTALL_HINT}", file=sys.stderr)
        return 1
    from ondo.agent.actions import GpuLimits
    from ondo.agent.agent import Agent, recommendation_draft
    from ondo.agent.client import ModelEndpoint
    from ondo.agent.context import context_from_db
    from ondo.agent.embedded import EmbeddedServer
    from ondo.agent.eval.harness import trigger_seq
    from ondo.agent.eval.incidents import INCIDENTS
    from ondo.agent.knowledge import KnowledgeBase
    from ondo.agent.live import DEFAULT_SETTLE_S as SETTLE_S
    from ondo.agent.record import append_to_db
    from ondo.twin.params import h100_params

    n = 3 if args.smoke else max(1, min(args.incidents or len(INCIDENTS), len(INCIDENTS)))
    target_s = 5.0 if args.device == "cuda" else 30.0
    params = h100_params()
    limits = GpuLimits.from_params(params)
    work = Path(tempfile.mkdtemp(prefix="ondo-agent-bench-"))
    chosen = INCIDENTS[:n]
    for inc in chosen:
        inc.build(work / f"{inc.name}.db", params)

    server = None
    model = "endpoint"
    if args.base_url is None:
        flags = ["--device", args.device]
        if args.shape:
            flags = [dummy_model_folder(args.shape, args.smoke), "--load-format", "dummy",
                     *flags]
            model = f"{args.shape} (dummy weights{', shrunk' if args.smoke else ''})"
        else:
            model = "SmolLM2-135M-Instruct (embedded)"
        t0 = time.perf_counter()
        server = EmbeddedServer.start(*flags, timeout_s=600)
        print(f"server up in {time.perf_counter() - t0:.1f} s ({model}, {args.device})",
              file=sys.stderr)
    endpoint = ModelEndpoint(args.base_url or server.base_url, timeout_s=args.timeout_s)
    rows = []
    try:
        for k, inc in enumerate([chosen[0], *chosen]):  # the first one warms up
            db = work / f"{inc.name}.db"
            ctx = context_from_db(db, trigger_seq(db, inc.trigger), params=params)
            kb = KnowledgeBase(db)
            try:
                kb.sync_runbooks()
                kb.index_log()
                t0 = time.perf_counter()
                result = Agent(kb, endpoint, limits).recommend(ctx)
            finally:
                kb.close()
            rec = result.recommendation
            append_to_db(db, recommendation_draft(rec, ctx, 0.0, time.time()))
            total_s = time.perf_counter() - t0
            if k == 0:
                continue
            rows.append({"incident": inc.name, "total_s": total_s,
                         "retrieval_s": result.timings_s.get("retrieval", 0.0),
                         "model_s": result.timings_s.get("model"), "source": rec.source,
                         "action": rec.action, "right": rec.action == inc.expected_action,
                         "prompt_tokens": result.prompt_tokens,
                         "completion_tokens": result.completion_tokens,
                         "fallback": rec.fallback_reason})
    finally:
        if server is not None:
            server.stop()

    print(f"{'incident':28s} {'total s':>8s} {'served s':>8s} {'retr s':>7s} {'model s':>8s} "
          f"{'prompt':>6s} {'out':>4s} {'src':5s} action")
    for r in rows:
        ms = "-" if r["model_s"] is None else f"{r['model_s']:.2f}"
        print(f"{r['incident']:28s} {r['total_s']:8.2f} {r['total_s'] + SETTLE_S:8.2f} "
              f"{r['retrieval_s']:7.3f} {ms:>8s} {r['prompt_tokens'] or '-':>6} "
              f"{r['completion_tokens'] or '-':>4} {r['source']:5s} {r['action']}")
    totals = [r["total_s"] for r in rows]
    p90 = sorted(totals)[max(0, int(round(0.9 * len(totals))) - 1)]
    out = {"bench": "agent_latency", "device": args.device, "model": model, "incidents": n,
           "settle_s": SETTLE_S,
           "total_s_p50": round(statistics.median(totals), 3), "total_s_p90": round(p90, 3),
           "total_s_max": round(max(totals), 3),
           "served_s_max": round(max(totals) + SETTLE_S, 3),
           "model_s_p50": round(statistics.median([r["model_s"] for r in rows
                                                   if r["model_s"] is not None] or [0.0]), 3),
           "prompt_tokens_p50": statistics.median([r["prompt_tokens"] for r in rows
                                                   if r["prompt_tokens"]] or [0]),
           "answered_by_model": sum(r["source"] == "model" for r in rows),
           "action_right": sum(r["right"] for r in rows),
           "fallbacks": sorted({(r["fallback"] or "")[:120] for r in rows
                                if r["source"] == "rules"}),
           "target_s": target_s,
           # The target is the model's path: every recommendation must have asked the model
           # and had its answer (or, with dummy weights, its cut or senseless answer), not
           # the rules alone after an endpoint that failed to answer.
           "met": bool(rows) and all(_model_answered(r) for r in rows)
           and max(totals) + SETTLE_S <= target_s}
    print(json.dumps(out))
    return 0


def _model_answered(row: dict) -> bool:
    if row["source"] == "model":
        return True
    why = row["fallback"] or ""
    return why.startswith("invalid answer") or "cut at max_tokens" in why


if __name__ == "__main__":
    sys.exit(main())
