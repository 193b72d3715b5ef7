"""Closed-loop HTTP load on loopback and the `lumrec serve` processes it measures (benchmarks/serving.py's parts).

A closed loop keeps `concurrency` requests in flight: each client thread sends its next request
as soon as the previous one is answered, so the offered load adapts to the server's speed and the
latency of each request is what a caller waits. Every run is bounded in requests and in seconds.

    >>> stats = summarize([Record(0.0, 0.010, 200), Record(0.01, 0.030, 200), Record(0.02, 0.020, 422)], seconds=1.0)
    >>> stats["requests"], stats["errors"], stats["rejected"], round(stats["p50_ms"], 1)
    (3, 0, 1, 20.0)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Record:
    """One request: when it started (seconds from the run's start), how long it took, its HTTP status (0: no answer)."""

    start: float
    seconds: float
    status: int
    body: dict[str, Any] = field(default_factory=dict)  # the answer's versions and flags (not the scores)


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The q-th percentile of `seconds`, in milliseconds (None for no samples)."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else None


def summarize(records: list[Record], seconds: float) -> dict[str, Any]:
    """Counts, latency percentiles of the answered requests (2xx and 4xx), throughput and errors.

    `errors`: 5xx answers and requests with no answer; `rejected`: 4xx (the request's own fault).
    """
    answered = [r for r in records if 200 <= r.status < 500]
    ok = [r.seconds for r in records if 200 <= r.status < 300]
    return {
        "requests": len(records),
        "ok": len(ok),
        "rejected": sum(400 <= r.status < 500 for r in records),
        "errors": sum(r.status == 0 or r.status >= 500 for r in records),
        "p50_ms": percentile_ms(ok, 50),
        "p99_ms": percentile_ms(ok, 99),
        "mean_ms": float(np.mean(ok) * 1e3) if ok else None,
        "throughput_rps": len(answered) / seconds if seconds > 0 else None,
        "seconds": round(seconds, 3),
    }


def closed_loop(url: str, make_body: Callable[[int], dict], concurrency: int, max_requests: int, max_seconds: float,
                warmup: int = 0, timeout_s: float = 30.0, keep: tuple[str, ...] = ()) -> tuple[list[Record], float]:
    """POST `make_body(i)` to `url` from `concurrency` client threads until `max_requests` are done or `max_seconds` pass.

    The first `warmup` requests (sent before the clock starts, one at a time) are not recorded.
    `keep`: fields of each JSON answer stored on its record (e.g. the knowledge version).
    Returns the records (in completion order) and the run's wall seconds.
    """
    with httpx.Client(timeout=timeout_s) as client:
        for i in range(warmup):
            client.post(url, json=make_body(i))
    lock = threading.Lock()
    records: list[Record] = []
    counter = iter(range(max_requests))
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    def client_loop() -> None:
        with httpx.Client(timeout=timeout_s) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = make_body(warmup + i)
                start = time.perf_counter()
                try:
                    answer = client.post(url, json=body)
                    status, payload = answer.status_code, answer.json() if keep and answer.status_code < 300 else {}
                except (httpx.HTTPError, ValueError):
                    status, payload = 0, {}
                done = time.perf_counter()
                record = Record(start - t0, done - start, status, {k: payload.get(k) for k in keep})
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`lumrec serve BUNDLE ...` as a child process on a free loopback port; waits until ready, stops on exit."""

    def __init__(self, bundle: Path, redis_url: str | None = None, prefix: str = "lumrec", extra: list[str] | None = None,
                 log_path: Path | None = None, threads: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lumrec.cli", "serve", str(bundle), "--port", str(self.port), "--prefix", prefix,
               "--threads", str(threads), *(extra or [])]
        if redis_url:
            cmd += ["--redis", redis_url]
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout_s: float = 120.0, ready: bool = True) -> None:
        """Until /readyz answers 200 (or /healthz, with `ready` False); raises with the server's log on failure."""
        path = "/readyz" if ready else "/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lumrec serve exited with {self.process.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"lumrec serve not {'ready' if ready else 'up'} after {timeout_s:.0f} s: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def metrics_text(url: str) -> str:
    """The server's /metrics page."""
    return httpx.get(url + "/metrics", timeout=5.0).text


def dump_json(path: Path, value: Any) -> None:
    """`value` as indented JSON at `path`, written whole (temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
