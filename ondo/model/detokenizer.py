"""Streaming text out of a growing list of token ids, one delta per token.

vLLM's prefix_offset/read_offset method: decode a short window of recent ids
twice, with and without the unread tail, and emit the difference. Decoding a
window rather than a single token keeps tokenizer-specific joins (leading
spaces, byte-level merges) right; text ending in U+FFFD is held back because
a multi-byte character is still arriving.
"""

from __future__ import annotations

from ondo.model.tokenizer import Tokenizer

# How many already-read ids the window keeps as context for the next decode.
_CONTEXT_IDS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids)
        # ids[prefix_offset:read_offset] were already emitted and serve as context.
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - _CONTEXT_IDS, 0)
        self.output_text = ""

    def append(self, token_id: int) -> str:
        """Add one generated id; return the text it completed ("" while a character is partial)."""
        return self.extend([token_id])

    def extend(self, token_ids: list[int]) -> str:
        """Add generated ids (any number, two decodes in all); return the text they completed."""
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, replacement characters included."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(
            self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens
        )
