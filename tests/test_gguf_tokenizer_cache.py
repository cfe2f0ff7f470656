"""A GGUF file's tokenizer is converted once and kept in the user's cache folder: the next
load reads the kept files, gives the same tokenizer, and never parses the GGUF; a changed
file, an unwritable cache folder or a damaged kept folder cost only the conversion."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from ondo.model import gguf_tokenizer_cache
from ondo.model.default_model import default_model_path
from ondo.model.tokenizer import load_tokenizer

TEXTS = ["Hello world", "  leading spaces\n\ttabs", "émoji 🙂 and 中文", "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch):
    """The embedded model's file under tmp_path, the cache folder beside it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copyfile(default_model_path(), path)
    return str(path)


def conversions(monkeypatch) -> list[str]:
    """The GGUF files transformers is asked to convert from now on."""
    from transformers import AutoTokenizer

    seen: list[str] = []
    real = AutoTokenizer.from_pretrained.__func__

    def recording(cls, folder, *args, **kwargs):
        if kwargs.get("gguf_file"):
            seen.append(kwargs["gguf_file"])
        return real(cls, folder, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(recording))
    return seen


def same_tokenizer(a, b) -> None:
    assert type(a.hf_tokenizer) is type(b.hf_tokenizer)
    assert a.eos_token_ids == b.eos_token_ids and a.vocab_size == b.vocab_size
    for text in TEXTS:
        ids = a.encode(text)
        assert ids == b.encode(text) and a.decode(ids) == b.decode(ids)
    assert a.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
        b.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)


def test_the_second_load_reads_the_kept_tokenizer_and_gives_the_same_one(gguf_copy, monkeypatch):
    seen = conversions(monkeypatch)
    first = load_tokenizer(gguf_copy)
    assert seen == ["model.gguf"]
    folder = gguf_tokenizer_cache.cached_folder(gguf_copy)
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert folder.startswith(os.environ["XDG_CACHE_HOME"])
    second = load_tokenizer(gguf_copy)
    assert seen == ["model.gguf"]  # no second conversion
    assert second.source == gguf_copy
    same_tokenizer(first, second)
    assert second.decode(second.encode("The capital of France is Paris.")) == "The capital of France is Paris."


def test_a_changed_file_is_converted_again(gguf_copy, monkeypatch):
    seen = conversions(monkeypatch)
    load_tokenizer(gguf_copy)
    before = gguf_tokenizer_cache.cached_folder(gguf_copy)
    stat = os.stat(gguf_copy)
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_tokenizer_cache.cached_folder(gguf_copy) != before
    load_tokenizer(gguf_copy)
    assert seen == ["model.gguf", "model.gguf"]


def test_an_unwritable_cache_folder_still_loads_with_a_warning(gguf_copy, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    seen = conversions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ondo.model.kept_files"):
        tokenizer = load_tokenizer(gguf_copy)
    assert "cannot keep" in caplog.text and str(blocker) in caplog.text
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    load_tokenizer(gguf_copy)
    assert seen == ["model.gguf", "model.gguf"]


def test_a_damaged_kept_folder_is_converted_again_and_replaced(gguf_copy, monkeypatch, caplog):
    seen = conversions(monkeypatch)
    first = load_tokenizer(gguf_copy)
    folder = gguf_tokenizer_cache.cached_folder(gguf_copy)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write("{ truncated")
    with caplog.at_level(logging.WARNING, logger="ondo.model.gguf_tokenizer_cache"):
        again = load_tokenizer(gguf_copy)
    assert "cannot be read" in caplog.text
    assert seen == ["model.gguf", "model.gguf"]
    same_tokenizer(first, again)
    load_tokenizer(gguf_copy)  # the replaced folder is read
    assert seen == ["model.gguf", "model.gguf"]
