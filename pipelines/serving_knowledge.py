"""The endpoint's link to the knowledge in Redis: one pinned version per request, swapped whole, and Redis's up/down state.

A ``RedisKnowledge`` reads one published version; ``refresh()`` moves it to the version the pointer
names. A request must not see that move half way (user vectors of one day, item vectors of the
next), so the link never refreshes the instance requests use: a separate probe instance polls the
pointer, and when it names another version a fresh instance is opened at that version and swapped
in with one reference assignment. A request takes ``current()`` once and keeps that instance.

While Redis is unreachable the link is down (``up`` False, ``reason`` says why): requests stop
trying Redis (no connect timeout per request) until a poll reaches it again.

    >>> link = KnowledgeLink(None, "lumrec", ServeMetrics())  # no Redis configured
    >>> link.enabled, link.current(), link.up
    (False, (None, None), True)
"""

from __future__ import annotations

import logging
import threading
import time

from lumrec.knowledge.redis_store import KnowledgeUnavailable, RedisKnowledge, RedisKnowledgeConfig
from lumrec.pipelines.serving_metrics import ServeMetrics

__all__ = ["KnowledgeLink"]

log = logging.getLogger("lumrec.serve")

RETIRED_GRACE_S = 30.0  # a knowledge version swapped out is closed this long after (no request lasts that long)


class KnowledgeLink:
    """Knowledge from Redis at `url` under `prefix` (None: no knowledge, every request gets the missing default)."""

    unavailable_errors: tuple[type[BaseException], ...] = (KnowledgeUnavailable,)

    def __init__(self, url: str | None, prefix: str, metrics: ServeMetrics) -> None:
        self.url, self.prefix, self.metrics = url, prefix, metrics
        self.enabled = url is not None
        # Built now: a malformed URL or prefix fails at start, naming the key, not at the first poll.
        self._cfg = RedisKnowledgeConfig(url=url, prefix=prefix) if url is not None else None
        self._lock = threading.Lock()  # one poll or reconnect at a time; requests never take it
        self._serving: RedisKnowledge | None = None
        self._probe: RedisKnowledge | None = None
        self._retired: list[tuple[float, RedisKnowledge]] = []  # (when swapped out, instance), closed after a grace
        self.up, self.reason = True, "ok"
        if self.enabled:
            self.poll()
        else:
            metrics.knowledge_up.set(1)

    @property
    def version(self) -> str | None:
        serving = self._serving
        return None if serving is None else serving.version

    def current(self) -> tuple[RedisKnowledge | None, str | None]:
        """(the instance a request reads, its version), or (None, None) when there is none or Redis is down."""
        serving = self._serving  # one read: the pair below always belongs together
        if serving is None or not self.up:
            return None, None
        return serving, serving.version

    def mark_down(self, err: BaseException, where: str = "request") -> None:
        """Redis failed a read: stop sending requests to it until a poll reaches it again."""
        self.metrics.knowledge_errors.labels(where).inc()
        if self.up:
            log.warning("knowledge store %s unreachable, scoring with missing knowledge until it answers: %s", self.url, err)
        self.up, self.reason = False, str(err)  # KnowledgeUnavailable names the server and the key
        self.metrics.knowledge_up.set(0)

    def poll(self) -> None:
        """Reach Redis, and switch to the version its pointer names if that changed (the background refresh)."""
        if not self.enabled:
            return
        with self._lock:
            try:
                if self._probe is None:
                    self._probe = RedisKnowledge(self._cfg)  # follows the pointer; never read by a request
                else:
                    self._probe.refresh()
                if self._serving is None or self._probe.version != self._serving.version:
                    # Pinned: this instance reads this one version for as long as a request holds it.
                    self._swap(RedisKnowledge(self._cfg, version=self._probe.version))
            except KnowledgeUnavailable as err:
                self.mark_down(err, "refresh")
                return
            finally:
                self._close_retired()
            if not self.up:
                log.info("knowledge store %s reachable again (version %s)", self.url, self.version)
            self.up, self.reason = True, "ok"
            self.metrics.knowledge_up.set(1)

    def _swap(self, fresh: RedisKnowledge) -> None:
        old = self._serving
        self._serving = fresh  # the swap: requests that took `old` keep it until they finish
        if old is not None:
            # Closed later, not now: a request that took it just before the swap may still be reading.
            self._retired.append((time.monotonic(), old))
        self.metrics.knowledge_swaps.inc()
        self.metrics.set_knowledge(fresh.version, fresh.as_of_ds)
        log.info("knowledge version %s (as of %s)%s", fresh.version, fresh.as_of_ds, "" if old is None else f", was {old.version}")

    def _close_retired(self) -> None:
        now = time.monotonic()
        while self._retired and now - self._retired[0][0] > RETIRED_GRACE_S:
            self._retired.pop(0)[1].close()

    def close(self) -> None:
        """Close every Redis connection of the link (the app's shutdown)."""
        with self._lock:
            for source in [self._serving, self._probe] + [old for _, old in self._retired]:
                if source is not None:
                    source.close()
            self._retired.clear()
