"""The knowledge base and the agent in a process of their own, for `ondo serve`.

Why a process: the server's telemetry store writes the database with Python's `sqlite3`
module, and the knowledge base reaches the same file through apsw (sqlite-vec loads only
there): two copies of the SQLite library. In one process, two copies do not see each
other's POSIX locks on a file (both are the same process's locks) and a close by one drops
the other's (SQLite's "How To Corrupt An SQLite Database File", 2.2.1): the store and the
knowledge base writing one file from one process lost event-log entries in 5 of 12 trials.
Across processes the locks work, so the knowledge base lives here, in a child started with
"spawn", and the server's process never opens the file with apsw.

    proc = AgentProcess(db_path, endpoint, limits)
    proc.index(entries)            # log entries the store may not have written yet
    result = proc.recommend(ctx)   # an AgentResult; the model is asked from the child
    proc.close()

Each call blocks the caller (the live agent's own thread) until the child answers, at most
`reply_timeout_s`; a child that does not answer in time, or dies, is stopped and the call
raises `AgentProcessError`: the next call starts a fresh one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ondo.agent.actions import GpuLimits
from ondo.agent.client import ModelEndpoint

log = logging.getLogger(__name__)

# Beyond the model call's own deadline: starting the process, loading the embedding model and
# indexing the runbooks on the first call (seconds to tens of seconds on a loaded CPU).
START_ALLOWANCE_S = 300.0


class AgentProcessError(RuntimeError):
    """The child failed a call (its traceback in the message), did not answer, or died."""


def run_agent_process(conn: Connection, db_path: str | None, endpoint: ModelEndpoint | None,
                      limits: GpuLimits, log_level: int) -> None:
    """The child's main: one KnowledgeBase and Agent, serving calls until told to stop."""
    # The server handles SIGINT/SIGTERM and then closes this process; a signal sent to the
    # whole process group must not kill it in the middle of a write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s [agent]: %(message)s")
    from ondo.agent.agent import Agent
    from ondo.agent.knowledge import KnowledgeBase

    kb = agent = None
    try:
        while True:
            try:
                op, arg = conn.recv()
            except (EOFError, OSError):  # the server is gone
                return
            if op == "stop":
                conn.send(("ok", None))
                return
            try:
                if kb is None:
                    kb = KnowledgeBase(db_path or ":memory:")
                    kb.sync_runbooks()
                    agent = Agent(kb, endpoint, limits)
                if op == "index":
                    n = kb.index_log() if db_path is not None else 0
                    conn.send(("ok", n + kb.index_entries(arg)))
                elif op == "recommend":
                    conn.send(("ok", agent.recommend(arg)))
                else:
                    conn.send(("error", f"unknown call {op!r}"))
            except Exception:
                conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        if kb is not None:
            kb.close()


class AgentProcess:
    def __init__(self, db_path: str | None, endpoint: ModelEndpoint | None,
                 limits: GpuLimits, reply_timeout_s: float | None = None) -> None:
        self.db_path, self.endpoint, self.limits = db_path, endpoint, limits
        deadline_s = endpoint.timeout_s if endpoint is not None else 0.0
        self.reply_timeout_s = reply_timeout_s or deadline_s + START_ALLOWANCE_S
        self._conn: Connection | None = None
        self._process: Any = None

    def _start(self) -> Connection:
        ctx = mp.get_context("spawn")  # a server may hold CUDA, threads and locks: no fork
        parent, child = ctx.Pipe()
        self._process = ctx.Process(
            target=run_agent_process, name="ondo-agent", daemon=True,
            args=(child, self.db_path, self.endpoint, self.limits, logging.getLogger().level))
        self._process.start()
        child.close()
        self._conn = parent
        log.info("agent: knowledge base process %d on %s", self._process.pid,
                 self.db_path or "memory")
        return parent

    def _call(self, op: str, arg: Any) -> Any:
        conn = self._conn or self._start()
        try:
            conn.send((op, arg))
            if not conn.poll(self.reply_timeout_s):
                self.kill()
                raise AgentProcessError(f"no answer to {op} within {self.reply_timeout_s:.0f} s")
            status, value = conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self.kill()
            raise AgentProcessError(f"the agent's process died during {op}: {e!r}") from None
        if status != "ok":
            raise AgentProcessError(f"{op} failed in the agent's process:\n{value}")
        return value

    def index(self, entries: list[dict[str, Any]]) -> int:
        """Index the file's log past what is indexed, then `entries`; documents written."""
        return int(self._call("index", entries))

    def recommend(self, ctx: Any) -> Any:
        """`Agent.recommend(ctx)` in the child: an AgentResult."""
        return self._call("recommend", ctx)

    def kill(self) -> None:
        """Stop the process at once (a call may be waiting on it)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)
        if self._conn is not None:
            self._conn.close()
        self._conn, self._process = None, None

    def close(self, timeout_s: float = 10.0) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(("stop", None))
            if self._conn.poll(timeout_s):
                self._conn.recv()
            self._process.join(timeout_s)
        except (EOFError, OSError, BrokenPipeError):
            pass
        self.kill()
