"""A real ondo server on loopback for tests: uvicorn in a thread, the embedded model."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ondo.engine.async_llm import AsyncLLM
from ondo.engine.config import EngineArgs
from ondo.server.app import build_app

MODEL_NAME = "SmolLM2-135M-Instruct"


class ServerThread:
    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_async_llm(max_waiting_requests: int | None = None, **engine_kwargs) -> AsyncLLM:
    kwargs = {"max_model_len": 512, "num_kv_blocks": 512, "device": "cpu"} | engine_kwargs
    return AsyncLLM.from_engine_args(EngineArgs(**kwargs), max_waiting_requests)


def serve(async_llm: AsyncLLM, api_key: str | None = None) -> ServerThread:
    return ServerThread(build_app(async_llm, MODEL_NAME, api_key=api_key))


def wait_for(predicate, timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
