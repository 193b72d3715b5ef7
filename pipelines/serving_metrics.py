"""Prometheus metrics of the ranking endpoint, in a registry of its own (several apps may share one process).

    >>> metrics = ServeMetrics()
    >>> metrics.knowledge_misses.inc()
    >>> metrics.set_model("ranker@abc", "bundles/2026-01-08")
    >>> text, _ = metrics.render()
    >>> [line for line in text.decode().splitlines() if line.startswith(("lumrec_serve_knowledge_misses_total", "lumrec_serve_model_info"))]
    ['lumrec_serve_knowledge_misses_total 1.0', 'lumrec_serve_model_info{bundle="bundles/2026-01-08",version="ranker@abc"} 1.0']
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["LATENCY_BUCKETS", "PATHS", "ServeMetrics"]

# Seconds; dense around the 30 ms budget of a ranking request.
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
# Paths labelled by name; any other path is "other" (a scan of random URLs must not grow the label set).
PATHS = ("/rank", "/healthz", "/readyz", "/metrics", "/admin/reload")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ServeMetrics:
    """The endpoint's counters, histograms and info metrics, and the ASGI middleware that counts every request."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lumrec_serve_requests", "HTTP requests by path and status code", ["path", "status"], registry=r)
        self.latency = Histogram("lumrec_serve_request_seconds", "request latency in seconds, from the first byte read to the "
                                 "last byte sent, by path", ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.knowledge_misses = Counter("lumrec_serve_knowledge_misses", "ranked requests whose user has no knowledge in the "
                                        "serving version (unknown users; scored with the missing-knowledge default)", registry=r)
        self.knowledge_errors = Counter("lumrec_serve_knowledge_errors", "failed knowledge reads (Redis unreachable), by where "
                                        "they happened: request or refresh", ["where"], registry=r)
        self.degraded = Counter("lumrec_serve_degraded_requests", "requests scored with missing knowledge because Redis was "
                                "unreachable (on_redis_down=serve)", registry=r)
        self.knowledge_up = Gauge("lumrec_serve_knowledge_up", "1 while the knowledge store answers, else 0", registry=r)
        self.knowledge_swaps = Counter("lumrec_serve_knowledge_swaps", "knowledge versions switched to", registry=r)
        self.swaps = Counter("lumrec_serve_model_swaps", "bundle reloads by result (ok or failed)", ["result"], registry=r)
        self.model = Info("lumrec_serve_model", "the serving bundle: its version and folder", registry=r)
        self.knowledge = Info("lumrec_serve_knowledge", "the serving knowledge version and its as-of day", registry=r)
        for result in ("ok", "failed"):
            self.swaps.labels(result)  # present at 0 before the first reload
        for where in ("request", "refresh"):
            self.knowledge_errors.labels(where)

    def set_model(self, version: str, bundle: str) -> None:
        self.model.info({"version": str(version), "bundle": str(bundle)})

    def set_knowledge(self, version: str | None, as_of_ds: str | None) -> None:
        self.knowledge.info({"version": str(version or ""), "as_of_ds": str(as_of_ds or "")})

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware_class(self) -> type:
        return _CountRequests


class _CountRequests:
    """Pure ASGI middleware: one count by (path, status) and one latency sample per HTTP request, errors included."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in PATHS else "other"
        start, status = time.perf_counter(), 500  # an exception before the response starts is a 500

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
