"""Real architectures' shapes, written as HF config.json folders for dummy-weight runs."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "tie_word_embeddings": True,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    },
}


def shape_folder(name: str, root: str | None = None, tokenizer: str = "words",
                 overrides: dict[str, Any] | None = None) -> str:
    """A folder with config.json for the named shape (weights come from load_format=dummy)
    and a tokenizer over its whole vocabulary: "words", word-level ("w0", "w1", ...), so
    that a dummy model takes and returns text like a real one, one word per token; or
    "bytes", byte-level BPE tokens of real-looking text (see `write_bytes_tokenizer`), for
    what needs a token's bytes (grammars). `overrides` change the config (smaller models
    with the same vocabulary, for smoke runs)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    folder = os.path.join(root or tempfile.mkdtemp(prefix="ondo-shape-"), name)
    os.makedirs(folder, exist_ok=True)
    config = {**SHAPES[name], **(overrides or {})}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if tokenizer == "words":
        write_word_tokenizer(folder, config["vocab_size"])
    elif tokenizer == "bytes":
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        bos = config.get("bos_token_id")
        write_bytes_tokenizer(folder, config["vocab_size"], eos_ids, bos)
    else:
        raise ValueError(f"unknown tokenizer kind {tokenizer!r}: words or bytes")
    return folder


def write_word_tokenizer(folder: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                   "model_max_length": 1 << 30}, f)


_LETTERS = "eeeeeeeeeeeettttttttaaaaaaaaoooooooiiiiiiinnnnnnnsssssshhhhhhrrrrrrdddllllcccuuummwwffggyyppbbvkjxqz"
_PUNCT = list('"{}[],.:;!?()-_/\\\n \t0123456789\'<>=+*#@%&')


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_bytes_tokenizer(folder: str, vocab_size: int, eos_token_ids: list[int],
                          bos_token_id: int | None = None, seed: int = 0) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, made without data: the 256
    bytes, then words drawn from English letter frequencies (half with a leading space,
    some capitalized), numbers and runs of punctuation, and the special tokens at the
    config's ids. It has no merges (text encodes byte by byte); what it gives is a
    vocabulary shaped like a real one, for whatever looks at tokens' bytes."""
    import random

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    alphabet = _bytes_to_unicode()
    names = iter(("<|im_end|>", "<|eot_id|>", "<|eom_id|>"))
    specials = {i: next(names, f"<|special_{i}|>") for i in eos_token_ids}
    if bos_token_id is not None and bos_token_id not in specials:
        specials[bos_token_id] = "<|endoftext|>"
    pieces = [alphabet[b] for b in range(256)]
    seen = set(pieces)

    def enc(text: str) -> str:
        return "".join(alphabet[b] for b in text.encode())

    while len(pieces) < vocab_size - len(specials):
        kind = rng.random()
        if kind < 0.8:
            word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 9)))
            if rng.random() < 0.2:
                word = word.capitalize()
            text = (" " + word) if rng.random() < 0.5 else word
        elif kind < 0.9:
            text = (" " if rng.random() < 0.3 else "") + str(rng.randrange(10 ** rng.randint(1, 3)))
        else:
            text = "".join(rng.choice(_PUNCT) for _ in range(rng.randint(2, 4)))
        piece = enc(text)
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    vocab: dict[str, int] = {}
    it = iter(pieces)
    for i in range(vocab_size):
        vocab[specials[i] if i in specials else next(it)] = i
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    if eos_token_ids:
        config["eos_token"] = specials[eos_token_ids[0]]
    if bos_token_id is not None:
        config["bos_token"] = specials[bos_token_id]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
