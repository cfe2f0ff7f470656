"""Streaming text out of a growing list of token ids, one delta per token.

vLLM's prefix_offset/read_offset method, applied one id at a time: decode a short
window of recent ids with and without the unread tail and emit the difference. The
window starts with the prompt's last ids, so a sequence's first token joins its prompt
the way the whole text would (a WordPiece or SentencePiece word after the prompt gets
its leading space; byte-level BPE carries its own). Text ending in U+FFFD is held back
because a multi-byte character is still arriving.

Ids are taken one by one even when they come in groups, so the text depends on the ids
alone, never on how they were grouped: a stream that fell behind and decodes its backlog
at once, a step that adds several ids, and `detokenize` over a finished sequence all make
the same text, and a sequence's final text is exactly the concatenation of its deltas.
"""

from __future__ import annotations

from ondo.model.tokenizer import Tokenizer

# How many prompt ids the first window keeps as context.
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
        # The window and what follows it: ids[prefix_offset:read_offset] were emitted and
        # are the context of the next decode; ids[read_offset:] are not emitted yet.
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_IDS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        self.output_text = ""

    def append(self, token_id: int) -> str:
        """Add one generated id; return the text it completed ("" while a character is partial)."""
        ids = self._ids
        ids.append(token_id)
        text = self._decode(ids[self._prefix_offset:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = text[len(self._prefix_text):]
        self._advance()
        self.output_text += delta
        return delta

    def extend(self, token_ids: list[int]) -> str:
        """Add generated ids; return the text they completed (the same as appending each)."""
        return "".join([self.append(t) for t in token_ids])

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, replacement characters included."""
        if self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix_offset:])
        delta = text[len(self._prefix_text):] if len(text) > len(self._prefix_text) else ""
        self._advance()
        self.output_text += delta
        return delta

    def _advance(self) -> None:
        """The ids just emitted become the next window; older ones are dropped."""
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def detokenize(tokenizer: Tokenizer, prompt_token_ids: list[int], output_token_ids: list[int],
               skip_special_tokens: bool = True) -> str:
    """A finished sequence's whole text: the concatenation of the deltas it would have
    streamed, with the tail flushed. Where the text decodes cleanly (no partial character,
    the context's text a prefix of the whole), that is the whole decoded at once after
    the context, two decodes instead of two per id (tested equal, on random ids, for the
    byte-level BPE, WordPiece and SentencePiece families); elsewhere the ids go through
    the detokenizer one by one."""
    context = list(prompt_token_ids[-_CONTEXT_IDS:])
    before = tokenizer.decode(context, skip_special_tokens=skip_special_tokens) if context else ""
    whole = tokenizer.decode(context + list(output_token_ids), skip_special_tokens=skip_special_tokens)
    if whole.startswith(before) and _REPLACEMENT_CHAR not in whole:
        return whole[len(before):]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
    return detokenizer.extend(output_token_ids) + detokenizer.flush()
