"""A folder's declared tokenizer class, loaded without AutoTokenizer: the same tokenizer
AutoTokenizer builds (class, ids, text, chat template, special tokens), AutoTokenizer's
own choice wherever it would choose differently, and none of its module's imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ondo.model.tokenizer import load_tokenizer
from ondo.model.tokenizer_class import declared_tokenizer_class
from tests.tokenizer_families import MULTILINGUAL, write_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MULTILINGUAL}]


def byte_level_folder(root, tokenizer_class: str | None, model_type: str, **extra) -> str:
    """The embedded model's byte-level BPE tokenizer files with the declared class (None:
    as saved) and a config.json of `model_type`."""
    folder = os.path.join(str(root), f"{tokenizer_class}-{model_type}")
    write_tokenizer("byte_level_bpe", folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    config.update(extra)
    with open(path, "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": model_type, "vocab_size": 49152}, f)
    return folder


def same_as_auto(folder: str) -> None:
    from transformers import AutoTokenizer

    ours = load_tokenizer(folder).hf_tokenizer
    auto = AutoTokenizer.from_pretrained(folder)
    assert type(ours) is type(auto)
    text = "<|im_start|>user\n" + MULTILINGUAL + "<|im_end|>"
    assert ours.encode(text) == auto.encode(text)
    ids = auto.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id, len(ours)) == \
        (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id, len(auto))
    if auto.chat_template:
        assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
            auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("tokenizer_class,model_type,expected", [
    (None, "llama", "TokenizersBackend"),  # as saved: the generic fast class
    ("PreTrainedTokenizerFast", "llama", "TokenizersBackend"),
    ("Qwen2Tokenizer", "qwen3", "Qwen2Tokenizer"),
    ("GPT2TokenizerFast", "gpt2", "GPT2Tokenizer"),
])
def test_declared_class_gives_what_autotokenizer_gives(tmp_path, tokenizer_class, model_type,
                                                       expected):
    folder = byte_level_folder(tmp_path, tokenizer_class, model_type)
    cls = declared_tokenizer_class(folder)
    assert cls is not None and cls.__name__ == expected
    same_as_auto(folder)


@pytest.mark.parametrize("family", ["wordpiece", "sentencepiece"])
def test_other_families_match_autotokenizer(tmp_path, family):
    folder = str(tmp_path / family)
    os.makedirs(folder)
    write_tokenizer(family, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    assert declared_tokenizer_class(folder) is not None
    same_as_auto(folder)


@pytest.mark.parametrize("tokenizer_class,model_type,extra", [
    ("LlamaTokenizerFast", "llama", {}),  # AutoTokenizer swaps it on byte-level files
    ("Qwen2Tokenizer", "qwen2", {}),  # a model type whose published class it overrides
    ("Qwen2Tokenizer", "qwen3", {"auto_map": {"AutoTokenizer": [None, "tok.MyTokenizer"]}}),
    ("NoSuchTokenizer", "qwen3", {}),
    ("", "qwen3", {}),
])
def test_autotokenizer_chooses_where_it_would_choose_differently(tmp_path, tokenizer_class,
                                                                  model_type, extra):
    folder = byte_level_folder(tmp_path, tokenizer_class, model_type, **extra)
    assert declared_tokenizer_class(folder) is None


def test_broken_tokenizer_config_is_named(tmp_path):
    folder = byte_level_folder(tmp_path, None, "llama")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    assert declared_tokenizer_class(folder) is None
    with pytest.raises(ValueError, match="cannot load a tokenizer from .*llama"):
        load_tokenizer(folder)


def test_loading_a_declared_class_never_imports_autotokenizer(tmp_path):
    folder = byte_level_folder(tmp_path, "Qwen2Tokenizer", "qwen3")
    code = ("import sys\nfrom ondo.model.tokenizer import load_tokenizer\n"
            f"t = load_tokenizer({folder!r})\n"
            "print(type(t.hf_tokenizer).__name__, len(t.encode('hello world')),\n"
            "      sorted(m for m in sys.modules if m.startswith('transformers.models.auto')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    name, count, auto_modules = out.stdout.split(" ", 2)
    assert name == "Qwen2Tokenizer" and int(count) > 0
    assert auto_modules.strip() == "[]"
