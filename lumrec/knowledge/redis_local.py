"""A real ``redis-server`` process on a free loopback port, for tests, benchmarks and local serving.

``local_redis_server()`` starts Debian's ``redis-server`` bound to 127.0.0.1 with persistence off
(``--save "" --appendonly no``: a restarted server is empty, as a lost cache node would be), waits
until it answers PING and stops it (and removes its temporary folder) on exit, whatever happens
inside the block. ``kill()`` sends SIGKILL (a crashed server, for fault tests); ``start()`` brings
it back on the same port.

    with local_redis_server() as server:        # a free port, a temporary folder
        server.client().set("k", "v")
        server.kill(); server.start()              # a crash and a restart: empty again

    >>> server = LocalRedis(6390, "/tmp/lumrec-redis")   # not started
    >>> server.url, server.running
    ('redis://127.0.0.1:6390/0', False)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import redis

__all__ = ["LocalRedis", "RedisServerError", "free_port", "local_redis_server"]

BINARY = "redis-server"
_INSTALL = "install it, e.g. `apt-get install redis-server` (Debian/Ubuntu)"


class RedisServerError(RuntimeError):
    """A local redis-server that cannot be found, started or reached; the message names the binary and port."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """One redis-server process on 127.0.0.1:`port` with its files in `workdir`; `start()`, `stop()`, `kill()`."""

    def __init__(self, port: int, workdir: str | os.PathLike, binary: str = BINARY, start_timeout: float = 10.0) -> None:
        self.port, self.workdir, self.binary, self.start_timeout = int(port), Path(workdir), binary, start_timeout
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's own log (its stdout and stderr)."""
        return self.workdir / f"redis-{self.port}.log"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client of this server (keyword arguments go to `redis.Redis.from_url`)."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 5.0)
        return redis.Redis.from_url(self.url, **kwargs)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def start(self) -> "LocalRedis":
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        path = shutil.which(self.binary)
        if path is None:
            raise RedisServerError(f"{self.binary}: not found on PATH; {_INSTALL}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C meant for the test run does not reach the server before its cleanup does.
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    self.process = None
                    raise RedisServerError(f"{path} on 127.0.0.1:{self.port} exited with code {code} while starting; "
                                           f"its log {self.log_path}: {self._log_tail()}")
                try:
                    if probe.ping():
                        return self
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError(f"{path} on 127.0.0.1:{self.port} did not answer PING within {self.start_timeout:g} s; "
                                           f"its log {self.log_path}: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM; SIGKILL after `timeout` seconds)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would (its data is gone: persistence is off)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __repr__(self) -> str:
        return f"LocalRedis(url={self.url!r}, running={self.running})"


@contextmanager
def local_redis_server(port: int | None = None, workdir: str | os.PathLike | None = None, binary: str = BINARY,
                       start_timeout: float = 10.0) -> Iterator[LocalRedis]:
    """A started `LocalRedis` (port None: a free one; workdir None: a temporary folder, removed at exit); stopped at exit."""
    tmp = tempfile.mkdtemp(prefix="lumrec-redis-") if workdir is None else None
    attempts = 3 if port is None else 1  # a free port can be taken between the probe and the server's bind
    server = None
    try:
        for attempt in range(attempts):
            server = LocalRedis(port if port is not None else free_port(), workdir if workdir is not None else tmp, binary, start_timeout)
            try:
                server.start()
                break
            except RedisServerError as err:
                if attempt == attempts - 1 or "exited with code" not in str(err):
                    raise
        yield server
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
