"""`ondo generate`: one prompt through the offline engine, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ondo.engine.config import EngineArgs

_ARG_TYPES = {"int": int, "float": float, "str": str}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every EngineArgs field as --flag (model is positional or --model where the command says)."""
    for f in fields(EngineArgs):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        base = str(f.type).split("|")[0].strip()  # "int | None" -> "int"
        if base == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=_ARG_TYPES[base], default=f.default)


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    kwargs = {f.name: getattr(args, f.name) for f in fields(EngineArgs) if hasattr(args, f.name)}
    return EngineArgs(**kwargs)


def _generate(args: argparse.Namespace) -> int:
    from ondo.engine.llm import LLM
    from ondo.engine.sampling_params import SamplingParams

    try:
        engine_args = engine_args_from(args)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.sampling_seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kwargs = {f.name: getattr(engine_args, f.name) for f in fields(EngineArgs) if f.name != "model"}
    try:
        llm = LLM(engine_args.model, **kwargs)
    except ValueError as e:  # a setting this model or machine cannot take
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            out = llm.generate(args.prompt, params)[0]
    finally:
        llm.close()
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    c = out.outputs[0]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": c.text, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason}))
    else:
        print(c.text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt (offline engine)")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(p)
    p.set_defaults(func=_generate)
