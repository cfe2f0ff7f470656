"""A stage run by Locust (PyPI `locust`), an established load generator ondo did not write,
and its results read back in `outside_load.summarize`'s form.

Locust runs in a process of its own (`python -m locust`, headless, gevent inside), with
`bench/locustfile_sse.py` as its user: a streamed `/v1/completions` per request, each user
taking the next of the requests given here and waiting for its arrival time, so one
user per request in flight makes a burst (at most `users` at once) or an open-loop
Poisson stage. Locust's own statistics (the request, "TTFT" and "TPOT" entries, with
percentiles rounded as Locust rounds them) are read back beside the per-request records
the user wrote, which give the figures in the same definitions as the other stages.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ondo.bench.outside_load import LoadRequest, LoadResult, summarize

LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locustfile_sse.py"


def locust_command(locustfile: str | Path, base_url: str, users: int,
                   run_time_s: int) -> list[str]:
    """Headless, every user spawned at once, stopped by the user file when the last
    request is done (`--run-time` is only the backstop)."""
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
            "--host", base_url.rstrip("/"), "--users", str(users),
            "--spawn-rate", str(max(users, 1) * 10), "--run-time", f"{run_time_s}s",
            "--stop-timeout", "10", "--only-summary",
            "--loglevel", "WARNING", "--exit-code-on-error", "0"]


def read_records(path: str) -> list[LoadResult]:
    with open(path) as f:
        return [LoadResult(**json.loads(line)) for line in f if line.strip()]


def run_locust(base_url: str, model: str, requests: list[LoadRequest], users: int,
               locustfile: str | Path = LOCUSTFILE, timeout_s: float = 3600.0) -> dict:
    """Runs Locust on `requests` with `users` users; the summary (see `summarize`) with
    Locust's own statistics (`locust_stats`), its version and the client's CPU share."""
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if not requests:
        raise ValueError("no requests to send")
    work = tempfile.mkdtemp(prefix="ondo-locust-")
    spec_path = os.path.join(work, "requests.json")
    records_path = os.path.join(work, "records.jsonl")
    with open(spec_path, "w") as f:
        json.dump({"model": model, "requests": [asdict(r) for r in requests]}, f)
    stats_path = os.path.join(work, "locust_stats.json")
    cmd = locust_command(locustfile, base_url, users, int(timeout_s))
    env = dict(os.environ, ONDO_LOCUST_REQUESTS=spec_path, ONDO_LOCUST_RECORDS=records_path,
               ONDO_LOCUST_STATS=stats_path)
    log_path = os.path.join(work, "locust.log")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout_s + 60)
    wall_s = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not os.path.exists(records_path):
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"locust exited with status {proc.returncode}; "
                           f"its log {log_path}:\n{tail}")
    rows = read_records(records_path)
    t_first = min((r.start_s for r in rows), default=0.0)
    for r in rows:
        r.start_s -= t_first
    # A request Locust never finished (the backstop ended the run) counts as failed.
    rows += [LoadResult(error="not finished before the run ended")
             for _ in range(len(requests) - len(rows))]
    summary = summarize(rows)
    with open(stats_path) as f:
        summary["locust_stats"] = json.load(f)
    summary["locust_version"] = _locust_version()
    summary["users"] = users
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    summary["client_cpu_share_max"] = cpu_s / wall_s if wall_s > 0 else 0.0
    summary["work_dir"] = work
    return summary


def _locust_version() -> str | None:
    try:
        return version("locust")
    except PackageNotFoundError:  # run from a folder on PYTHONPATH, not installed
        return None
