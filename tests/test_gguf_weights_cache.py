"""A GGUF file's weights are dequantized once and kept in the user's cache folder: the next
load reads the kept float32 tensors, gives the same weights bit for bit, and never opens
the GGUF; a changed file, a damaged kept folder or an unwritable cache folder cost only a
new read, and a changed or deleted file's old folder is removed."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from gguf import GGMLQuantizationType as QType

from ondo.model import gguf_weights_cache, loader
from ondo.model.kept_files import SOURCE_FILE
from tests.test_model_gguf import write_llama_gguf
from tests.tiny_checkpoints import tiny_hf_model

CPU = torch.device("cpu")


@pytest.fixture
def gguf_path(tmp_path, monkeypatch):
    """A quantized llama GGUF (Q/K rows permuted) under tmp_path, the cache folder beside it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(gguf_weights_cache.CACHE_GB_ENV, raising=False)
    path = str(tmp_path / "model.gguf")
    write_llama_gguf(path, tiny_hf_model("LlamaConfig", {}), QType.Q8_0)
    return path


def weights(path: str, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], object]:
    model, config = loader.load_model(path, "gguf", dtype, CPU)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, config


def kept_folders(tmp_path) -> list[str]:
    root = tmp_path / "cache" / "ondo" / "gguf-weights"
    return sorted(e.name for e in root.iterdir()) if root.is_dir() else []


def never_opened(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(loader, "open_gguf", refuse)


def test_the_second_load_reads_the_kept_weights_bit_for_bit_and_never_opens_the_gguf(gguf_path, tmp_path,
                                                                                     monkeypatch):
    first, config = weights(gguf_path)
    folder = gguf_weights_cache.cached_folder(gguf_path)
    assert kept_folders(tmp_path) == [os.path.basename(folder)]
    assert sorted(os.listdir(folder)) == [SOURCE_FILE, "config.json", "model.safetensors"]
    assert open(os.path.join(folder, SOURCE_FILE)).read() == os.path.abspath(gguf_path)

    never_opened(monkeypatch)
    second, kept_config = weights(gguf_path)
    assert kept_config == config
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert loader.read_model_config(gguf_path, "auto") == config
    # Another dtype comes from the same float32 tensors, rounded as the GGUF path rounds.
    half, _ = weights(gguf_path, torch.bfloat16)
    assert all(torch.equal(half[n], first[n].to(torch.bfloat16)) for n in first)


def test_a_changed_file_is_read_again_and_its_old_folder_removed(gguf_path, tmp_path, monkeypatch):
    before, _ = weights(gguf_path)
    old = kept_folders(tmp_path)
    write_llama_gguf(gguf_path, tiny_hf_model("LlamaConfig", {"rms_norm_eps": 1e-5}), QType.Q4_0)
    os.utime(gguf_path, ns=(1, 1))  # a new modification time, whatever the clock's grain
    after, config = weights(gguf_path)
    assert config.rms_norm_eps == pytest.approx(1e-5)  # stored as float32
    assert not all(torch.equal(before[n], after[n]) for n in before)  # Q4_0 rounds otherwise
    assert len(kept_folders(tmp_path)) == 1 and kept_folders(tmp_path) != old

    monkeypatch.setenv(gguf_weights_cache.CACHE_GB_ENV, "0")  # the GGUF read alone, nothing kept
    fresh, _ = weights(gguf_path)
    assert all(torch.equal(fresh[n], after[n]) for n in fresh)


def test_a_deleted_files_folder_goes_when_another_is_kept(gguf_path, tmp_path):
    weights(gguf_path)
    gone = kept_folders(tmp_path)
    other = str(tmp_path / "other.gguf")
    os.rename(gguf_path, other)
    weights(other)
    assert len(kept_folders(tmp_path)) == 1 and kept_folders(tmp_path) != gone


def test_the_size_limit_keeps_nothing_at_zero_and_refuses_a_bad_value(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_weights_cache.CACHE_GB_ENV, "0")
    weights(gguf_path)
    assert kept_folders(tmp_path) == []
    monkeypatch.setenv(gguf_weights_cache.CACHE_GB_ENV, "two")
    with pytest.raises(ValueError, match="ONDO_GGUF_WEIGHTS_CACHE_GB must be a whole number of gigabytes"):
        weights(gguf_path)
    monkeypatch.setenv(gguf_weights_cache.CACHE_GB_ENV, "-1")
    with pytest.raises(ValueError, match="ONDO_GGUF_WEIGHTS_CACHE_GB must be 0 or more"):
        weights(gguf_path)


def test_a_damaged_kept_folder_is_read_again_and_replaced(gguf_path, monkeypatch, caplog):
    first, _ = weights(gguf_path)
    kept = os.path.join(gguf_weights_cache.cached_folder(gguf_path), "model.safetensors")
    with open(kept, "r+b") as f:
        f.truncate(os.path.getsize(kept) // 2)
    with caplog.at_level(logging.WARNING, logger="ondo.model.gguf_weights_cache"):
        second, _ = weights(gguf_path)
    assert "cannot be read" in caplog.text
    assert all(torch.equal(first[n], second[n]) for n in first)
    never_opened(monkeypatch)  # kept whole again
    third, _ = weights(gguf_path)
    assert all(torch.equal(first[n], third[n]) for n in first)


def test_an_unwritable_cache_folder_still_loads_with_a_warning(gguf_path, tmp_path, monkeypatch, caplog):
    first, _ = weights(gguf_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with caplog.at_level(logging.WARNING, logger="ondo.model.kept_files"):
        second, _ = weights(gguf_path)
    assert "cannot keep" in caplog.text and str(blocker) in caplog.text
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_missing_file_is_named_whether_or_not_weights_are_kept(gguf_path, tmp_path):
    weights(gguf_path)
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match=f"GGUF file not found: {missing}"):
        loader.read_model_config(missing, "auto")
    with pytest.raises(FileNotFoundError, match=f"GGUF file not found: {missing}"):
        weights(missing)
    assert gguf_weights_cache.float32_bytes(loader.open_gguf(gguf_path)) == 4 * sum(
        p.numel() for p in weights(gguf_path)[0].values())
