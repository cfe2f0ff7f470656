"""ondo: an LLM inference server that knows its own GPU's heat and power."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import ondo.twin` does not pull in torch and the engine.
    if name == "LLM":
        from ondo.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from ondo.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from ondo.engine.structured_outputs import StructuredOutputsParams

        return StructuredOutputsParams
    if name in ("RequestOutput", "CompletionOutput"):
        from ondo.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'ondo' has no attribute {name!r}")
