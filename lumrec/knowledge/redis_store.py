"""LUM knowledge in Redis: one as-of partition published atomically under a version, read through ``RedisKnowledge``.

The Parquet store (``lumrec.knowledge.store``) stays the source of truth and the embedded default;
``publish_partition`` copies one committed partition of it to Redis, and ``RedisKnowledge`` is a
``KnowledgeSource`` (``lumrec.modules.lum_features``) that gives bit-identical answers to
``load_knowledge(store, day)``. Key layout under ``prefix`` (default ``lumrec``)::

    {prefix}:current              string  the version readers use (switched last)
    {prefix}:versions             hash    version -> JSON {as_of_ds, model_version, published_at} of complete versions
    {prefix}:publishing           hash    version -> start time, while a publisher writes it
    {prefix}:lock                 string  the publishers' lock (one publisher per prefix)
    {prefix}:v:{version}:meta     string  JSON: format, as_of_ds, model_version, dim, conditions, counts
    {prefix}:v:{version}:users    hash    user id -> float32 little-endian [conditions, dim] in the meta's
                                          condition order, then one byte per condition (1: stored)
    {prefix}:v:{version}:items    hash    item id -> float32 little-endian [dim]

A version is ``"{as_of_ds}@{digest}"``, the digest of the partition's model_version and creation
time: republishing the same partition gives the same version and does nothing (idempotent); a
rewritten partition of the same day gets another version.

Atomicity. A publisher takes the lock, records its version under ``publishing``, writes users and
items in pipelined batches, then the meta, then (in one MULTI) the ``versions`` record, and only
then switches ``current``. Readers find a version only through ``current``, so none ever reads a
half-written version. A publisher killed midway leaves ``current`` on the previous version; the
next publish (any day) removes the keys of every version still listed under ``publishing`` (its
lock expires ``lock_ttl_s`` after its holder died). The pointer switch is a WATCH/MULTI
compare-and-set: a publish of an older as_of_ds than the current one records its version but does
not move the pointer back unless ``force=True``.

Expiry. After the switch, versions whose as_of_ds is more than ``keep_days`` before the newest
published one, and versions superseded by a later publish of the same day, are dropped from
``versions`` and their three keys get an EXPIRE of ``expire_after_s`` (0: UNLINK at once) in one
MULTI. EXPIRE rather than an immediate delete leaves a grace period to a reader still on that
version; a version is three keys (users and items are hashes), so expiring one needs no SCAN of
the keyspace and is atomic. The current version is never expired.

Reading. A user's lookup is one HMGET of the distinct users of the batch (with an EXISTS of the
version's meta in the same round trip: a version that vanished, e.g. a server restarted empty,
is a ``KnowledgeUnavailable`` rather than silently "every user missing"); decoding is numpy
``frombuffer`` on the joined values. Any Redis failure is a ``KnowledgeUnavailable``, raised
within about ``2 x socket_timeout`` (one reconnect, no backoff), so an endpoint can serve with
missing knowledge or fail closed.

    >>> cfg = RedisKnowledgeConfig(url="redis://127.0.0.1:6379/0", keep_days=3)
    >>> _Keys(cfg.prefix).users("2026-01-02@0a1b2c3d4e5f")
    'lumrec:v:2026-01-02@0a1b2c3d4e5f:users'
    >>> RedisKnowledgeConfig(url="localhost:6379")
    Traceback (most recent call last):
    lumrec.config.ConfigValueError: url must be redis://HOST:PORT/DB, rediss://... or unix://PATH, got 'localhost:6379'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from lumrec.config import ConfigValueError, check_above, check_at_least
from lumrec.errors import EXIT_IO, LockHeld, LumrecError
from lumrec.faults import failpoint
from lumrec.knowledge.conditions import parse_condition
from lumrec.knowledge.lookup import KnowledgeLookup
from lumrec.knowledge.partitions import KnowledgeManifest, read_manifest
from lumrec.knowledge.reading import load_knowledge

log = logging.getLogger("lumrec.knowledge")

__all__ = ["KnowledgeUnavailable", "RedisKnowledge", "RedisKnowledgeConfig", "RequestKnowledge", "publish_partition", "published_versions", "version_id"]

FORMAT = 1  # the meta's "format": the layout above


class KnowledgeUnavailable(LumrecError):
    """Redis cannot be reached, timed out or lacks the version a reader uses; the message names the server and key."""

    exit_code = EXIT_IO


@dataclass
class RedisKnowledgeConfig:
    """Where knowledge is published and read: a Redis URL and a key prefix, with publishing and reading limits."""

    url: str  # redis://HOST:PORT/DB (rediss:// with TLS, unix:///path/to/socket?db=0)
    prefix: str = "lumrec"
    keep_days: int = 7  # versions more than this many days older than the newest published are expired
    batch_size: int = 1000  # users (or items) per pipelined write
    socket_timeout: float = 0.5  # seconds, reads: a serving request must not hang on a stuck server
    publish_timeout: float = 60.0  # seconds per command while publishing (large batches)
    expire_after_s: int = 3600  # grace before an expired version's keys go (0: removed at once)
    lock_ttl_s: float = 30.0  # the publish lock outlives a killed publisher by at most this (renewed every batch)
    lock_wait_s: float = 120.0  # how long a publisher waits for another's lock
    # Reading: items' vectors are the same for every request of a version, so a reader keeps up to this
    # many of them in memory after the first read (0: none; memory: items x dim x 4 bytes).
    item_cache_items: int = 100_000

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigValueError("url", f"must be redis://HOST:PORT/DB, rediss://... or unix://PATH, got {self.url!r}")
        if not self.prefix or any(ch.isspace() for ch in self.prefix):
            raise ConfigValueError("prefix", f"must be a non-empty key prefix without spaces, got {self.prefix!r}")
        check_at_least(self, 0, "keep_days", "expire_after_s", "item_cache_items")
        check_at_least(self, 1, "batch_size")
        check_above(self, 0, "socket_timeout", "publish_timeout", "lock_ttl_s")
        check_at_least(self, 0, "lock_wait_s")


class _Keys:
    """The key names of one prefix (see the module doc)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.current, self.versions = f"{prefix}:current", f"{prefix}:versions"
        self.publishing, self.lock = f"{prefix}:publishing", f"{prefix}:lock"

    def meta(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:meta"

    def users(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:users"

    def items(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:items"

    def of_version(self, version: str) -> list[str]:
        return [self.meta(version), self.users(version), self.items(version)]


def _where(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def _client(config: RedisKnowledgeConfig, timeout: float) -> redis.Redis:
    # One immediate reconnect (a restarted server, a dropped pooled connection) and no backoff: a down
    # server fails within ~2 x timeout instead of redis-py's default retries with exponential backoff.
    return redis.Redis.from_url(config.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))


@contextmanager
def _redis_errors(config: RedisKnowledgeConfig, what: str) -> Iterator[None]:
    """Turn any Redis failure inside the block into a KnowledgeUnavailable naming the server and what was done."""
    try:
        yield
    except redis.RedisError as err:
        raise KnowledgeUnavailable(
            f"{_where(config.url)}: Redis failed while {what}: {type(err).__name__}: {err}; check that the server runs "
            "and answers (redis-cli -u URL ping)"
        ) from err


def version_id(manifest: KnowledgeManifest) -> str:
    """`"{as_of_ds}@{12 hex}"`: the partition's day and a digest of its model_version and creation time."""
    digest = hashlib.sha256(json.dumps([manifest.model_version, repr(float(manifest.created_at))]).encode()).hexdigest()[:12]
    return f"{manifest.as_of_ds}@{digest}"


def _as_of_of(record: bytes | None) -> str | None:
    return json.loads(record)["as_of_ds"] if record else None


def published_versions(config: RedisKnowledgeConfig) -> dict[str, Any]:
    """`{"current": version or None, "versions": {version: {as_of_ds, model_version, published_at}}}` of `config.prefix`."""
    keys = _Keys(config.prefix)
    client = _client(config, config.socket_timeout)
    try:
        with _redis_errors(config, f"reading {keys.current} and {keys.versions}"):
            current, record = client.get(keys.current), client.hgetall(keys.versions)
    finally:
        client.close()
    return {"current": current.decode() if current else None,
            "versions": {v.decode(): json.loads(r) for v, r in sorted(record.items())}}


# -- publishing ----------------------------------------------------------------------------------


def _user_blobs(rows: torch.Tensor, table: torch.Tensor, dim: int) -> list[bytes]:
    """One value per user: float32 [C, dim] (absent pairs zero), then C presence bytes."""
    present = (rows >= 0).numpy()
    vecs = table[rows.clamp(min=0)].numpy().astype("<f4", copy=True) if table.shape[0] else np.zeros((*rows.shape, dim), "<f4")
    vecs[~present] = 0.0
    n, c = rows.shape
    buf = np.empty((n, c * dim * 4 + c), np.uint8)
    buf[:, : c * dim * 4] = vecs.reshape(n, c * dim).view(np.uint8)
    buf[:, c * dim * 4 :] = present
    return [row.tobytes() for row in buf]


def _clean_stale(client: redis.Redis, keys: _Keys) -> list[str]:
    """Remove the keys of versions a killed publisher left half-written (we hold the lock: nobody writes them now)."""
    stale = [v.decode() for v in client.hkeys(keys.publishing)]
    for version in stale:
        with client.pipeline(transaction=True) as pipe:
            if not client.hexists(keys.versions, version):  # a complete version's keys stay
                pipe.unlink(*keys.of_version(version))
            pipe.hdel(keys.publishing, version)
            pipe.execute()
    if stale:
        log.warning("redis %s: removed the partial keys of version(s) %s left by a killed publisher", keys.prefix, stale)
    return stale


def _is_complete(client: redis.Redis, keys: _Keys, version: str) -> bool:
    return bool(client.hexists(keys.versions, version)) and client.ttl(keys.meta(version)) == -1


def _write_version(client: redis.Redis, keys: _Keys, version: str, store_path: str | os.PathLike, manifest: KnowledgeManifest,
                   lookup: KnowledgeLookup, config: RedisKnowledgeConfig, renew: Any) -> None:
    """Write users, items, then the meta of `version` (its keys are absent: cleaned first)."""
    dim, conditions = lookup.dim, list(lookup.conditions)
    # The lookup's own index (same package): rows [U, C] into its table, -1 where a pair is absent.
    user_ids, rows, table = lookup._user_ids, lookup._rows, lookup._user_table
    for lo in range(0, len(user_ids), config.batch_size):
        hi = min(lo + config.batch_size, len(user_ids))
        blobs = _user_blobs(rows[lo:hi], table, dim)
        client.hset(keys.users(version), mapping=dict(zip(map(str, user_ids[lo:hi].tolist()), blobs)))
        renew()
        failpoint("redis.users_written")
    item_ids, item_table = lookup._item_ids, lookup._item_table.numpy().astype("<f4", copy=False)
    for lo in range(0, len(item_ids), config.batch_size):
        hi = min(lo + config.batch_size, len(item_ids))
        client.hset(keys.items(version), mapping={str(i): item_table[lo + k].tobytes() for k, i in enumerate(item_ids[lo:hi].tolist())})
        renew()
        failpoint("redis.items_written")
    meta = {
        "format": FORMAT, "version": version, "as_of_ds": manifest.as_of_ds, "model_version": manifest.model_version,
        "dim": dim, "conditions": conditions, "num_users": int(len(user_ids)), "num_items": int(len(item_ids)),
        "created_at": manifest.created_at, "published_at": time.time(), "source": os.fspath(store_path),
    }
    client.set(keys.meta(version), json.dumps(meta, sort_keys=True))
    failpoint("redis.meta_written")


def _switch_pointer(client: redis.Redis, keys: _Keys, version: str, as_of_ds: str, force: bool) -> bool:
    """Compare-and-set `current` to `version` unless it holds a newer day (WATCH/MULTI); returns whether it switched."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.current, keys.versions)
                current = pipe.get(keys.current)
                current = current.decode() if current else None
                if current == version:
                    pipe.unwatch()
                    return False
                current_day = _as_of_of(pipe.hget(keys.versions, current)) if current else None
                if current_day is not None and current_day > as_of_ds and not force:
                    pipe.unwatch()
                    log.warning("redis %s: %s recorded but %s stays current (a newer day %s; force=True moves it back)",
                                keys.prefix, version, current, current_day)
                    return False
                pipe.multi()
                pipe.set(keys.current, version)
                pipe.execute()
                return True
            except redis.WatchError:
                continue  # another writer changed the pointer or the record meanwhile: compare again


def _expire_old(client: redis.Redis, keys: _Keys, config: RedisKnowledgeConfig) -> list[str]:
    """Expire versions more than keep_days older than the newest, and superseded ones of the same day; returns them."""
    records = {v.decode(): json.loads(r) for v, r in client.hgetall(keys.versions).items()}
    current = client.get(keys.current)
    current = current.decode() if current else None
    if not records:
        return []
    newest = max(r["as_of_ds"] for r in records.values())
    cutoff = str(np.datetime64(newest, "D") - np.timedelta64(config.keep_days, "D"))
    latest: dict[str, str] = {}  # per day: the version current, else the last published
    for v, r in sorted(records.items(), key=lambda kv: kv[1]["published_at"]):
        latest[r["as_of_ds"]] = v
    if current in records:
        latest[records[current]["as_of_ds"]] = current
    expired = [v for v, r in records.items() if v != current and (r["as_of_ds"] < cutoff or latest[r["as_of_ds"]] != v)]
    for version in expired:
        with client.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.versions, version)
            if config.expire_after_s > 0:
                for key in keys.of_version(version):
                    pipe.expire(key, config.expire_after_s)
            else:
                pipe.unlink(*keys.of_version(version))
            pipe.execute()
    if expired:
        log.info("redis %s: expired version(s) %s (keep_days=%d, newest %s)", keys.prefix, expired, config.keep_days, newest)
    return expired


def publish_partition(store_path: str | os.PathLike, as_of_ds: str, config: RedisKnowledgeConfig, force: bool = False) -> str:
    """Publish the committed partition `as_of_ds` of the Parquet store `store_path` to Redis; returns its version.

    Writes the version's keys (unless it is published already: idempotent), records it, switches
    `current` to it unless `current` holds a newer day (`force=True`: switch anyway), then expires
    old versions. Raises `KnowledgeUnavailable` when Redis fails, `LockHeld` when another publisher
    keeps the lock longer than `lock_wait_s`.
    """
    manifest = read_manifest(store_path, as_of_ds)  # a partition without its manifest is not committed
    version = version_id(manifest)
    keys = _Keys(config.prefix)
    client = _client(config, config.publish_timeout)
    where = f"{_where(config.url)} prefix {config.prefix!r}"
    try:
        with _redis_errors(config, f"publishing {store_path} as_of_ds={as_of_ds} as {keys.prefix}:v:{version}"):
            # Read (and check) the partition before taking the lock: a large one would outlast lock_ttl_s.
            lookup = None if _is_complete(client, keys, version) else load_knowledge(store_path, as_of_ds)
            lock = client.lock(keys.lock, timeout=config.lock_ttl_s, blocking_timeout=config.lock_wait_s, thread_local=False)
            if not lock.acquire():
                raise LockHeld(f"{where}: another publisher holds {keys.lock} for more than lock_wait_s={config.lock_wait_s:g} s "
                               f"(a killed one's lock expires after lock_ttl_s={config.lock_ttl_s:g} s); rerun later")
            try:
                def renew() -> None:
                    lock.extend(config.lock_ttl_s, replace_ttl=True)

                _clean_stale(client, keys)
                if _is_complete(client, keys, version):
                    log.info("redis %s: version %s is published already", config.prefix, version)
                else:
                    client.hset(keys.publishing, version, str(time.time()))
                    client.unlink(*keys.of_version(version))  # leftovers of an expired copy of this version
                    if lookup is None:  # removed by an expiry since the check above
                        lookup = load_knowledge(store_path, as_of_ds)
                    _write_version(client, keys, version, store_path, manifest, lookup, config, renew)
                record = json.dumps({"as_of_ds": as_of_ds, "model_version": manifest.model_version, "published_at": time.time()})
                with client.pipeline(transaction=True) as pipe:
                    pipe.hset(keys.versions, version, record)
                    pipe.hdel(keys.publishing, version)
                    pipe.execute()
                failpoint("redis.version_recorded")
                switched = _switch_pointer(client, keys, version, as_of_ds, force)
                _expire_old(client, keys, config)
            finally:
                try:
                    lock.release()
                except redis.exceptions.LockError:
                    pass  # expired meanwhile: nothing to release
    finally:
        client.close()
    log.info("redis %s: published %s as_of_ds=%s as %s%s", where, store_path, as_of_ds, version,
             "" if switched else " (current unchanged)")
    return version


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Version:
    """What a reader needs of one version, swapped as a whole on refresh (a concurrent lookup sees one or the other)."""

    version: str
    as_of_ds: str
    model_version: str
    dim: int
    conditions: list[str]
    features: dict[str, tuple[np.ndarray, np.ndarray]]  # feature -> (sorted values, their condition columns)
    meta: dict[str, Any]
    # item id -> its stored vector bytes (None: not stored); a version never changes, so neither does an entry.
    item_cache: dict[int, bytes | None] = field(default_factory=dict, compare=False)


def _find(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into sorted_keys, found) per query; index 0 where not found."""
    if sorted_keys.size == 0:
        return np.zeros(queries.shape, np.int64), np.zeros(queries.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_keys, queries), sorted_keys.size - 1)
    found = sorted_keys[pos] == queries
    return np.where(found, pos, 0), found


class RedisKnowledge:
    """A `KnowledgeSource` reading the version `current` of a prefix (or a pinned `version`) from Redis.

    `refresh()` re-reads the pointer (True when the version changed); `version`, `as_of_ds`,
    `model_version` and `dim` describe the version in use; `ping()` says whether Redis answers.
    Unknown users, items and conditions give zeros and `missing=True`, as `KnowledgeLookup` does.
    """

    def __init__(self, config: RedisKnowledgeConfig | str, version: str | None = None) -> None:
        self.config = RedisKnowledgeConfig(url=config) if isinstance(config, str) else config
        self._keys = _Keys(self.config.prefix)
        self._client = _client(self.config, self.config.socket_timeout)
        self._pinned = version
        self._state = self._load(version if version is not None else self._pointer())

    # -- versions ----------------------------------------------------------------------------

    def _pointer(self) -> str:
        with _redis_errors(self.config, f"reading {self._keys.current}"):
            current = self._client.get(self._keys.current)
        if current is None:
            raise KnowledgeUnavailable(f"{_where(self.config.url)}: no knowledge published under prefix {self.config.prefix!r} "
                                       f"({self._keys.current} is absent); publish a partition (lumrec query with redis set)")
        return current.decode()

    def _load(self, version: str) -> _Version:
        key = self._keys.meta(version)
        with _redis_errors(self.config, f"reading {key}"):
            raw = self._client.get(key)
        if raw is None:
            raise KnowledgeUnavailable(f"{_where(self.config.url)}: {key} is absent: version {version} is not published "
                                       "(or expired); see the versions under " + self._keys.versions)
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise KnowledgeUnavailable(f"{_where(self.config.url)}: {key} has format {meta.get('format')!r}; this reader knows {FORMAT}")
        conditions = [str(c) for c in meta["conditions"]]
        parsed = [parse_condition(c, source=key) for c in conditions]
        features = {}
        for feature in sorted({p.feature for p in parsed}):
            cols = np.array([j for j, p in enumerate(parsed) if p.feature == feature], np.int64)
            values = np.array([parsed[j].value for j in cols], np.int64)
            order = np.argsort(values, kind="stable")
            features[feature] = (values[order], cols[order])
        return _Version(version, meta["as_of_ds"], meta["model_version"], int(meta["dim"]), conditions, features, meta)

    def refresh(self) -> bool:
        """Re-read `current` and switch to its version; returns whether the version changed (a pinned reader: False)."""
        if self._pinned is not None:
            return False
        version = self._pointer()
        if version == self._state.version:
            return False
        self._state = self._load(version)
        return True

    def ping(self) -> bool:
        """Whether Redis answers now."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    @property
    def version(self) -> str:
        return self._state.version

    @property
    def as_of_ds(self) -> str:
        return self._state.as_of_ds

    @property
    def model_version(self) -> str:
        return self._state.model_version

    @property
    def dim(self) -> int:
        return self._state.dim

    @property
    def conditions(self) -> list[str]:
        return list(self._state.conditions)

    @property
    def features(self) -> list[str]:
        """Condition features of the version."""
        return list(self._state.features)

    # -- lookups -----------------------------------------------------------------------------

    def _fetch(self, state: _Version, key: str, ids: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
        """(found [n], the found values in order) of hash `key` for `ids`, in one round trip with a check of the version."""
        if ids.size == 0:
            return np.zeros(0, bool), []
        with _redis_errors(self.config, f"reading {key}"):
            with self._client.pipeline(transaction=False) as pipe:
                pipe.hmget(key, [str(i) for i in ids.tolist()])
                pipe.exists(self._keys.meta(state.version))
                values, alive = pipe.execute()
        if not alive:
            raise KnowledgeUnavailable(f"{_where(self.config.url)}: version {state.version} is gone ({self._keys.meta(state.version)} "
                                       "absent: expired, or the server restarted empty); refresh() or publish again")
        found = np.fromiter((v is not None for v in values), bool, len(values))
        return found, [v for v in values if v is not None]

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user_ids [B] int64; values [B, N] int64 condition values of `feature` -> (vectors [B, N, dim] float32, missing [B, N] bool)."""
        return self._user_vectors(self._state, user_ids, feature, values, records=None)

    def one_request(self) -> "RequestKnowledge":
        """This reader's version as one request sees it: each user's record read from Redis once (see `RequestKnowledge`)."""
        return RequestKnowledge(self, self._state)

    def _user_vectors(self, state: _Version, user_ids: torch.Tensor, feature: str, values: torch.Tensor,
                      records: dict[int, bytes | None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """user_vectors on `state`; `records` (user id -> stored record): read through, None: always from Redis."""
        if feature not in state.features:
            raise KeyError(f"RedisKnowledge: condition feature {feature!r} is not in version {state.version} "
                           f"(as_of_ds={state.as_of_ds}); it has {list(state.features)}")
        if user_ids.dim() != 1 or values.dim() != 2 or values.shape[0] != user_ids.shape[0]:
            raise ValueError(
                f"RedisKnowledge.user_vectors: need user_ids [B] and values [B, N], got {tuple(user_ids.shape)} and {tuple(values.shape)}"
            )
        device = user_ids.device
        vals = values.to(torch.int64).cpu().numpy()
        uniq, inverse = np.unique(user_ids.to(torch.int64).cpu().numpy(), return_inverse=True)
        key = self._keys.users(state.version)
        found, blobs = self._fetch(state, key, uniq) if records is None else self._read_through(state, key, uniq, records)
        out = np.zeros((*vals.shape, state.dim), np.float32)
        missing = np.ones(vals.shape, bool)
        if blobs:
            c, dim = len(state.conditions), state.dim
            raw = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), c * dim * 4 + c)
            vecs = np.ascontiguousarray(raw[:, : c * dim * 4]).view("<f4").reshape(len(blobs), c, dim)
            present = raw[:, c * dim * 4 :].astype(bool)
            sorted_values, columns = state.features[feature]
            col_index, col_found = _find(sorted_values, vals)
            cols = columns[col_index]  # [B, N]
            user_found = found[inverse]
            row = np.where(user_found, np.cumsum(found)[inverse] - 1, 0)[:, None]  # [B, 1] into the found users
            ok = user_found[:, None] & col_found & present[row, cols]
            out = np.where(ok[..., None], vecs[row, cols], np.float32(0.0)).astype(np.float32, copy=False)
            missing = ~ok
        return torch.from_numpy(out).to(device), torch.from_numpy(missing).to(device)

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """item_ids [...] int64 -> (vectors [..., dim], missing [...] bool)."""
        return self._item_vectors(self._state, item_ids)

    def _item_vectors(self, state: _Version, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device, shape = item_ids.device, tuple(item_ids.shape)
        uniq, inverse = np.unique(item_ids.to(torch.int64).cpu().numpy().reshape(-1), return_inverse=True)
        found, blobs = self._items(state, uniq)
        out = np.zeros((inverse.size, state.dim), np.float32)
        hit = found[inverse]
        if blobs:
            vecs = np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), state.dim)
            out[hit] = vecs[(np.cumsum(found) - 1)[inverse][hit]]
        return torch.from_numpy(out.reshape(*shape, state.dim)).to(device), torch.from_numpy(~hit.reshape(shape)).to(device)

    def _items(self, state: _Version, ids: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
        """(found, stored vectors in order) of `ids`: from the version's item cache, Redis for the rest (then cached)."""
        key, limit = self._keys.items(state.version), self.config.item_cache_items
        if not limit:
            return self._fetch(state, key, ids)
        return self._read_through(state, key, ids, state.item_cache, limit)

    def _read_through(self, state: _Version, key: str, ids: np.ndarray, cache: dict[int, bytes | None],
                      limit: int | None = None) -> tuple[np.ndarray, list[bytes]]:
        """(found, stored values in order) of `ids` in hash `key`: from `cache`, Redis for the rest.

        What was read joins the cache unless that would take it past `limit` entries (None: no limit).
        """
        wanted = [i for i in ids.tolist() if i not in cache]
        read: dict[int, bytes | None] = {}
        if wanted:
            found, blobs = self._fetch(state, key, np.asarray(wanted, np.int64))
            fetched = iter(blobs)
            read = {i: (next(fetched) if hit else None) for i, hit in zip(wanted, found.tolist())}
            if limit is None or len(cache) + len(read) <= limit:
                cache.update(read)  # one dict update: a concurrent reader sees an entry whole or not at all
        values = [read[i] if i in read else cache[i] for i in ids.tolist()]
        return np.fromiter((v is not None for v in values), bool, len(values)), [v for v in values if v is not None]

    def __repr__(self) -> str:
        s = self._state
        return (f"RedisKnowledge(url={_where(self.config.url)!r}, prefix={self.config.prefix!r}, version={s.version!r}, "
                f"as_of_ds={s.as_of_ds!r}, dim={s.dim}, conditions={len(s.conditions)})")



class RequestKnowledge:
    """One request's view of a `RedisKnowledge` version: a `KnowledgeSource` whose user records are read once.

    A DLRM's LUM features ask for a user's vectors once per condition feature (the fixed conditions
    of each feature, the candidate's condition): on `RedisKnowledge` each call reads the user's whole
    record (every condition's vector) from Redis again. This view keeps the records it has read, so
    a request reads each user's record once, and it stays on the version it was made from even if
    the reader refreshes meanwhile. Make one per request (`RedisKnowledge.one_request()`) and drop
    it: it keeps every record it read.

        knowledge = reader.one_request()
        module = LUMFeatureModule(lum_config, knowledge)      # its user lookups share one read per user
    """

    def __init__(self, reader: RedisKnowledge, state: _Version) -> None:
        self._reader, self._state = reader, state
        self._records: dict[int, bytes | None] = {}

    @property
    def version(self) -> str:
        return self._state.version

    @property
    def dim(self) -> int:
        return self._state.dim

    @property
    def features(self) -> list[str]:
        return list(self._state.features)

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `RedisKnowledge.user_vectors`, each user's record read from Redis at most once per view."""
        return self._reader._user_vectors(self._state, user_ids, feature, values, records=self._records)

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `RedisKnowledge.item_vectors` (item vectors are cached per version by the reader already)."""
        return self._reader._item_vectors(self._state, item_ids)
