"""xgrammar and llguidance side by side: what each costs to install, to compile a realistic
JSON schema, and to compute the next-token masks of a batch at every step.

    python3 bench/grammar_libraries.py [--schema bench/schemas/recommendation.json]
        [--tokenizer PATH | --model-shape qwen3-0.6b] [--batch-sizes 1 256] [--steps 40]

The vocabulary is the embedded SmolLM2's (49,152 tokens) unless --tokenizer names a HF
folder or --model-shape a dummy shape (its byte-level tokenizer over the whole vocabulary,
151,936 tokens for qwen3-0.6b). Each row of a batch walks the same valid JSON document from its own offset (rows are
staggered, as a real batch's are), so the masks are computed in as many different states
as there are rows. Prints a table and one JSON line. Either library may be missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ondo.model.tokenizer import load_tokenizer  # noqa: E402

# A document the recommendation schema accepts: what each row of the batch generates.
DOCUMENT = {
    "action": "cap_batch_tokens",
    "target": {"gpu_index": 3, "max_num_batched_tokens": 4096},
    "confidence": 0.82,
    "evidence": [
        {"metric": "temperature_c", "value": 83.5, "note": "hot spot rising 0.4 C/s under W3"},
        {"metric": "time_to_throttle_s", "value": 12.0},
    ],
    "explanation": "The die will reach its thermal slowdown threshold in about twelve seconds "
                   "at this prefill rate; capping the batch keeps it below without dropping work.",
    "expires_in_s": 300,
}


def dist_size_bytes(name: str) -> int:
    """Bytes the installed distribution's files take (what `pip install` put on disk)."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return 0
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total


class Llguidance:
    name = "llguidance"
    deps = ("llguidance",)

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        t0 = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self.tokenizer_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor()
        self.version = llguidance.__version__

    def compile(self, schema: dict) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        return grammar

    def matcher(self, compiled: Any) -> Any:
        m = self.ll.LLMatcher(self.tokenizer, compiled)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                             bitmask)

    def accept(self, m: Any, token: int) -> bool:
        return m.consume_token(token)

    def reset(self, m: Any) -> None:
        m.reset()


class Xgrammar:
    name = "xgrammar"
    deps = ("xgrammar", "apache-tvm-ffi")

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        t0 = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.tokenizer_s = time.perf_counter() - t0
        self.batch = xgrammar.BatchGrammarMatcher()
        self.version = importlib.metadata.version("xgrammar")

    def compile(self, schema: dict) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def reset(self, m: Any) -> None:
        m.reset()


def allowed(bitmask_row: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


def measure(lib: Any, schema: dict, doc_tokens: list[int], eos: int, vocab_size: int,
            batch_sizes: list[int], steps: int, repeats: int) -> dict[str, Any]:
    compile_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = lib.compile(schema)
        lib.matcher(compiled)
        compile_s.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"library": lib.name, "version": lib.version,
                           "tokenizer_s": round(lib.tokenizer_s, 3),
                           "compile_ms": round(statistics.median(compile_s) * 1e3, 2),
                           "install_mb": round(sum(dist_size_bytes(d) for d in lib.deps) / 2**20, 1)}
    words = (vocab_size + 31) // 32
    path = doc_tokens + [eos]
    for batch in batch_sizes:
        compiled = lib.compile(schema)
        matchers = [lib.matcher(compiled) for _ in range(batch)]
        pos = [0] * batch
        stride = max(1, len(doc_tokens) // max(batch, 1))
        for i, m in enumerate(matchers):  # stagger the rows along the document
            for t in doc_tokens[: (i * stride) % len(doc_tokens)]:
                lib.accept(m, t)
            pos[i] = (i * stride) % len(doc_tokens)
        bitmask = torch.zeros((batch, words), dtype=torch.int32)
        fill_s, accept_s, bad = [], [], 0
        for _ in range(steps):
            t0 = time.perf_counter()
            lib.fill(matchers, bitmask)
            t1 = time.perf_counter()
            for i, m in enumerate(matchers):
                token = path[pos[i]]
                bad += not allowed(bitmask[i], token)
                if token == eos:
                    lib.reset(m)
                    pos[i] = 0
                    continue
                if not lib.accept(m, token):
                    raise RuntimeError(f"{lib.name} refused token {token} at {pos[i]}")
                pos[i] += 1
            accept_s.append(time.perf_counter() - t1)
            fill_s.append(t1 - t0)
        # The first steps build lexer states lazily (llguidance) or warm caches: report both.
        row[f"mask_ms_b{batch}"] = round(statistics.median(fill_s) * 1e3, 3)
        row[f"mask_first_ms_b{batch}"] = round(fill_s[0] * 1e3, 3)
        row[f"accept_ms_b{batch}"] = round(statistics.median(accept_s) * 1e3, 3)
        row[f"masks_wrong_b{batch}"] = bad
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--schema", default=os.path.join(here, "schemas", "recommendation.json"))
    p.add_argument("--tokenizer", default=None, help="a HF folder or .gguf (default: the embedded model)")
    p.add_argument("--model-shape", default=None, help="a dummy shape's byte-level tokenizer instead")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--libraries", nargs="+", default=["llguidance", "xgrammar"])
    args = p.parse_args()
    with open(args.schema) as f:
        schema = json.load(f)
    if args.model_shape:
        from ondo.bench.shapes import shape_folder

        args.tokenizer = shape_folder(args.model_shape, tokenizer="bytes")
    tok = load_tokenizer(args.tokenizer)
    vocab_size = len(tok.hf_tokenizer)
    doc_tokens = tok.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    eos = tok.eos_token_ids[0]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in args.libraries:
        cls = {"llguidance": Llguidance, "xgrammar": Xgrammar}[name]
        try:
            lib = cls(tok.hf_tokenizer, vocab_size)
        except ImportError as e:
            print(f"{name}: not installed ({e})", file=sys.stderr)
            continue
        rows.append(measure(lib, schema, doc_tokens, eos, vocab_size, args.batch_sizes,
                            args.steps, args.repeats))
    cols = ["library", "version", "install_mb", "tokenizer_s", "compile_ms"]
    for b in args.batch_sizes:
        cols += [f"mask_ms_b{b}", f"mask_first_ms_b{b}", f"accept_ms_b{b}", f"masks_wrong_b{b}"]
    print(f"vocabulary {vocab_size} tokens, document {len(doc_tokens)} tokens, "
          f"{os.cpu_count()} CPUs")
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, ''):>16}" for c in cols))
    print(json.dumps({"bench": "grammar_libraries", "vocab_size": vocab_size,
                      "document_tokens": len(doc_tokens), "cpus": os.cpu_count(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
