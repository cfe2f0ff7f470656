"""ondo: an LLM inference server that knows its own GPU's heat and power."""

from ondo.engine.llm import LLM
from ondo.engine.outputs import CompletionOutput, RequestOutput
from ondo.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
