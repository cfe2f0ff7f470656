"""The soak: mixed load against an ondo server for a fixed time, in phases, checked after
each (`ondo.bench.soak_checks` decides; this module does the I/O).

Traffic is open-loop (Poisson arrivals at `request_rate`), each request drawn from a mix:
- stream: a streamed completion read to its end;
- plain: a completion answered in one body;
- cancel: a stream the client leaves after a few chunks;
- slow: a stream read slowly, with a long pause in the middle;
- bad: one of `BAD_INPUTS` (malformed JSON, a body over the size limit, an unknown
  model, ...), which must get a 4xx and nothing else;
and every `burst_every_s`, `burst_size` short requests at once (above the queue limit:
some are shed with 503 queue_full, the documented admission control). Half the prompts
are text (tokenized by the server), half token ids. A phase may kill the engine process
(SIGKILL) at a given second: the window from the kill to /health answering 200 again is
where 503s and failed requests are allowed. Every `sample_every_s` the server's and the
engine's resident memory (from /proc, where the server's pid is known) and the GPU's
used memory (NVML, where there is a GPU) are sampled. After each phase the run waits for
the server to be at rest and checks its request ledger and KV cache from /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import aiohttp

from ondo.bench.soak_checks import (
    CLIENT_ABORTED,
    COMPLETED,
    FAILED,
    LOST,
    REJECTED,
    SERVER_ERROR,
    SHED,
    UNAVAILABLE,
    VIOLATION,
    Check,
    MemorySeries,
    SoakRecord,
    Window,
    check_bad_inputs_rejected,
    check_every_request_ended_once,
    check_ledger,
    check_memory_flat,
    check_no_unexpected_5xx,
    check_throughput_stable,
    check_ttft_stable,
    headline,
    outcome_counts,
    verdict,
)

_WORDS = ("time person year way day thing man world life hand part child eye woman place work "
          "week case point number group problem fact water light story river mountain").split()
DEFAULT_MIX = {"stream": 0.45, "plain": 0.25, "cancel": 0.1, "slow": 0.1, "bad": 0.1}


@dataclass
class Phase:
    name: str
    duration_s: float
    kill_engine_at_s: float | None = None  # seconds into the phase
    timed: bool = False  # the steady load whose memory, throughput and TTFT are judged


@dataclass
class SoakConfig:
    base_url: str
    phases: list[Phase]
    request_rate: float  # requests per second, Poisson
    input_len: tuple[int, int] = (100, 1024)  # uniform, tokens (token-id prompts) or words
    output_len: tuple[int, int] = (100, 1024)
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    burst_every_s: float = 60.0
    burst_size: int = 0  # 0: no bursts
    max_request_bytes: int = 4 * 1024 * 1024  # the server's, for the oversized bad input
    max_model_len: int = 4096  # the server's, for the too-long bad input
    token_id_vocab: int = 32000  # token-id prompts draw from [100, vocab - 100)
    server_pid: int | None = None  # for /proc memory and the engine kill
    sample_every_s: float = 5.0
    progress_every_s: float = 60.0  # a progress line this often (0: none)
    warmup_s: float = 60.0  # of the timed phase, before memory is judged
    window_s: float = 300.0  # throughput: first vs last window of the timed phase
    request_timeout_s: float = 900.0
    rest_timeout_s: float = 120.0
    judge_timed: bool = True  # False: memory, throughput and TTFT are reported, not judged
    # Memory and TTFT judged even where the run is not a timed one (CI: memory must stay
    # flat; TTFT must not run away, within the looser bound below on a shared CPU).
    judge_memory_and_ttft: bool = False
    ttft_tolerance: float = 0.25
    ttft_floor_s: float = 0.010
    seed: int = 0


@dataclass
class SoakReport:
    checks: list[Check]
    records: list[SoakRecord]
    memory: list[MemorySeries]
    restarts: list[Window]
    phases: dict[str, tuple[float, float]]
    timed: bool

    @property
    def ok(self) -> bool:
        return verdict(self.checks, self.timed)

    def summary(self) -> dict:
        done = [r for r in self.records if r.outcome == COMPLETED]
        span = max((r.end_s for r in self.records), default=0.0) - min(
            (r.start_s for r in self.records), default=0.0)
        outcomes = outcome_counts(self.records)
        return {
            "ok": self.ok, "requests": len(self.records), "outcomes": outcomes,
            **headline(self.checks, outcomes),
            "kinds": dict(sorted({r.kind: sum(1 for q in self.records if q.kind == r.kind)
                                  for r in self.records}.items())),
            "output_tokens": sum(r.output_tokens for r in done),
            "output_tokens_per_s": sum(r.output_tokens for r in done) / span if span else 0.0,
            "engine_restart_windows_s": [round(w.end_s - w.start_s, 2) for w in self.restarts],
            "checks": [asdict(c) for c in self.checks],
        }


# -- the server, seen from outside -------------------------------------------------------
def child_pids(pid: int) -> list[int]:
    pids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def engine_pids(server_pid: int) -> list[int]:
    """The server's children that run the engine (not multiprocessing's resource tracker)."""
    out = []
    for pid in child_pids(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"resource_tracker" not in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def rss_bytes(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


class GpuMemory:
    """The GPU's used memory (read only): NVML through nvidia-ml-py, else `nvidia-smi`'s
    query; absent without a GPU. `source` says which."""

    def __init__(self) -> None:
        self.handle = None
        self.source: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
            self.source = "nvml"
        except Exception:
            self.handle = None
            if _nvidia_smi_used_bytes() is not None:
                self.source = "nvidia-smi"

    def used_bytes(self) -> float | None:
        if self.handle is not None:
            return float(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        if self.source == "nvidia-smi":
            return _nvidia_smi_used_bytes()
        return None


def _nvidia_smi_used_bytes() -> float | None:
    """GPU 0's used memory from `nvidia-smi --query-gpu=memory.used` (MiB), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "--id=0"], capture_output=True, text=True, timeout=10, check=True)
        return float(out.stdout.strip().splitlines()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each `ondo:` family's samples summed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ondo:"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


# -- one request -------------------------------------------------------------------------
async def _sse_payloads(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Every `data:` payload of the body, [DONE] included, to the body's end."""
    buffer = b""
    async for data in response.content.iter_any():
        buffer = (buffer + data).replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    yield line[5:].strip()


async def _error_outcome(response: aiohttp.ClientResponse, rec: SoakRecord) -> None:
    body = await response.read()
    try:
        error = json.loads(body)["error"]
        rec.error_code, rec.detail = error.get("code"), str(error.get("message", ""))[:200]
    except (ValueError, KeyError, TypeError):
        rec.detail = body[:200].decode(errors="replace")
    status = response.status
    if 400 <= status < 500:
        rec.outcome = REJECTED
    elif status == 503 and rec.error_code == "queue_full":
        rec.outcome = SHED
    elif status == 503 and rec.error_code == "unavailable":
        rec.outcome = UNAVAILABLE
    elif status == 500 and rec.error_code == "engine_error":
        rec.outcome = FAILED  # accepted, then failed in the engine
    else:
        rec.outcome = SERVER_ERROR


async def _streamed(session: aiohttp.ClientSession, url: str, body: dict, rec: SoakRecord,
                    leave_after: int | None = None, slow_s: float = 0.0) -> None:
    async with session.post(url, json=body) as r:
        rec.status = r.status
        if r.status != 200:
            await _error_outcome(r, rec)
            return
        ends, done, after_done, chunks = 0, False, 0, 0
        error = None
        async for payload in _sse_payloads(r):
            if done:
                after_done += 1
                continue
            if payload == b"[DONE]":
                done = True
                continue
            # Token chunks are told apart without parsing them: the client's CPU per chunk
            # bounds the load one soak process can send.
            token = b'"finish_reason":null' in payload and not payload.startswith(b'{"error"')
            if not token:
                msg = json.loads(payload)
                if "error" in msg:
                    ends += 1
                    error = msg["error"]
                    continue
                if msg.get("usage"):
                    rec.output_tokens = msg["usage"]["completion_tokens"]
                choices = msg.get("choices") or []
                if choices and choices[0].get("finish_reason") is not None:
                    ends += 1
                token = bool(choices and choices[0].get("text"))
            if token:
                chunks += 1
                if rec.first_token_s is None:
                    rec.first_token_s = time.monotonic()
            if leave_after is not None and chunks >= leave_after and not ends:
                rec.outcome = CLIENT_ABORTED
                return  # leaving the block closes the connection: the server aborts it
            if slow_s:
                await asyncio.sleep(slow_s * (20 if chunks == 3 else 1))  # and one long pause
        if ends != 1 or not done or after_done:
            rec.outcome = VIOLATION
            rec.detail = f"{ends} ends, [DONE] {'seen' if done else 'missing'}, {after_done} after it"
        elif error is not None:
            rec.outcome, rec.error_code = FAILED, error.get("code")
            rec.detail = str(error.get("message", ""))[:200]
        else:
            rec.outcome = COMPLETED


async def _plain(session: aiohttp.ClientSession, url: str, body: dict, rec: SoakRecord) -> None:
    async with session.post(url, json=body) as r:
        rec.status = r.status
        if r.status != 200:
            await _error_outcome(r, rec)
            return
        answer = await r.json()
        choice = answer["choices"][0]
        if choice.get("finish_reason") is None:
            rec.outcome, rec.detail = VIOLATION, "no finish_reason"
            return
        rec.first_token_s = time.monotonic()
        rec.output_tokens = answer["usage"]["completion_tokens"]
        rec.outcome = COMPLETED


def bad_inputs(config: SoakConfig) -> dict[str, tuple[bytes, str]]:
    """Inputs that must be refused with a 4xx: (body, content type)."""
    def js(obj: object) -> bytes:
        return json.dumps(obj).encode()

    return {
        "json": (b'{"prompt": "x", "max_tokens": ', "application/json"),
        "max_tokens": (js({"prompt": "x", "max_tokens": -1}), "application/json"),
        "model": (js({"model": "no-such-model", "prompt": "x"}), "application/json"),
        "token_id": (js({"prompt": [10**9, 5]}), "application/json"),
        "stop_list": (js({"prompt": "x", "stop": [f"s{i}" for i in range(64)]}), "application/json"),
        "too_long": (js({"prompt": [100] * (config.max_model_len + 1), "max_tokens": 1}),
                     "application/json"),
        "oversized": (b'{"prompt": "' + b"a" * config.max_request_bytes + b'"}', "application/json"),
        "surrogate": (b'{"prompt": "\\ud800", "max_tokens": 2}', "application/json"),
        "temperature": (js({"prompt": "x", "temperature": "hot"}), "application/json"),
        "not_json": (b"prompt=hello", "application/x-www-form-urlencoded"),
    }


class Traffic:
    """Draws and sends the requests of a soak."""

    def __init__(self, config: SoakConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.url = config.base_url.rstrip("/") + "/v1/completions"
        self.rng = random.Random(config.seed)
        self.bad = bad_inputs(config)
        kinds, weights = zip(*config.mix.items())
        self.kinds, self.weights = list(kinds), list(weights)
        self.sent: list[SoakRecord] = []  # every request so far, ended or not

    def _body(self, short: bool = False) -> dict:
        rng = self.rng
        n_in = rng.randint(*self.config.input_len) if not short else rng.randint(1, 16)
        n_out = rng.randint(*self.config.output_len) if not short else 8
        if rng.random() < 0.5:
            vocab = self.config.token_id_vocab
            prompt: str | list[int] = [rng.randrange(100, vocab - 100) for _ in range(n_in)]
        else:
            prompt = " ".join(rng.choice(_WORDS) for _ in range(n_in))
        return {"prompt": prompt, "max_tokens": n_out, "ignore_eos": True,
                "temperature": rng.choice([0.0, 0.8])}

    def draw(self) -> str:
        return self.rng.choices(self.kinds, self.weights)[0]

    async def send(self, kind: str, short: bool = False) -> SoakRecord:
        rec = SoakRecord(kind, time.monotonic())
        self.sent.append(rec)
        try:
            await asyncio.wait_for(self._send(kind, rec, short), self.config.request_timeout_s)
        except Exception as e:  # a reset, a timeout, a body that is not what it should be
            rec.outcome, rec.detail = LOST, f"{type(e).__name__}: {e}"[:200]
        rec.end_s = time.monotonic()
        return rec

    async def _send(self, kind: str, rec: SoakRecord, short: bool) -> None:
        if kind == "bad":
            what = self.rng.choice(sorted(self.bad))
            rec.kind = f"bad:{what}"
            body, content_type = self.bad[what]
            async with self.session.post(self.url, data=body,
                                         headers={"Content-Type": content_type}) as r:
                rec.status = r.status
                if r.status == 200:
                    rec.outcome, rec.detail = VIOLATION, "a bad input was accepted"
                    await r.read()
                else:
                    await _error_outcome(r, rec)
            return
        body = self._body(short)
        if kind == "plain" or (kind == "burst" and self.rng.random() < 0.5):
            await _plain(self.session, self.url, body, rec)
            return
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        leave_after = self.rng.randint(1, 5) if kind == "cancel" else None
        await _streamed(self.session, self.url, body, rec, leave_after,
                        slow_s=0.02 if kind == "slow" else 0.0)


# -- a run -------------------------------------------------------------------------------
async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


async def wait_at_rest(session: aiohttp.ClientSession, base: str, timeout_s: float) -> dict[str, float]:
    """The server's counters once nothing runs or waits and the ledger balances (or at the
    timeout, as they are)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, text = await _get(session, base + "/metrics")
            m = parse_metrics(text)
            at_rest = (m.get("ondo:num_requests_running", 1) == 0
                       and m.get("ondo:num_requests_waiting", 1) == 0
                       and m.get("ondo:requests_admitted_total", -1) == m.get("ondo:requests_ended_total", -2))
            if at_rest or time.monotonic() > deadline:
                return m
        except (aiohttp.ClientError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                return {}
        await asyncio.sleep(0.2)


async def _sample_memory(config: SoakConfig, series: dict[str, MemorySeries], t0: float,
                         stop: asyncio.Event) -> None:
    gpu = GpuMemory()
    while not stop.is_set():
        t = time.monotonic() - t0
        if config.server_pid is not None:
            series["server_rss"].t_s.append(t)
            series["server_rss"].bytes_.append(rss_bytes(config.server_pid))
            engines = engine_pids(config.server_pid)
            if engines:
                series["engine_rss"].t_s.append(t)
                series["engine_rss"].bytes_.append(sum(rss_bytes(p) for p in engines))
        used = gpu.used_bytes()
        if used is not None:
            series["gpu_memory"].t_s.append(t)
            series["gpu_memory"].bytes_.append(used)
        try:
            await asyncio.wait_for(stop.wait(), config.sample_every_s)
        except asyncio.TimeoutError:
            pass


def progress(sent: list[SoakRecord], series: dict[str, MemorySeries], now_s: float,
             t0: float, window_s: float) -> dict:
    """Where a run stands: requests sent and ended so far by outcome, the completed requests'
    output tokens per second over the last `window_s`, the latest memory samples, and what
    happened to the first requests lost or broken (so a run cut short still says why)."""
    ended = [r for r in sent if r.end_s]
    recent = [r for r in ended if r.outcome == COMPLETED and r.end_s > now_s - window_s]
    out = {"t_s": round(now_s - t0, 1), "sent": len(sent), "ended": len(ended),
           "outcomes": outcome_counts(ended),
           "output_tokens_per_s": round(sum(r.output_tokens for r in recent) / window_s, 1)}
    bad = [r for r in ended if r.outcome in (LOST, VIOLATION)]
    if bad:
        out["lost_or_broken"] = [{"t_s": round(r.start_s - t0, 1), "kind": r.kind,
                                  "outcome": r.outcome, "status": r.status,
                                  "detail": r.detail} for r in bad[:5]]
    for name, s in series.items():
        if s.bytes_:
            out[f"{name}_mib"] = round(s.bytes_[-1] / 2**20, 1)
    return out


async def _report_progress(config: SoakConfig, traffic: Traffic, series: dict[str, MemorySeries],
                           t0: float, stop: asyncio.Event,
                           on_progress: Callable[[dict], None]) -> None:
    every = config.progress_every_s
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            on_progress(progress(traffic.sent, series, time.monotonic(), t0, every))


async def _kill_engine(config: SoakConfig, session: aiohttp.ClientSession, delay_s: float,
                       restarts: list[Window]) -> None:
    await asyncio.sleep(delay_s)
    pids = engine_pids(config.server_pid) if config.server_pid else []
    if not pids:
        raise RuntimeError("cannot kill the engine: no engine process under the server's pid")
    window = Window(time.monotonic(), float("inf"))
    restarts.append(window)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    while True:
        try:
            status, _ = await _get(session, config.base_url.rstrip("/") + "/health")
            if status == 200:
                break
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.2)
    window.end_s = time.monotonic()


async def _phase(config: SoakConfig, traffic: Traffic, session: aiohttp.ClientSession,
                 phase: Phase, restarts: list[Window]) -> list[SoakRecord]:
    rng = traffic.rng
    tasks: list[asyncio.Task] = []
    side: list[asyncio.Task] = []
    start = time.monotonic()
    if phase.kill_engine_at_s is not None:
        side.append(asyncio.create_task(_kill_engine(config, session, phase.kill_engine_at_s, restarts)))
    next_burst = start + config.burst_every_s
    while time.monotonic() - start < phase.duration_s:
        tasks.append(asyncio.create_task(traffic.send(traffic.draw())))
        if config.burst_size and time.monotonic() >= next_burst:
            tasks += [asyncio.create_task(traffic.send("burst", short=True))
                      for _ in range(config.burst_size)]
            next_burst += config.burst_every_s
        await asyncio.sleep(rng.expovariate(config.request_rate))
    records = list(await asyncio.gather(*tasks))
    for task in side:
        await task
    return records


async def run_soak(config: SoakConfig,
                   on_progress: Callable[[dict], None] | None = None) -> SoakReport:
    """The phases in turn, then the checks. `on_progress` gets `progress(...)` every
    `config.progress_every_s` while the load runs, so a long run says where it stands."""
    base = config.base_url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    series = {name: MemorySeries(name) for name in ("server_rss", "engine_rss", "gpu_memory")}
    records: list[SoakRecord] = []
    restarts: list[Window] = []
    checks: list[Check] = []
    spans: dict[str, tuple[float, float]] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        traffic = Traffic(config, session)
        t0 = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_memory(config, series, t0, stop))
        side = [sampler]
        if on_progress is not None and config.progress_every_s > 0:
            side.append(asyncio.create_task(
                _report_progress(config, traffic, series, t0, stop, on_progress)))
        for phase in config.phases:
            p0 = time.monotonic()
            phase_records = await _phase(config, traffic, session, phase, restarts)
            p1 = time.monotonic()
            spans[phase.name] = (p0, p1)
            records += phase_records
            m = await wait_at_rest(session, base, config.rest_timeout_s)
            checks.append(check_ledger(phase.name, m.get("ondo:requests_admitted_total", -1),
                                       m.get("ondo:requests_ended_total", -2),
                                       m.get("ondo:num_requests_running", -1),
                                       m.get("ondo:num_requests_waiting", -1),
                                       m.get("ondo:kv_cache_usage_perc", -1)))
        stop.set()
        await asyncio.gather(*side)
    checks = [check_every_request_ended_once(records), check_no_unexpected_5xx(records, restarts),
              check_bad_inputs_rejected(records), *checks]
    timed = [p for p in config.phases if p.timed]
    for phase in timed:
        a, b = spans[phase.name]
        after_s = a - t0 + min(config.warmup_s, phase.duration_s / 2)
        judged = [check_memory_flat(s, after_s) for s in series.values() if s.t_s]
        judged.append(check_ttft_stable([r for r in records if r.kind in ("stream", "slow")],
                                        a + config.warmup_s, b, config.ttft_tolerance,
                                        config.ttft_floor_s))
        if config.judge_memory_and_ttft:
            judged = [dataclasses.replace(c, timed=False) for c in judged]
        checks += judged[:-1]
        checks.append(check_throughput_stable(records, a + config.warmup_s, b, config.window_s))
        checks.append(judged[-1])
    return SoakReport(checks, records, list(series.values()), restarts, spans,
                      bool(timed) and config.judge_timed)
