"""bench/import_chain.py and bench/tokenizer_load.py on the CPU: the import log parsed into
the chain that brought a module in, and the tokenizer timed both ways in fresh processes
with the same tokenizer out of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import import_chain  # noqa: E402

LOG = """import time: self [us] | cumulative | imported package
import time:       100 |        100 |     c.deep
import time:       200 |        300 |   b.mid
import time:        50 |         50 |   b.other
import time:      1000 |       1350 | a.top
import time:        10 |         10 | lone
"""


def test_chain_walks_up_from_the_module_to_its_outermost_importer():
    rows = import_chain.parse(LOG)
    assert [r[3] for r in rows] == ["c.deep", "b.mid", "b.other", "a.top", "lone"]
    assert [r[2] for r in rows] == [2, 1, 1, 0, 0]
    assert import_chain.chain(rows, "c.deep") == [("a.top", 1350), ("b.mid", 300), ("c.deep", 100)]
    assert import_chain.chain(rows, "b.other") == [("a.top", 1350), ("b.other", 50)]
    assert import_chain.chain(rows, "missing") == []


def test_import_chain_on_a_real_import():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "import_chain.py"),
                          "--code", "import json", "--why", "json.decoder", "nowhere.at.all"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    why = out.split("why json.decoder:\n")[1].split("\n\n")[0].splitlines()
    # Each line: "<cumulative> s  <module>"; json imports json.decoder, outermost first.
    names = [line.split(" s  ")[1] for line in why]
    assert names[0] == "json" and names[-1] == "json.decoder"
    assert "nowhere.at.all: not imported" in out


def test_import_chain_reports_code_that_fails():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "import_chain.py"),
                          "--code", "import no_such_module_here"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "no_such_module_here" in out.stderr


def test_tokenizer_load_gives_the_same_tokenizer_both_ways(tmp_path):
    from ondo.bench.shapes import write_word_tokenizer

    folder = tmp_path / "words"
    folder.mkdir()
    write_word_tokenizer(str(folder), 300)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenizer_load.py"),
                          "--folder", str(folder), "--repeats", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same_tokenizer"] is True
    assert len(result["ondo_seconds"]) == len(result["auto_seconds"]) == 1
    assert all(s > 0 for s in result["ondo_seconds"] + result["auto_seconds"])
