"""CPU throughput: `LLM.generate` against transformers `generate` on the embedded SmolLM2,
a batch of 32 prompts, greedy, the same number of new tokens each. Informational: CPU
timings depend on the machine. Prints a table and a JSON line.

    python3 bench/cpu_generate.py --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ondo import LLM, SamplingParams
from ondo.model.default_model import default_model_path

TOPICS = ["the ocean", "a GPU", "thermodynamics", "Paris", "a robot", "bread", "the moon", "music"]
STYLES = ["Write a short poem about", "Explain simply", "List three facts about", "Tell a story about"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    prompts = [f"{STYLES[i % 4]} {TOPICS[i % 8]}." for i in range(args.batch)]

    llm = LLM()
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    ondo_s = time.perf_counter() - start
    ondo_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = llm.tokenizer.hf_tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=tok.pad_token_id)
    hf_s = time.perf_counter() - start
    hf_tokens = args.batch * args.new_tokens
    rows = [("ondo LLM.generate", ondo_tokens, ondo_s), ("transformers generate", hf_tokens, hf_s)]
    for label, n, s in rows:
        print(f"{label:24s} {n:6d} tokens {s:7.2f} s {n / s:8.1f} tokens/s")
    print(json.dumps({"bench": "cpu_generate", "batch": args.batch, "new_tokens": args.new_tokens,
                      "threads": torch.get_num_threads(),
                      "ondo_tokens_per_s": ondo_tokens / ondo_s, "transformers_tokens_per_s": hf_tokens / hf_s}))


if __name__ == "__main__":
    main()
