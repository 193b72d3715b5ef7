"""LUM knowledge in a real redis-server: round trip equal to KnowledgeLookup, versions, a killed publisher, Redis down, `lumrec query`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
import torch

from benchmark_scripts import load_benchmark
from lumrec.config import ConfigError, from_dict, load_config
from lumrec.errors import describe
from lumrec.faults import ENV
from lumrec.knowledge import (
    KNOWLEDGE_MANIFEST,
    USERS_FILE,
    KnowledgeUnavailable,
    RedisKnowledge,
    RedisKnowledgeConfig,
    load_knowledge,
    local_redis_server,
    partition_dir,
    publish_partition,
    published_versions,
    write_knowledge,
)
from lumrec.knowledge.redis_local import RedisServerError
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.modules.lum_features import KnowledgeSource, LUMFeatureConfig, LUMFeatureModule, candidates_kjt
from lumrec.pipelines.daily import DailyConfig
from lumrec.pipelines.pretrain import Pretrainer
from lumrec.pipelines.pretrain_config import DataConfig, PretrainConfig, TrainConfig
from lumrec.pipelines.query import QueryConfig, register_query

DAY = "2026-01-02"


@pytest.fixture(scope="module")
def server():
    with local_redis_server() as srv:
        yield srv


_prefixes = iter(range(10**6))


def _config(server, **kw) -> RedisKnowledgeConfig:
    """A config with a prefix of its own, so tests sharing the server do not see each other's keys."""
    kw.setdefault("prefix", f"t{next(_prefixes)}")
    return RedisKnowledgeConfig(url=server.url, **kw)


def _random_store(path, seed: int, day: str = DAY, users: int | None = None, drop_pairs: bool = True) -> dict:
    """A random partition: sparse user/item ids, conditions of two features, some (user, condition) pairs absent."""
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(1, 9))
    n_users = int(rng.integers(0, 60)) if users is None else users
    conditions = sorted({f"category_id={v}" for v in rng.integers(-2, 12, size=rng.integers(1, 6))}
                        | {f"scenario={v}" for v in rng.integers(0, 4, size=rng.integers(0, 3))})
    user_ids = rng.choice(np.arange(1, 10 * max(n_users, 1) + 1), n_users, replace=False)
    item_ids = rng.choice(np.arange(0, 200), int(rng.integers(0, 40)), replace=False)
    vectors = rng.standard_normal((n_users, len(conditions), dim)).astype(np.float32)
    write_knowledge(path, day, f"m{seed}", user_ids, conditions, vectors, item_ids,
                    rng.standard_normal((len(item_ids), dim)).astype(np.float32))
    if drop_pairs and n_users > 1:  # a partition where some users lack some conditions (the reader allows it)
        folder = partition_dir(path, day)
        table = pq.read_table(folder / USERS_FILE)
        keep = rng.random(table.num_rows) > 0.2
        keep[0] = True
        pq.write_table(table.filter(keep), folder / USERS_FILE)
        manifest = json.loads((folder / KNOWLEDGE_MANIFEST).read_text())
        manifest["num_user_rows"] = int(keep.sum())
        (folder / KNOWLEDGE_MANIFEST).write_text(json.dumps(manifest))
    return {"dim": dim, "users": user_ids, "items": item_ids, "conditions": conditions}


def _assert_same(redis_source: RedisKnowledge, lookup, info: dict, rng: np.random.Generator) -> None:
    """Every user, condition and item, plus unknown ones, looked up in both: bit-identical vectors and flags."""
    users = np.concatenate([info["users"], [0, 10**9, -5]]).astype(np.int64)
    rng.shuffle(users)
    users = np.concatenate([users, users[:3]])  # repeated users in a batch
    for feature in ("category_id", "scenario"):
        known = [int(c.split("=")[1]) for c in info["conditions"] if c.startswith(feature + "=")]
        if feature not in lookup.features:
            with pytest.raises(KeyError):
                lookup.user_vectors(torch.from_numpy(users), feature, torch.zeros(len(users), 1, dtype=torch.int64))
            with pytest.raises(KeyError, match=feature):
                redis_source.user_vectors(torch.from_numpy(users), feature, torch.zeros(len(users), 1, dtype=torch.int64))
            continue
        values = rng.choice(np.array(known + [99, -1], np.int64), size=(len(users), 5))
        want = lookup.user_vectors(torch.from_numpy(users), feature, torch.from_numpy(values))
        got = redis_source.user_vectors(torch.from_numpy(users), feature, torch.from_numpy(values))
        assert got[0].dtype == torch.float32 and got[0].shape == (len(users), 5, info["dim"])
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert got[0].numpy().tobytes() == want[0].numpy().tobytes()  # bit-identical, signs of zeros included
    items = torch.from_numpy(rng.choice(np.concatenate([info["items"], [500, 777]]).astype(np.int64), size=(4, 7)))
    want, got = lookup.item_vectors(items), redis_source.item_vectors(items)
    assert torch.equal(got[1], want[1]) and got[0].numpy().tobytes() == want[0].numpy().tobytes()
    empty = redis_source.item_vectors(torch.zeros(0, dtype=torch.int64))
    assert empty[0].shape == (0, info["dim"]) and empty[1].shape == (0,)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_equals_knowledge_lookup(server, tmp_path, seed):
    info = _random_store(tmp_path, seed, users=None if seed else 0)
    cfg = _config(server, batch_size=7)
    version = publish_partition(tmp_path, DAY, cfg)
    source = RedisKnowledge(cfg)
    lookup = load_knowledge(tmp_path, DAY)
    assert (source.version, source.as_of_ds, source.model_version, source.dim) == (version, DAY, f"m{seed}", info["dim"])
    assert source.conditions == lookup.conditions and source.ping() and isinstance(source, KnowledgeSource)
    _assert_same(source, lookup, info, np.random.default_rng(100 + seed))
    # Read again: the items now come from the reader's cache (unknown ones too), still bit-identical; and with
    # the cache off, or a cache too small for a batch (read from Redis, not cached).
    _assert_same(source, lookup, info, np.random.default_rng(200 + seed))
    for limit in (0, 2):
        small = RedisKnowledge(_config(server, prefix=cfg.prefix, item_cache_items=limit))
        _assert_same(small, lookup, info, np.random.default_rng(300 + seed))
        assert len(small._state.item_cache) <= limit  # never more than the limit


def _hmget_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


@pytest.mark.parametrize("seed", range(2))
def test_one_request_view_reads_each_user_record_once(server, tmp_path, seed):
    """RequestKnowledge equals the reader bit for bit, reads a user's record once for all features, and keeps its version."""
    info = _random_store(tmp_path, 10 + seed, users=30)
    cfg = _config(server)
    publish_partition(tmp_path, DAY, cfg)
    reader = RedisKnowledge(cfg)
    lookup = load_knowledge(tmp_path, DAY)
    _assert_same(reader.one_request(), lookup, info, np.random.default_rng(400 + seed))

    client = redis.Redis.from_url(server.url)
    users = torch.from_numpy(info["users"][:4].astype(np.int64))
    values = torch.zeros(4, 2, dtype=torch.int64)
    features = lookup.features
    before = _hmget_calls(client)
    for feature in features:
        reader.user_vectors(users, feature, values)
    assert _hmget_calls(client) - before == len(features)  # the reader: one read per lookup
    view = reader.one_request()
    before = _hmget_calls(client)
    for feature in features * 2:
        got = view.user_vectors(users, feature, values)
        want = reader.user_vectors(users, feature, values)
        assert got[0].numpy().tobytes() == want[0].numpy().tobytes() and torch.equal(got[1], want[1])
    assert _hmget_calls(client) - before == 2 * len(features) + 1  # the reader's reads, and the view's one
    view.user_vectors(torch.tensor([int(info["users"][5]), -7]), features[0], torch.zeros(2, 1, dtype=torch.int64))
    assert _hmget_calls(client) - before == 2 * len(features) + 2  # a user it had not read (and an unknown one)

    # A new day published and the reader refreshed: the view still answers from its version.
    other = tmp_path / "other"
    _random_store(other, 20 + seed, day="2026-01-03", users=30)
    publish_partition(other, "2026-01-03", _config(server, prefix=cfg.prefix))
    old_version = view.version
    assert reader.refresh() and reader.version != old_version
    again = view.user_vectors(users, features[0], values)
    want = lookup.user_vectors(users, features[0], values)
    assert view.version == old_version and again[0].numpy().tobytes() == want[0].numpy().tobytes()


def test_request_view_benchmark_runs_and_saves_its_row(tmp_path):
    out = tmp_path / "redis_knowledge.json"
    result = load_benchmark("redis_knowledge").main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["tiny"] == result and result["benchmark"] == "redis_knowledge"
    (row,) = result["rows"]
    assert row["dim"] == 8 and row["max_abs_diff"] == 0.0 and row["per_lookup_ms"] > 0 and row["one_request_ms"] > 0


def test_cached_items_are_served_without_redis_and_belong_to_their_version(server, tmp_path):
    """A cached item vector is read once per version: a later publish's reader reads its own."""
    info = _random_store(tmp_path, 5, users=4)
    cfg = _config(server)
    publish_partition(tmp_path, DAY, cfg)
    source = RedisKnowledge(cfg)
    items = torch.from_numpy(info["items"][:3].astype(np.int64))
    first = source.item_vectors(items)
    cached = dict(source._state.item_cache)
    assert set(cached) == set(info["items"][:3].tolist())
    again = source.item_vectors(items)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = tmp_path / "other"
    info2 = _random_store(other, 6, day="2026-01-03", users=4)
    publish_partition(other, "2026-01-03", cfg)
    assert source.refresh() and source._state.item_cache == {}  # a new version starts with an empty cache
    want = load_knowledge(other, "2026-01-03").item_vectors(torch.from_numpy(info2["items"][:3].astype(np.int64)))
    got = source.item_vectors(torch.from_numpy(info2["items"][:3].astype(np.int64)))
    assert got[0].numpy().tobytes() == want[0].numpy().tobytes()


def test_versions_pointer_expiry_and_refresh(server, tmp_path):
    cfg = _config(server, keep_days=7, expire_after_s=0)
    days = ["2026-01-02", "2026-01-05", "2026-01-12"]
    infos = {d: _random_store(tmp_path, i, d, users=20) for i, d in enumerate(days)}
    v0 = publish_partition(tmp_path, days[0], cfg)
    reader = RedisKnowledge(cfg)
    pinned = RedisKnowledge(cfg, version=v0)
    assert reader.version == v0 and not reader.refresh()
    # Idempotent: the same partition again is the same version, its keys untouched.
    client = server.client()
    before = client.hgetall(f"{cfg.prefix}:v:{v0}:users")
    assert publish_partition(tmp_path, days[0], cfg) == v0 and client.hgetall(f"{cfg.prefix}:v:{v0}:users") == before
    v1 = publish_partition(tmp_path, days[1], cfg)
    assert reader.refresh() and reader.version == v1 and reader.as_of_ds == days[1]
    _assert_same(reader, load_knowledge(tmp_path, days[1]), infos[days[1]], np.random.default_rng(0))
    # An older day is recorded but does not move the pointer back, unless forced.
    client.unlink(f"{cfg.prefix}:v:{v0}:meta", f"{cfg.prefix}:v:{v0}:users", f"{cfg.prefix}:v:{v0}:items")
    client.hdel(f"{cfg.prefix}:versions", v0)
    assert publish_partition(tmp_path, days[0], cfg) == v0
    state = published_versions(cfg)
    assert state["current"] == v1 and set(state["versions"]) == {v0, v1}
    assert publish_partition(tmp_path, days[0], cfg, force=True) == v0 and published_versions(cfg)["current"] == v0
    assert publish_partition(tmp_path, days[1], cfg) == v1 and published_versions(cfg)["current"] == v1
    # keep_days=7: publishing 01-12 expires 01-02 (10 days older) but keeps 01-05 (7 days older).
    v2 = publish_partition(tmp_path, days[2], cfg)
    state = published_versions(cfg)
    assert state["current"] == v2 and set(state["versions"]) == {v1, v2}
    assert not client.exists(*[f"{cfg.prefix}:v:{v0}:{k}" for k in ("meta", "users", "items")])
    with pytest.raises(KnowledgeUnavailable, match="gone"):
        pinned.user_vectors(torch.tensor([1]), pinned.features[0], torch.tensor([[1]]))
    # A rewritten partition of the same day is another version; the one it supersedes expires (after a grace here).
    graceful = RedisKnowledgeConfig(**{**cfg.__dict__, "expire_after_s": 100})
    _random_store(tmp_path, 7, days[2], users=5)
    v3 = publish_partition(tmp_path, days[2], graceful)
    assert v3 != v2 and v3.startswith(days[2] + "@") and reader.refresh() and reader.version == v3
    assert set(published_versions(cfg)["versions"]) == {v1, v3}
    assert 0 < client.ttl(f"{cfg.prefix}:v:{v2}:users") <= 100 and client.ttl(f"{cfg.prefix}:v:{v3}:users") == -1


def _publish_in_subprocess(store, cfg: RedisKnowledgeConfig, failpoint: str | None) -> subprocess.CompletedProcess:
    code = ("import sys; from lumrec.knowledge import RedisKnowledgeConfig, publish_partition; "
            f"print(publish_partition(sys.argv[1], {DAY!r}, RedisKnowledgeConfig(**{cfg.__dict__!r})))")
    env = dict(os.environ)
    env.pop(ENV, None)
    if failpoint:
        env[ENV] = failpoint
    return subprocess.run([sys.executable, "-c", code, str(store)], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("failpoint", ["redis.users_written@2", "redis.version_recorded"])
def test_killed_publisher_leaves_readers_on_the_old_version(server, tmp_path, failpoint):
    old_store, new_store = tmp_path / "old", tmp_path / "new"
    _random_store(old_store, 11, "2026-01-01", users=10)
    info = _random_store(new_store, 12, DAY, users=30)
    cfg = _config(server, batch_size=4, lock_ttl_s=1.0)
    old = publish_partition(old_store, "2026-01-01", cfg)
    reader = RedisKnowledge(cfg)
    killed = _publish_in_subprocess(new_store, cfg, failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert published_versions(cfg)["current"] == old and not reader.refresh() and reader.version == old
    client = server.client()
    if failpoint.startswith("redis.users_written"):  # half-written: listed as in progress, never recorded
        assert client.hlen(f"{cfg.prefix}:publishing") == 1 and len(published_versions(cfg)["versions"]) == 1
    new = publish_partition(new_store, DAY, cfg)  # waits for the dead publisher's lock to expire (lock_ttl_s)
    assert client.hlen(f"{cfg.prefix}:publishing") == 0 and reader.refresh() and reader.version == new
    lookup = load_knowledge(new_store, DAY)
    assert client.hlen(f"{cfg.prefix}:v:{new}:users") == lookup.num_users
    _assert_same(reader, lookup, info, np.random.default_rng(2))


def test_redis_down_is_knowledge_unavailable_quickly(tmp_path):
    _random_store(tmp_path, 3, users=10)
    with local_redis_server() as srv:
        cfg = RedisKnowledgeConfig(url=srv.url, socket_timeout=0.2)
        publish_partition(tmp_path, DAY, cfg)
        source = RedisKnowledge(cfg)
        users, values = torch.tensor([1, 2]), torch.tensor([[1], [2]])
        feature = source.features[0]
        # A stuck server (SIGSTOP): each call gives up within ~2 x socket_timeout.
        os.kill(srv.process.pid, signal.SIGSTOP)
        try:
            for call in (lambda: source.user_vectors(users, feature, values), lambda: source.item_vectors(users), source.refresh):
                t0 = time.perf_counter()
                with pytest.raises(KnowledgeUnavailable, match=srv.url.rsplit("/", 1)[0]):
                    call()
                assert time.perf_counter() - t0 < 1.5
            assert not source.ping()
        finally:
            os.kill(srv.process.pid, signal.SIGCONT)
        assert source.ping() and source.item_vectors(users)[0].shape == (2, source.dim)
        srv.kill()  # a dead server: refused at once
        t0 = time.perf_counter()
        with pytest.raises(KnowledgeUnavailable) as err:
            source.user_vectors(users, feature, values)
        assert time.perf_counter() - t0 < 1.0 and describe(err.value)[0] == 74 and not source.ping()
        with pytest.raises(KnowledgeUnavailable, match="publishing"):
            publish_partition(tmp_path, DAY, RedisKnowledgeConfig(url=srv.url, publish_timeout=0.5))
        with pytest.raises(KnowledgeUnavailable):
            RedisKnowledge(cfg)
        srv.start()  # restarted empty (no persistence): the version is gone, not "every user unknown"
        with pytest.raises(KnowledgeUnavailable, match="gone"):
            source.user_vectors(users, feature, values)
        with pytest.raises(KnowledgeUnavailable, match="no knowledge published"):
            source.refresh()
        publish_partition(tmp_path, DAY, cfg)
        assert source.user_vectors(users, feature, values)[0].shape == (2, 1, source.dim)


def test_missing_binary_names_it_and_how_to_install(tmp_path):
    with pytest.raises(RedisServerError, match="no-such-redis-server: not found.*apt-get install redis-server"):
        with local_redis_server(binary="no-such-redis-server"):
            pass


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="'query.redis.hots'"):
        from_dict(QueryConfig, {"redis": {"url": "redis://127.0.0.1:1/0", "hots": 1}}, prefix="query")
    with pytest.raises(ConfigError, match="'redis.url'"):
        from_dict(QueryConfig, {"redis": {"prefix": "x"}})
    with pytest.raises(ConfigError, match="'redis.keep_days' must be >= 0"):
        from_dict(QueryConfig, {"redis": {"url": "redis://h:1/0", "keep_days": -1}})
    with pytest.raises(ConfigError, match="'redis.url' must be redis://HOST:PORT/DB"):
        from_dict(QueryConfig, {"redis": {"url": "h:1"}})
    daily = from_dict(DailyConfig, {"query": {"redis": {"url": "redis://h:1/0", "keep_days": 3}}})
    assert daily.query.redis == RedisKnowledgeConfig(url="redis://h:1/0", keep_days=3)


def test_lumrec_query_publishes_to_redis(server, tmp_path):
    data = tmp_path / "data"
    generate(data, SynthConfig(seed=1, num_users=30, num_items=30, num_categories=3, num_queries=4, num_days=3))
    Pretrainer(PretrainConfig(
        model="lum", out=str(tmp_path / "run"),
        data=DataConfig(path=str(data), end=DAY, max_len=12, condition_features=["scenario", "category_id"], item_features=["item_id"]),
        train=TrainConfig(epochs=1, rows_per_batch=4, num_negatives=4, checkpoint_every_steps=100, log_every_steps=100),
        model_config={"d_model": 8, "num_layers": 1, "num_heads": 2, "ffn_dim": 16},
    )).run(max_steps=1)
    config = tmp_path / "query.yaml"
    config.write_text(
        f"checkpoint: {tmp_path / 'run'}\ndata: {data}\nstore: {tmp_path / 'store'}\nprogress: false\nusers: all\n"
        f"conditions:\n  - feature: scenario\n    values: all\n  - feature: category_id\n    values: all\n"
        f"redis:\n  url: {server.url}\n  prefix: query_test\n"
    )
    assert load_config(QueryConfig, config).redis.prefix == "query_test"
    parser = argparse.ArgumentParser()
    register_query(parser.add_subparsers())
    args = parser.parse_args(["query", str(config), f"as_of_ds='{DAY}'"])
    assert args.func(args) == 0
    lookup = load_knowledge(tmp_path / "store", DAY)
    source = RedisKnowledge(RedisKnowledgeConfig(url=server.url, prefix="query_test"))
    assert source.as_of_ds == DAY and source.model_version == lookup.model_version
    info = {"dim": lookup.dim, "users": lookup._user_ids.numpy(), "items": lookup._item_ids.numpy(), "conditions": lookup.conditions}
    _assert_same(source, lookup, info, np.random.default_rng(3))
    # Step 3's features from either source are the same.
    feature_config = LUMFeatureConfig(conditions=[("scenario", 1)], candidate_condition_feature="category_id")
    users = torch.tensor([int(info["users"][0]), 10**6, int(info["users"][-1])])
    kjt = candidates_kjt(torch.tensor([1, 2, 0, 5, 3, 4]), torch.tensor([2, 1, 3]), torch.tensor([1, 2, 3, 1, 9, 2]))
    want = LUMFeatureModule(feature_config, lookup)(users, kjt)
    got = LUMFeatureModule(feature_config, source)(users, kjt)
    assert want.keys() == got.keys() and torch.equal(want.values(), got.values())
