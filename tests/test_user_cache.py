"""ondo's folders in the user's cache: $XDG_CACHE_HOME when set, else ~/.cache."""

from __future__ import annotations

import os

from ondo.model import fusion, gguf_tokenizer_cache
from ondo.model.user_cache import user_cache_dir


def test_the_cache_folders_follow_xdg_cache_home_else_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("tokenizers") == str(tmp_path / "xdg" / "ondo" / "tokenizers")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert os.path.dirname(gguf_tokenizer_cache.cached_folder(str(model))) == user_cache_dir("tokenizers")

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir("inductor") == str(tmp_path / "home" / ".cache" / "ondo" / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    fusion.use_user_cache_dir()
    assert (tmp_path / "home" / ".cache" / "ondo" / "inductor").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == user_cache_dir("inductor")


def test_an_empty_xdg_cache_home_counts_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_cache_dir("tokenizers") == str(tmp_path / ".cache" / "ondo" / "tokenizers")
