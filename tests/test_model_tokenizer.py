"""The tokenizer wrapper and the incremental detokenizer, on the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os

import pytest

from ondo.model.detokenizer import IncrementalDetokenizer
from ondo.model.tokenizer import load_tokenizer

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MIXED_TEXT = "Hi 😀! 你好，世界。naïve café — 🇯🇵 ok"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_embedded_tokenizer_basics(tokenizer):
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.vocab_size == 49152
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(ids) == "Hello world"


def test_chat_template_renders_im_start_structure(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3  # three <|im_start|>


def test_detokenizer_deltas_rebuild_multibyte_text_exactly(tokenizer):
    output_ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False) + [2]
    # The text must really split characters over byte-level tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in output_ids)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}])
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.append(i) for i in output_ids]
    assert "".join(deltas) == tokenizer.decode(output_ids) == MIXED_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # held back while a character was partial
    assert detok.flush() == ""


def test_detokenizer_flush_releases_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [1])
    assert detok.append(ids[0]) == ""
    assert detok.flush() == tokenizer.decode(ids[:1])


def test_folder_tokenizer_without_chat_template_refuses_chat(tokenizer, tmp_path):
    tokenizer.hf_tokenizer.save_pretrained(tmp_path)
    for name in os.listdir(tmp_path):
        if name.endswith(".jinja"):
            os.remove(tmp_path / name)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))

    plain = load_tokenizer(str(tmp_path))
    assert plain.encode("Hello world") == tokenizer.encode("Hello world")
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_and_corrupt_tokenizer_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ValueError, match="broken.gguf"):
        load_tokenizer(None, tokenizer_path=str(broken))
