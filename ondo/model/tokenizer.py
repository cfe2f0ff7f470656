"""The tokenizer the engine and the server use: a thin, typed wrapper over a transformers tokenizer."""

from __future__ import annotations

import json
import os
from typing import Any

from ondo.model.default_model import default_model_path
from ondo.model.tokenizer_class import declared_tokenizer_class


def rust_decoder(hf_tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer whose decode is the
    library's own and adds nothing to it (no clean-up of spaces); None otherwise.

    A streamed token costs two decodes; through transformers' `decode` each spent about
    nine tenths of its time in argument conversion and checks around the Rust call
    (`bench/server_stream_cost.py --profile`), so `Tokenizer.decode` calls the Rust
    tokenizer directly where that gives the same text."""
    import tokenizers  # loaded already wherever a fast tokenizer is

    backend = getattr(hf_tokenizer, "_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return None
    if _owner(hf_tokenizer, "decode") != "PreTrainedTokenizerBase" or \
            _owner(hf_tokenizer, "_decode") not in _LIBRARY_FAST_DECODERS:
        return None
    if getattr(hf_tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend


def _owner(obj: Any, method: str) -> str | None:
    """The transformers class that defines `method` for `obj`; None if another does."""
    cls = next((c for c in type(obj).__mro__ if method in c.__dict__), None)
    if cls is None or not cls.__module__.startswith("transformers.tokenization_utils"):
        return None
    return cls.__name__


# transformers 5's fast tokenizer base and 4.x's: `_decode` is the Rust decode plus the
# optional clean-up of spaces.
_LIBRARY_FAST_DECODERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, source: str, extra_eos_token_ids: list[int]) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.source = source
        self._rust = rust_decoder(hf_tokenizer)
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos + extra_eos_token_ids))

    @property
    def vocab_size(self) -> int:
        # len() counts added special tokens that vocab_size may leave out.
        return len(self.hf_tokenizer)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf_tokenizer.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf_tokenizer, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Each text's `encode`, in one call: a fast tokenizer encodes the batch in Rust,
        without holding the interpreter lock."""
        if not texts:
            return []
        ids = self.hf_tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self.hf_tokenizer.convert_ids_to_tokens(ids))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[int] | str:
        """The conversation rendered by the chat template. continue_final_message: the last
        message is left open (no end-of-turn after it), for the model to go on with it."""
        if not self.has_chat_template:
            raise ValueError(
                f"the tokenizer from {self.source} has no chat template; "
                "send a plain completion prompt instead"
            )
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        if continue_final_message:
            extra["continue_final_message"] = True
        result = self.hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **extra
        )
        if not tokenize:
            return str(result)
        # transformers 5 returns a BatchEncoding here; 4.x returned the id list.
        if hasattr(result, "keys") and "input_ids" in result:
            result = result["input_ids"]
        return [int(i) for i in result]


def load_tokenizer(path: str | None, tokenizer_path: str | None = None) -> Tokenizer:
    """From a HF folder, or a .gguf file (tokenizer and chat template from its metadata).

    tokenizer_path, when given, overrides path; both None means the embedded default model.
    """
    source = tokenizer_path or path or default_model_path()
    if not os.path.exists(source):
        raise FileNotFoundError(f"tokenizer source not found: {source}")
    try:
        if source.endswith(".gguf"):
            hf_tokenizer = _gguf_tokenizer(source)
        else:
            declared = declared_tokenizer_class(source)
            if declared is not None:
                hf_tokenizer = declared.from_pretrained(source)
            else:
                from transformers import AutoTokenizer

                hf_tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # transformers raises many kinds on a bad file
        raise ValueError(f"cannot load a tokenizer from {source}: {e}") from e
    return Tokenizer(hf_tokenizer, source, _generation_eos_ids(source))


def _gguf_tokenizer(source: str) -> Any:
    """The tokenizer in a GGUF file's metadata: the one converted at an earlier start if it
    is kept (`gguf_tokenizer_cache`), else converted now and kept."""
    from ondo.model import gguf_tokenizer_cache

    hf_tokenizer = gguf_tokenizer_cache.load_cached(source)
    if hf_tokenizer is not None:
        return hf_tokenizer
    from transformers import AutoTokenizer

    folder, file_name = os.path.split(os.path.abspath(source))
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    gguf_tokenizer_cache.keep(source, hf_tokenizer)
    return hf_tokenizer


def _generation_eos_ids(source: str) -> list[int]:
    # Chat models often stop on more ids than the tokenizer's one eos token.
    config_path = os.path.join(source, "generation_config.json")
    if not os.path.isfile(config_path):
        return []
    with open(config_path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(i) for i in eos]
