"""A GGUF file's tokenizer, converted once and kept for the next start.

transformers builds a GGUF's tokenizer by parsing the file's whole metadata (its vocabulary
field by field) and converting it: 8.6 s for the embedded 135M model on a two-core CPU,
where the same tokenizer saved with `save_pretrained` loads in 0.5 s (docs/benchmarks.md).
The converted files are kept in the user's cache folder (`$XDG_CACHE_HOME/ondo/tokenizers`,
else `~/.cache/ondo/tokenizers`), one folder per GGUF file, named by a hash of its absolute
path, size and modification time and of the transformers version: a changed file or
library misses and is converted again. Writing is best effort: a cache folder that cannot
be written only costs the conversion at the next start, with a warning. A folder is moved
into place whole, so a reader never sees half of one, and two processes converting the
same file at once both keep working.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

from ondo.model.user_cache import user_cache_dir

log = logging.getLogger(__name__)

# Files `save_pretrained` writes for a fast tokenizer; their presence marks a whole folder.
_MARKER = "tokenizer.json"


def cache_root() -> str:
    return user_cache_dir("tokenizers")


def cached_folder(gguf_path: str) -> str:
    """Where `gguf_path`'s converted tokenizer is kept (whether or not it is there yet)."""
    import transformers

    stat = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    name = os.path.basename(gguf_path).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def load_cached(gguf_path: str) -> Any | None:
    """The tokenizer kept for `gguf_path`; None where there is none, or it cannot be read
    (then it is converted again and the folder replaced)."""
    folder = cached_folder(gguf_path)
    if not os.path.isfile(os.path.join(folder, _MARKER)):
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
    folder = cached_folder(gguf_path)
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(folder))
        try:
            hf_tokenizer.save_pretrained(staging)
            if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, _MARKER)):
                shutil.rmtree(folder, ignore_errors=True)  # not one of ours whole
            os.rename(staging, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, _MARKER)):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # another process's folder won
    except Exception as e:  # a full or read-only disk: convert again next time
        log.warning("cannot keep %s's converted tokenizer in %s: %s", gguf_path, folder, e)
