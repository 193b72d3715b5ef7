"""`lumrec serve BUNDLE`: the ranking endpoint (``serving_app.create_app``) under uvicorn.

    lumrec serve bundles/2026-01-08 --redis redis://127.0.0.1:6379/0 --prefix lumrec --port 8080

One process, one uvicorn worker; requests are scored in parallel in its thread pool (see
``docs/serving.md``). SIGTERM (or Ctrl-C) stops accepting connections and lets the requests in flight
finish. ``--port 0`` binds a free port; the start line names the address bound.

``running_server(app)`` serves an app from a thread of the calling process on a free loopback port
(tests and benchmarks): ``with running_server(create_app(config)) as server: httpx.post(server.url + "/rank", ...)``.

    >>> sock = bind("127.0.0.1", 0)  # port 0: a free port, what --port 0 does
    >>> sock.getsockname()[1] > 0
    True
    >>> sock.close()
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Iterator, Mapping

import uvicorn
from fastapi import FastAPI

from lumrec.errors import CheckpointLoadError, UserError
from lumrec.knowledge.redis_store import RedisKnowledgeConfig
from lumrec.modules.serving.bundle import BundleError
from lumrec.pipelines.serving_app import ServeConfig, create_app

__all__ = ["ADMIN_TOKEN_ENV", "RunningServer", "admin_settings", "bind", "is_loopback", "main", "running_server", "uvicorn_server"]

log = logging.getLogger("lumrec.serve")

GRACEFUL_SHUTDOWN_S = 10  # the longest SIGTERM waits for requests in flight


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Raises UserError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and without it
    # Nagle's algorithm holds each response's second write for the client's delayed ACK (~40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another port, or 0 "
                        "for a free one") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM ends the process with status 0 after the graceful shutdown.

    uvicorn raises a caught signal again once it has shut down, so a SIGTERM would end the process
    killed by it (status -15); SIGTERM is how a supervisor asks `lumrec serve` to stop, a clean exit.
    Ctrl-C still ends as interrupted (130).
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)


def uvicorn_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server of `app`: no access log (the metrics count requests), graceful shutdown bounded."""
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_config=None)
    return _Server(config)


@dataclass
class RunningServer:
    """A server started by `running_server`: its base URL, the app, and the uvicorn server."""

    url: str
    app: FastAPI
    server: uvicorn.Server


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", start_timeout_s: float = 30.0) -> Iterator[RunningServer]:
    """Serve `app` from a thread on a free port of `host` until the block ends (then a graceful shutdown)."""
    sock = bind(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"uvicorn on {host}:{port} did not start within {start_timeout_s} s (see its log above)")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://{host}:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_S + 5)
        sock.close()


ADMIN_TOKEN_ENV = "LUMREC_ADMIN_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is only reachable from this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def admin_settings(host: str, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """ServeConfig's `admin` / `admin_token` for a server bound to `host`.

    /admin/reload loads code from a path the caller names, so it is served only on a loopback address
    or with a token (LUMREC_ADMIN_TOKEN, read from the environment: a flag would show in `ps`).

    >>> admin_settings("127.0.0.1", {}), admin_settings("0.0.0.0", {})["admin"], admin_settings("0.0.0.0", {ADMIN_TOKEN_ENV: "t"})["admin"]
    ({'admin': True, 'admin_token': None}, False, True)
    """
    token = environ.get(ADMIN_TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        log.warning("serve: --host %s is not a loopback address and %s is not set: POST /admin/reload is not served "
                    "(set %s to a secret, or swap bundles with --watch)", host, ADMIN_TOKEN_ENV, ADMIN_TOKEN_ENV)
        return {"admin": False, "admin_token": None}
    return {"admin": True, "admin_token": token}


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of `lumrec serve`'s flags."""
    names = {"bundle": "bundle", "redis": "redis_url", "prefix": "redis_prefix", "on_redis_down": "on_redis_down",
             "max_candidates": "max_candidates", "refresh_seconds": "knowledge_refresh_s", "watch": "watch",
             "threads": "torch_threads", "workers": "worker_threads"}
    values = {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None}
    values.update(admin_settings(getattr(args, "host", "127.0.0.1")))
    try:
        config = ServeConfig(**values)
    except ValueError as err:
        raise UserError(str(err)) from err
    if config.redis_url is not None:
        try:
            RedisKnowledgeConfig(url=config.redis_url, prefix=config.redis_prefix)
        except ValueError as err:
            raise UserError(f"--redis {config.redis_url} --prefix {config.redis_prefix}: {err}") from err
    return config


def main(args: argparse.Namespace) -> int:
    """Run `lumrec serve` until SIGTERM or Ctrl-C."""
    config = config_from_args(args)
    sock = bind(args.host, args.port)  # bound before the bundle loads: a taken port fails at once
    try:
        app = create_app(config)
    except BundleError as err:  # missing, damaged or failing its parity check: export it again (exit 66, as a bad checkpoint)
        raise CheckpointLoadError(str(err)) from err
    state = app.state.serving
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    link = state.knowledge
    knowledge = "none (LUM inputs at the missing-knowledge default)"
    if config.redis_url:
        knowledge = (f"redis {config.redis_url} prefix {config.redis_prefix!r} "
                     f"{'version ' + str(link.version) if link.up else 'down (see the warning above)'}, "
                     f"on_redis_down={config.on_redis_down}")
    log.info("serve: bundle %s version %s (%s), knowledge %s, at http://%s:%d", state.bundle_path, state.bundle.version,
             "LUM features" if state.bundle.uses_lum else "no LUM features", knowledge, host, port)
    server = uvicorn_server(app, log_level="info")
    # uvicorn handles SIGTERM and SIGINT: stop accepting, finish requests in flight, run the lifespan's shutdown.
    server.run(sockets=[sock])
    return 0
