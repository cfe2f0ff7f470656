"""The tokenizer class a model folder declares, imported by itself rather than through
transformers' AutoTokenizer.

AutoTokenizer's module brings in the `Auto*` machinery, and with it, in some transformers
releases, the generation and distributed stacks and scikit-learn: on a GPU machine a
tokenizer then took 12–17 s to load, nearly all of it imports, in a thread beside the
engine's start, slowing both.
A folder whose tokenizer_config.json names a fast (Rust-backed) class, and brings no code
of its own, gets that class straight from transformers' top level, which is what
AutoTokenizer would build. Where AutoTokenizer would choose differently — a Llama
tokenizer class (swapped for the generic one on byte-level files), or a model type whose
published tokenizer class it overrides — the folder goes to AutoTokenizer as before.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
from typing import Any

# Names of the generic fast tokenizer, which AutoTokenizer builds as one class.
_GENERIC = ("PreTrainedTokenizerFast", "PreTrainedTokenizer", "TokenizersBackend")


def declared_tokenizer_class(folder: str) -> Any | None:
    """The fast tokenizer class `folder` declares, or None when AutoTokenizer must choose."""
    declared = _read_json(os.path.join(folder, "tokenizer_config.json"))
    if not isinstance(declared, dict) or "auto_map" in declared:
        return None
    name = declared.get("tokenizer_class")
    if not isinstance(name, str) or not name:
        return None
    base = name.removesuffix("Fast")
    if base == "LlamaTokenizer":
        return None
    model = _read_json(os.path.join(folder, "config.json"))
    model_type = model.get("model_type") if isinstance(model, dict) else None
    overridden = _overridden_model_types()
    if overridden is None or model_type in overridden:
        return None
    import transformers

    fast_base = getattr(transformers, "TokenizersBackend", None) or \
        getattr(transformers, "PreTrainedTokenizerFast", None)
    if fast_base is None:
        return None
    if name in _GENERIC:
        return fast_base
    for candidate in (base, name):
        cls = getattr(transformers, candidate, None)
        if isinstance(cls, type) and issubclass(cls, fast_base):
            return cls
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # AutoTokenizer names a broken file in its own error


@functools.cache
def _overridden_model_types() -> frozenset[str] | None:
    """The model types whose published tokenizer class AutoTokenizer replaces, read from its
    source without importing it; an empty set where this transformers has no such list,
    None where the list is there but cannot be read (then AutoTokenizer decides)."""
    # The top-level spec, found without importing anything (a submodule's would import
    # its packages, `transformers.models.auto` among them).
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.origin:
        return None
    source = os.path.join(os.path.dirname(spec.origin), "models", "auto", "tokenization_auto.py")
    try:
        with open(source) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS":
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            return frozenset(str(v) for v in value)
    return frozenset()
