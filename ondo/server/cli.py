"""`ondo serve [MODEL]`: the OpenAI-compatible server on uvicorn.

SIGTERM or Ctrl-C drains: new requests get 503, in-flight ones may finish for up to
--shutdown-timeout seconds, the rest end with finish_reason "abort" and stop_reason
"server shutting down"; then the process exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import argparse
import logging
import os

from ondo.agent.cli import add_agent_args
from ondo.console.serve import add_console_args
from ondo.control.flags import add_governor_args
from ondo.engine.cli import add_engine_args
from ondo.events.cli import add_event_args
from ondo.model.default_model import default_model_path
from ondo.server.limits import DEFAULT_KEEP_ALIVE_S, DEFAULT_MAX_REQUEST_BYTES
from ondo.server.listen import port_number

log = logging.getLogger(__name__)


def served_name(model: str | None, served_model_name: str | None) -> str:
    if served_model_name:
        return served_model_name
    path = model or default_model_path()
    name = os.path.basename(os.path.normpath(path))
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
        name = name.split(".Q")[0]  # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
    return name


def _serve(args: argparse.Namespace) -> int:
    from ondo.server.launch import serve  # uvicorn and the app load only when serving

    return serve(args)


def register(sub: argparse._SubParsersAction) -> None:
    from ondo.engine.restart_policy import DEFAULT_ENGINE_RESTARTS

    p = sub.add_parser("serve", help="serve a model over the OpenAI API")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000, help="0: any free port (the log names it)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (or set ONDO_API_KEY)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="503 beyond this many waiting requests (default: from KV capacity, >= 64)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run on after SIGTERM before abort")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine in its own process (default: yes on a GPU, no on the CPU)")
    p.add_argument("--engine-restarts", type=int, default=DEFAULT_ENGINE_RESTARTS,
                   help="restart a dead engine process up to this many times in a row (with "
                        "backoff) before the server exits non-zero; 0: exit at once")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="413 for a request body larger than this, before it is parsed")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="abort a request still running this many seconds after it was "
                        "admitted (finish_reason abort); default: no deadline")
    p.add_argument("--timeout-keep-alive", type=float, default=DEFAULT_KEEP_ALIVE_S,
                   help="close a keep-alive connection idle this many seconds; longer than "
                        "the clients' and load balancers' own, so that they close first")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="uvicorn's event loop; auto: uvloop where it is installed, else asyncio")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                   help="uvicorn's HTTP parser; auto: httptools where it is installed, else h11")
    p.add_argument("--telemetry", choices=("auto", "nvml", "sim", "off"), default="auto",
                   help="GPU telemetry on /metrics: auto = NVML where there is a GPU, else "
                        "engine-only; nvml falls back to sim; sim = the twin as the GPU")
    p.add_argument("--telemetry-hz", type=float, default=20.0, help="GPU sampling rate (<= 100)")
    p.add_argument("--telemetry-db", default=None, help="also store telemetry in this SQLite file")
    p.add_argument("--sim-gpus", type=int, default=1,
                   help="simulated GPUs (--telemetry sim): each its own plant, twin series and "
                        "governor input")
    p.add_argument("--sim-inlet-c", default=None,
                   help="inlet °C of the simulated GPUs: one value, or one per GPU (25,38)")
    add_event_args(p)
    add_governor_args(p)
    add_agent_args(p)
    add_console_args(p)
    add_engine_args(p)
    p.set_defaults(func=_serve)
