"""The ranking endpoint: FastAPI app scoring candidates with an exported bundle and LUM knowledge read from Redis.

``create_app(ServeConfig(...))`` loads the bundle (``lumrec export``) and connects to the knowledge
published in Redis (``lumrec.knowledge.redis_store``), then serves

    POST /rank          {user_id, candidates, context, history?, history_ts?, request_ts?}
                        -> {scores, model_version, knowledge_version, knowledge_missing}
    GET  /healthz       the process is up
    GET  /readyz        the model is loaded and (if it reads LUM knowledge) Redis answers; else 503 with the reason
    GET  /metrics       Prometheus text (one registry per app)
    POST /admin/reload  {bundle}: load a bundle (checked) and swap it in; requests in flight finish on the old one

Scoring runs in the thread pool of the sync endpoints (``ServeConfig.worker_threads`` threads); each
request reads the serving bundle and the knowledge version once, so it is scored by one model and
one knowledge version from start to end (``docs/serving.md``). The knowledge version is polled in
a background thread every ``knowledge_refresh_s`` seconds, which also notices Redis coming back.

    >>> config = ServeConfig(bundle="bundles/2026-01-08", redis_url="redis://127.0.0.1:6379/0")
    >>> config.on_redis_down, config.max_candidates
    ('serve', 1000)
    >>> RankRequest.model_validate({"user_id": 7, "candidates": [3, 5], "context": {"scenario": 2}}).candidates
    [3, 5]
    >>> field_name(("body", "context", "scenario"))
    'context.scenario'
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import anyio.to_thread
import torch
from fastapi import FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from lumrec.modules.serving.bundle import BundleError, RequestError, ServingBundle, load_bundle
from lumrec.pipelines.serving_knowledge import KnowledgeLink
from lumrec.pipelines.serving_metrics import ServeMetrics

__all__ = ["RankRequest", "ReloadRequest", "ServeConfig", "ServingState", "create_app", "field_name"]

log = logging.getLogger("lumrec.serve")

ON_REDIS_DOWN = ("serve", "fail")
# Ids are int64 in the model; JSON integers beyond that range are refused here, not overflowed later.
Id = Annotated[int, Field(ge=0, le=2**63 - 1)]
Timestamp = Annotated[int, Field(ge=0, le=2**63 - 1)]


@dataclass
class ServeConfig:
    """What `lumrec serve` serves and how.

    `bundle`: a folder written by `lumrec export`. `redis_url` / `redis_prefix`: where `lumrec query`
    (or the daily job) published the knowledge; None serves every request with the missing-knowledge
    default. `on_redis_down`: "serve" (score with missing knowledge, /readyz 503) or "fail" (/rank 503).
    `max_candidates`: the most candidates one request may rank. `knowledge_refresh_s`: how often the
    knowledge version pointer is polled (and an unreachable Redis retried). `watch`: a pointer file
    whose content is a bundle path (relative to the file's folder), polled every `watch_interval_s`
    and swapped in when it changes. `torch_threads`: intra-op threads per process (1: concurrency
    comes from requests in parallel, not from one request's ops). `worker_threads`: the most
    requests handled at once; `num_runners`: model instances in the bundle's package (the most
    requests inside the model at once; the others wait for one). `check_bundle`: run the bundle's own check when loading it.
    `admin`: serve POST /admin/reload (it loads code from a path). `admin_token`: where set, a
    reload must carry `Authorization: Bearer <token>` (401 without it); `lumrec serve` takes it from
    the LUMREC_ADMIN_TOKEN environment variable and serves no /admin/reload off loopback without one.
    `max_body_bytes`: a request body declared larger is answered 413 before it is read.
    """

    bundle: str
    redis_url: str | None = None
    redis_prefix: str = "lumrec"
    on_redis_down: str = "serve"
    max_candidates: int = 1000
    knowledge_refresh_s: float = 5.0
    watch: str | None = None
    watch_interval_s: float = 2.0
    torch_threads: int | None = 1
    worker_threads: int = 16
    num_runners: int = 2
    check_bundle: bool = True
    admin: bool = True
    admin_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.on_redis_down not in ON_REDIS_DOWN:
            raise ValueError(f"ServeConfig.on_redis_down must be one of {list(ON_REDIS_DOWN)}, got {self.on_redis_down!r}")
        for name in ("max_candidates", "worker_threads", "num_runners", "max_body_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("knowledge_refresh_s", "watch_interval_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ServeConfig.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.torch_threads is not None and int(self.torch_threads) < 1:
            raise ValueError(f"ServeConfig.torch_threads must be >= 1 or None (leave torch's default), got {self.torch_threads}")


class RankRequest(BaseModel):
    """The body of POST /rank: one user, the candidates to score, the request's context ids.

    Strict: ids must be JSON integers (not strings or floats), and unknown fields are refused.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: Id
    candidates: list[Id] = Field(min_length=1)
    context: dict[str, Id] = Field(default_factory=dict)
    history: list[Id] | None = None
    history_ts: list[Timestamp] | None = None
    request_ts: Timestamp | None = None


class ReloadRequest(BaseModel):
    """The body of POST /admin/reload: the bundle folder to load and serve."""

    model_config = ConfigDict(strict=True, extra="forbid")

    bundle: str = Field(min_length=1)


def admin_allowed(token: str | None, authorization: str | None) -> bool:
    """Whether a request with this Authorization header may use /admin/ (any request where no token is set).

    >>> admin_allowed(None, None), admin_allowed("s3cret", "Bearer s3cret"), admin_allowed("s3cret", "Bearer guess")
    (True, True, False)
    """
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def field_name(loc: Sequence[Any]) -> str:
    """A validation error's location as one field name: ("body", "candidates", 3) -> "candidates[3]"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    if not parts or not isinstance(parts[0], str):
        return "body"  # the body itself: missing, not JSON, not an object
    name = parts[0]
    for part in parts[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def _error(status: int, field: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field, **extra})


class _LimitBody:
    """Pure ASGI middleware: a body whose Content-Length exceeds `limit` bytes is a 413, refused before it is read.

    A flood of huge bodies then costs a header read each, not a JSON parse of megabytes.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                response = _error(413, "body", f"body: {int(length)} bytes, at most {self.limit} (ServeConfig.max_body_bytes)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ServingState:
    """What requests read: the serving bundle (one reference, swapped whole) and the knowledge link."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.bundle: ServingBundle = self._load(config.bundle)
        self.bundle_path = str(config.bundle)
        self._reload_lock = threading.Lock()
        self.knowledge = KnowledgeLink(config.redis_url, config.redis_prefix, metrics)
        metrics.set_model(self.bundle.version, self.bundle_path)

    def _load(self, path: str) -> ServingBundle:
        """The ranker bundle in `path`, loaded and (with `check_bundle`) checked against its parity example."""
        bundle = load_bundle(path, check=self.config.check_bundle, max_candidates=self.config.max_candidates,
                             num_runners=self.config.num_runners)
        if not isinstance(bundle, ServingBundle):
            raise BundleError(f"{path}: a {bundle.manifest.get('kind')!r} bundle; POST /rank serves a ranker bundle "
                              "(export a `lumrec rank` run)")
        return bundle

    def knowledge_for(self, bundle: ServingBundle) -> tuple[Any, str | None, str | None]:
        """(knowledge source, its version, problem) for a request scored by `bundle`.

        The source is None where the bundle reads no LUM features, no Redis is configured, or there is
        a problem: Redis unreachable, or knowledge of another width than the bundle was trained on.
        """
        link = self.knowledge
        if not bundle.uses_lum or not link.enabled:
            return None, None, None
        source, version = link.current()
        if source is None:
            return None, None, f"knowledge unreachable: {link.reason}"
        if int(source.dim) != bundle.knowledge_dim:
            return None, None, (f"knowledge version {version} has vectors of dim {source.dim}; bundle {bundle.path} was "
                                f"trained on dim {bundle.knowledge_dim} (publish the knowledge of the model's LUM)")
        cfg = bundle.lum_config
        needed = {feature for feature, _ in cfg.conditions} | ({cfg.candidate_condition_feature} - {None})
        absent = sorted(needed - set(source.features)) if cfg.needs_queries else []
        if absent:
            return None, None, (f"knowledge version {version} has no conditions on {absent}, which bundle {bundle.path} "
                                f"reads (it has {source.features}; query the LUM under them)")
        return source, version, None

    def reload(self, path: str) -> tuple[str, str, float]:
        """Load `path` (checked) and swap it in: (old version, new version, seconds). Raises with the path named on failure.

        One reload at a time; requests keep scoring on the old bundle while the new one loads, and
        a request reads `self.bundle` once, so one in flight finishes on the bundle it started with.
        """
        with self._reload_lock:
            start, old = time.perf_counter(), self.bundle
            try:
                new = self._load(path)
            except Exception:
                self.metrics.swaps.labels("failed").inc()
                raise
            self.bundle, self.bundle_path = new, str(path)  # the swap: one reference assignment
            self.metrics.swaps.labels("ok").inc()
            self.metrics.set_model(new.version, str(path))
            seconds = time.perf_counter() - start
            log.info("serving bundle %s (version %s, was %s), loaded in %.2f s", path, new.version, old.version, seconds)
            return old.version, new.version, seconds

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): the model is loaded, and knowledge it can read is reachable where the model reads it."""
        _, _, problem = self.knowledge_for(self.bundle)
        return (False, problem) if problem else (True, "ok")


class _PointerWatch:
    """Polls a pointer file (its content: a bundle path) and reloads when it names another bundle."""

    def __init__(self, pointer: str, state: ServingState) -> None:
        self.pointer, self.state = Path(pointer), state
        self._seen: tuple[str, float] | None = None

    def _target(self) -> str | None:
        try:
            text = self.pointer.read_text(encoding="utf-8").strip()
            mtime = self.pointer.stat().st_mtime
        except OSError:
            return None  # absent or unreadable: keep serving what is loaded
        if not text or self._seen == (text, mtime):
            return None
        self._seen = (text, mtime)
        target = Path(text) if Path(text).is_absolute() else self.pointer.parent / text
        return str(target)

    def poll(self) -> None:
        target = self._target()
        if target is None or Path(target).resolve() == Path(self.state.bundle_path).resolve():
            return
        try:
            self.state.reload(target)
        except Exception as err:  # noqa: BLE001 - a bad bundle leaves the old one serving; the next change retries
            log.error("%s names %s, which failed to load (still serving %s): %s", self.pointer, target, self.state.bundle.version, err)


def _every(seconds: float, stop: threading.Event, work: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread running `work` every `seconds` until `stop` is set."""

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                work()
            except Exception:  # noqa: BLE001 - a background poll must never die; the next round retries
                log.exception("%s failed", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app of `config`: the bundle is loaded and Redis first tried here (a bad bundle fails now)."""
    if config.torch_threads is not None:
        torch.set_num_threads(int(config.torch_threads))
    metrics = ServeMetrics()
    state = ServingState(config, metrics)
    watch = _PointerWatch(config.watch, state) if config.watch else None
    if watch is not None:
        watch.poll()  # the pointer names the bundle to serve from the start
    if state.bundle.uses_lum and not state.knowledge.enabled:
        log.warning("%s reads LUM features but no Redis is configured: every request is scored with the missing-knowledge "
                    "default", state.bundle_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.worker_threads
        stop = threading.Event()
        threads = [_every(config.knowledge_refresh_s, stop, state.knowledge.poll, "lumrec-knowledge-refresh")]
        if watch is not None:
            threads.append(_every(config.watch_interval_s, stop, watch.poll, "lumrec-bundle-watch"))
        try:
            yield
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            state.knowledge.close()

    app = FastAPI(title="lumrec ranking", lifespan=lifespan)
    app.state.serving = state
    app.add_middleware(_LimitBody, limit=config.max_body_bytes)
    app.add_middleware(metrics.middleware_class(), metrics=metrics)  # added last: outermost, so it counts the 413s too

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        name = field_name(first.get("loc", ("body",)))
        return _error(422, name, f"{name}: {first.get('msg')}", detail=jsonable_encoder(errors))

    @app.post("/rank")
    def rank(body: RankRequest) -> JSONResponse:
        if len(body.candidates) > config.max_candidates:
            return _error(422, "candidates", f"candidates: {len(body.candidates)} candidates, at most {config.max_candidates} "
                                             "per request (ServeConfig.max_candidates)")
        if body.history_ts is not None and len(body.history_ts) != len(body.history or []):
            return _error(422, "history_ts", f"history_ts: {len(body.history_ts)} times for {len(body.history or [])} history items")
        bundle = state.bundle  # read once: this request is scored by this bundle whatever swaps meanwhile
        link = state.knowledge
        source, knowledge_version, problem = state.knowledge_for(bundle)  # one version for the whole request
        if problem is not None and config.on_redis_down == "fail":
            return _error(503, "knowledge", f"{problem}; on_redis_down=fail answers 503 until it is back")

        def score(knowledge: Any):
            return bundle.score(body.user_id, body.candidates, context=body.context, history=body.history,
                                history_ts=body.history_ts, request_ts=body.request_ts, knowledge=knowledge)

        try:
            try:
                # A view for this request: its LUM lookups (one per condition feature) read the user's record once.
                result = score(source.one_request() if source is not None else None)
            except link.unavailable_errors as err:  # Redis went away after this request took its version
                link.mark_down(err)
                problem = f"knowledge unreachable: {err}"
                if config.on_redis_down == "fail":
                    return _error(503, "knowledge", f"{problem}; on_redis_down=fail answers 503 until it is back")
                source, knowledge_version = None, None
                result = score(None)
        except RequestError as err:
            return _error(422, err.field or "body", str(err))
        if problem is not None:
            metrics.degraded.inc()
        elif source is not None and result.knowledge_missing:
            metrics.knowledge_misses.inc()
        # A bundle that reads no knowledge misses none: false, whatever the store does.
        missing = bool(result.knowledge_missing) and bundle.uses_lum
        return JSONResponse({"scores": [float(s) for s in result.scores], "model_version": bundle.version,
                             "knowledge_version": knowledge_version, "knowledge_missing": missing})

    # Health, readiness and metrics read in-memory state only: async, on the event loop, so they answer
    # even while every worker thread is busy scoring.
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"alive": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, reason = state.readiness()
        body = {"ready": ready, "reason": reason, "model_version": state.bundle.version,
                "knowledge_version": state.knowledge.current()[1], "on_redis_down": config.on_redis_down}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text, content_type = metrics.render()
        return PlainTextResponse(text, media_type=content_type)

    if config.admin:

        @app.post("/admin/reload")
        def reload(body: ReloadRequest, authorization: str | None = Header(default=None)) -> JSONResponse:
            if not admin_allowed(config.admin_token, authorization):
                log.warning("POST /admin/reload refused: no valid bearer token")
                return _error(401, "authorization", "authorization: POST /admin/reload needs the header "
                                                    "'Authorization: Bearer <token>' with the server's LUMREC_ADMIN_TOKEN")
            try:
                old, new, seconds = state.reload(body.bundle)
            except Exception as err:  # noqa: BLE001 - any load failure: the old bundle keeps serving, the caller learns why
                log.error("reload of %s failed (still serving %s): %s", body.bundle, state.bundle.version, err)
                return _error(422, "bundle", f"{body.bundle}: cannot be served ({err}); still serving {state.bundle.version}",
                              model_version=state.bundle.version)
            return JSONResponse({"model_version": new, "previous_version": old, "bundle": body.bundle,
                                 "load_seconds": round(seconds, 3)})

    return app
