"""A GGUF file's tokenizer, converted once and kept for the next start.

transformers builds a GGUF's tokenizer by parsing the file's whole metadata (its vocabulary
field by field) and converting it: 8.6 s for the embedded 135M model on a two-core CPU,
where the same tokenizer saved with `save_pretrained` loads in 0.5 s (docs/benchmarks.md).
The converted files are kept in the user's cache folder (`$XDG_CACHE_HOME/ondo/tokenizers`,
else `~/.cache/ondo/tokenizers`), one folder per GGUF file and transformers version, the
way `ondo.model.kept_files` keeps any derived set.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from ondo.model.kept_files import is_whole, keep_folder, kept_folder

log = logging.getLogger(__name__)

# Files `save_pretrained` writes for a fast tokenizer; their presence marks a whole folder.
_MARKER = "tokenizer.json"


def cached_folder(gguf_path: str) -> str:
    """Where `gguf_path`'s converted tokenizer is kept (whether or not it is there yet)."""
    import transformers

    return kept_folder("tokenizers", gguf_path, transformers.__version__)


def load_cached(gguf_path: str) -> Any | None:
    """The tokenizer kept for `gguf_path`; None where there is none, or it cannot be read
    (then it is converted again and the folder replaced)."""
    folder = cached_folder(gguf_path)
    if not is_whole(folder, _MARKER):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds on a damaged folder
        log.warning("the kept tokenizer in %s cannot be read (%s); converting %s again", folder, e, gguf_path)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def keep(gguf_path: str, hf_tokenizer: Any) -> None:
    """Save `hf_tokenizer`, converted from `gguf_path`, for the next start; a failure to
    write is logged, never raised."""
    keep_folder(cached_folder(gguf_path), _MARKER, hf_tokenizer.save_pretrained,
                f"{gguf_path}'s converted tokenizer", gguf_path)
