"""Test helper: one tokenizer of each family whose decoding joins tokens differently, all
built offline.

- byte-level BPE: the embedded SmolLM2 GGUF's (GPT-2 style, spaces and multi-byte
  characters inside the byte-level tokens);
- WordPiece-style: the word-level tokenizer of the dummy benchmark shapes (a WordPiece
  decoder joins words with spaces);
- SentencePiece-style: a Llama-2-like BPE with "▁" for spaces and byte fallback
  (`<0xF0>`...), decoded by Replace("▁", " ") + ByteFallback + Fuse + Strip of one
  leading space, trained here on a few sentences.
"""

from __future__ import annotations

import json
import os

from ondo.bench.shapes import write_word_tokenizer
from ondo.model.tokenizer import Tokenizer, load_tokenizer

FAMILIES = ("byte_level_bpe", "wordpiece", "sentencepiece")
# Text whose tokens split characters across ids in the byte-level families.
MULTILINGUAL = "Hi 😀! 你好，世界。naïve café — 🇯🇵 ok, the fox's den"
_CORPUS = ("The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
           "naïve café — ok", "Once upon a time there was a little model that could.")


def write_sentencepiece_tokenizer(folder: str, vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(list(_CORPUS) * 10, trainer)
    spec = json.loads(tok.to_str())
    # The byte tokens are ordinary pieces of the vocabulary, as in Llama's, not special ones.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    tok = RustTokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                   "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 1 << 30,
                   "clean_up_tokenization_spaces": False}, f)


def write_tokenizer(family: str, folder: str, vocab_size: int = 400) -> None:
    """Tokenizer files of the family into `folder` (the byte-level one copies the embedded model's)."""
    if family == "wordpiece":
        write_word_tokenizer(folder, vocab_size)
    elif family == "sentencepiece":
        write_sentencepiece_tokenizer(folder, vocab_size)
    elif family == "byte_level_bpe":
        load_tokenizer(None).hf_tokenizer.save_pretrained(folder)
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {FAMILIES}")


# The WordPiece-style one has the vocabulary of the qwen3-0.6b benchmark shape.
VOCAB_SIZES = {"wordpiece": 151936, "sentencepiece": 400}
MODEL_VOCAB_SIZES = {"byte_level_bpe": 49152, **VOCAB_SIZES}


def tiny_model_folder(family: str, folder: str) -> str:
    """A tiny random Llama over the family's vocabulary, with its tokenizer: an engine on
    it starts in seconds and steps in milliseconds on a CPU."""
    from tests.tiny_checkpoints import tiny_hf_model

    vocab = MODEL_VOCAB_SIZES[family]
    tiny_hf_model("LlamaConfig", {"vocab_size": vocab}).save_pretrained(folder)
    write_tokenizer(family, folder, vocab)
    return folder


def load_family(family: str, folder: str) -> Tokenizer:
    if family == "byte_level_bpe":
        return load_tokenizer(None)
    write_tokenizer(family, folder, VOCAB_SIZES[family])
    return load_tokenizer(folder)
