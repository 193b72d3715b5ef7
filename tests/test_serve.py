"""The ranking endpoint over real HTTP: uvicorn on a free loopback port, a real redis-server, a real exported bundle.

Contract: scores equal the bundle's own for the same request; malformed requests get a 422 naming
the field; unknown users are scored and counted; Redis down keeps serving (not ready) or fails
closed; a bundle swapped under a request loop fails no request; a republished day is picked up
and never mixed with the previous one; /metrics parses; `lumrec serve` starts, answers and stops
on SIGTERM.

One bundle per module (its AOTInductor compile is most of this file's time). The swap's second
bundle is a copy of it under another version label: the swap path (load with its parity check,
one reference swapped) is the same as for a second compile, at no compile cost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.knowledge import write_knowledge
from lumrec.knowledge.redis_local import local_redis_server
from lumrec.knowledge.redis_store import RedisKnowledge, RedisKnowledgeConfig, publish_partition
from lumrec.modules.lum_join import RankLUMConfig
from lumrec.modules.serving.bundle import load_bundle
from lumrec.pipelines.export import export_run
from lumrec.pipelines.rank import run_rank
from lumrec.pipelines.rank_config import RankConfig, RankModelConfig, RankTrainConfig
from lumrec.pipelines.serve import ADMIN_TOKEN_ENV, config_from_args, running_server
from lumrec.pipelines.serving_app import ServeConfig, create_app

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
CONDITIONS = ["scenario=1", "scenario=2"] + [f"category_id={c}" for c in range(1, 5)]
KNOWN_USERS = 40  # users 1..40 have knowledge; 41..60 are in the model's vocabulary but unknown to the store
REQUEST = {"user_id": 7, "candidates": [3, 5, 9, 12], "context": {"scenario": 1}, "history": [1, 2, 3]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny LUM ranking run exported once: (root, store, bundle A, bundle B = A under another version label)."""
    root = tmp_path_factory.mktemp("serve")
    generate(root / "data", SynthConfig(seed=3, num_users=60, num_items=50, num_categories=4, num_queries=8, num_days=4,
                                        impressions_per_user_day=10))
    g = torch.Generator().manual_seed(0)
    for day in DAYS[:-1]:  # a different random knowledge per day, so a day's scores tell which day scored them
        write_knowledge(root / "store", day, f"test-{day}", torch.arange(1, KNOWN_USERS + 1), CONDITIONS,
                        torch.randn(KNOWN_USERS, len(CONDITIONS), 4, generator=g), torch.arange(1, 51), torch.randn(50, 4, generator=g))
    run_rank(RankConfig(
        data=str(root / "data"), out=str(root / "run"), model="mlp",
        samples=RankingSampleConfig(protocol="impressions", first_day=DAYS[1], test_fraction=0.3, valid_fraction=0.3),
        sizes=RankModelConfig(embedding_dim=8, mlp=[16], item_stats=["f_ctr_7d"]),
        lum=RankLUMConfig(store=str(root / "store"), conditions=["scenario=1", "scenario=2"], candidate_condition_feature="category_id"),
        train=RankTrainConfig(epochs=1, batch_size=64, eval_batch_size=256, max_history=20, progress=False),
    ))
    export_run(root / "run", root / "bundle_a")
    shutil.copytree(root / "bundle_a", root / "bundle_b")
    manifest = json.loads((root / "bundle_b" / "serving.json").read_text())
    manifest["version"] += "-b"
    (root / "bundle_b" / "serving.json").write_text(json.dumps(manifest))
    return root, str(root / "store"), str(root / "bundle_a"), str(root / "bundle_b")


@pytest.fixture(scope="module")
def redis_server():
    with local_redis_server() as server:
        yield server


_prefixes = iter(range(10**6))


def publish(server, store: str, day: str, prefix: str) -> str:
    return publish_partition(store, day, RedisKnowledgeConfig(url=server.url, prefix=prefix))


@pytest.fixture(scope="module")
def served(world, redis_server):
    """One app (on_redis_down=serve) on the module's Redis with day 2 published: (server, client, bundle, knowledge)."""
    _, store, bundle_a, _ = world
    prefix = f"m{next(_prefixes)}"
    publish(redis_server, store, DAYS[1], prefix)
    app = create_app(ServeConfig(bundle=bundle_a, redis_url=redis_server.url, redis_prefix=prefix, max_candidates=16))
    with running_server(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        yield server, client, load_bundle(bundle_a), RedisKnowledge(RedisKnowledgeConfig(url=redis_server.url, prefix=prefix))


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of sample `name` with `labels` in /metrics (0.0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def eventually(check, timeout: float = 10.0, what: str = "condition"):
    """Poll `check()` until it returns a truthy value (returned) or `timeout` seconds pass (fails naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


# -- the contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    REQUEST,
    {"user_id": 12, "candidates": [50, 1], "context": {"scenario": 2, "query_id": 3}},
    {"user_id": 33, "candidates": [4] * 16, "history": list(range(1, 30)), "history_ts": list(range(1000, 1029)), "request_ts": 2000},
])
def test_scores_equal_the_bundles_own(served, body):
    _, client, bundle, knowledge = served
    response = client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    got = response.json()
    # Without request_ts the bundle reads the clock; the ids-only model here reads no times, so both agree.
    expected = bundle.score(body["user_id"], body["candidates"], context=body.get("context"), history=body.get("history"),
                            history_ts=body.get("history_ts"), request_ts=body.get("request_ts"), knowledge=knowledge)
    assert got["scores"] == pytest.approx(expected.scores, abs=1e-6) and len(got["scores"]) == len(body["candidates"])
    assert got["model_version"] == bundle.version and got["knowledge_version"] == knowledge.version
    assert got["knowledge_missing"] is False


@pytest.mark.parametrize("body, field", [
    ({"candidates": [1]}, "user_id"),
    ({"user_id": "7", "candidates": [1]}, "user_id"),
    ({"user_id": 7.5, "candidates": [1]}, "user_id"),
    ({"user_id": -1, "candidates": [1]}, "user_id"),
    ({"user_id": 61, "candidates": [1]}, "user_id"),  # outside the model's user vocabulary (60 users)
    ({"user_id": 7}, "candidates"),
    ({"user_id": 7, "candidates": []}, "candidates"),
    ({"user_id": 7, "candidates": 3}, "candidates"),
    ({"user_id": 7, "candidates": [1] * 17}, "candidates"),  # max_candidates=16
    ({"user_id": 7, "candidates": [1, "x"]}, "candidates[1]"),
    ({"user_id": 7, "candidates": [1, 2, 999]}, "candidates[2]"),
    ({"user_id": 7, "candidates": [1], "context": {"colour": 1}}, "context.colour"),
    ({"user_id": 7, "candidates": [1], "context": {"scenario": 99}}, "context.scenario"),
    ({"user_id": 7, "candidates": [1], "context": [1]}, "context"),
    ({"user_id": 7, "candidates": [1], "history": [1, 1000]}, "history[1]"),
    ({"user_id": 7, "candidates": [1], "history": [1, 2], "history_ts": [5]}, "history_ts"),
    ({"user_id": 7, "candidates": [1], "colour": 1}, "colour"),
    ([1, 2], "body"),
    (None, "body"),
])
def test_malformed_requests_get_a_422_naming_the_field(served, body, field):
    _, client, _, _ = served
    response = client.post("/rank", json=body) if body is not None else client.post(
        "/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field, response.json()
    assert response.json()["error"].startswith(field)


def test_a_body_over_the_limit_is_refused_unread(served):
    _, client, _, _ = served
    response = client.post("/rank", content=b"[" + b"1," * 600_000 + b"1]", headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["field"] == "body", response.text
    assert metric(client, "lumrec_serve_requests_total", path="/rank", status="413") == 1


def test_an_unknown_user_is_scored_and_counted(served):
    _, client, bundle, knowledge = served
    before = metric(client, "lumrec_serve_knowledge_misses_total")
    body = {"user_id": KNOWN_USERS + 5, "candidates": [3, 5], "context": {"scenario": 2}}
    response = client.post("/rank", json=body)
    assert response.status_code == 200 and response.json()["knowledge_missing"] is True
    expected = bundle.score(body["user_id"], body["candidates"], context=body["context"], knowledge=knowledge)
    assert response.json()["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert metric(client, "lumrec_serve_knowledge_misses_total") == before + 1
    client.post("/rank", json=REQUEST)  # a known user is no miss
    assert metric(client, "lumrec_serve_knowledge_misses_total") == before + 1


def test_health_readiness_and_metrics_parse(served):
    _, client, bundle, knowledge = served
    assert client.get("/healthz").json() == {"alive": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["model_version"] == bundle.version and ready.json()["knowledge_version"] == knowledge.version
    client.post("/rank", json=REQUEST)
    client.post("/rank", json={"user_id": "x"})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert families["lumrec_serve_requests"].type == "counter"
    assert families["lumrec_serve_request_seconds"].type == "histogram"
    for name in ("lumrec_serve_knowledge_misses", "lumrec_serve_knowledge_errors", "lumrec_serve_degraded_requests",
                 "lumrec_serve_model_swaps", "lumrec_serve_knowledge_up", "lumrec_serve_model_info", "lumrec_serve_knowledge_info"):
        assert name in families, sorted(families)
    assert metric(client, "lumrec_serve_requests_total", path="/rank", status="200") >= 1
    assert metric(client, "lumrec_serve_requests_total", path="/rank", status="422") >= 1
    assert metric(client, "lumrec_serve_request_seconds_count", path="/rank") >= 2
    assert metric(client, "lumrec_serve_model_info", version=bundle.version) == 1
    assert metric(client, "lumrec_serve_knowledge_up") == 1


# -- Redis down --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["serve", "fail"])
def test_redis_down_serves_or_fails_closed_and_recovers(world, policy):
    _, store, bundle_a, _ = world
    with local_redis_server() as redis:
        publish(redis, store, DAYS[1], "lumrec")
        app = create_app(ServeConfig(bundle=bundle_a, redis_url=redis.url, on_redis_down=policy, knowledge_refresh_s=0.1))
        with running_server(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
            first = client.post("/rank", json=REQUEST)
            assert first.status_code == 200 and first.json()["knowledge_missing"] is False
            redis.kill()
            for _ in range(3):
                response = client.post("/rank", json=REQUEST)
                if policy == "serve":
                    assert response.status_code == 200, response.text
                    assert response.json()["knowledge_missing"] is True and response.json()["knowledge_version"] is None
                else:
                    assert response.status_code == 503 and response.json()["field"] == "knowledge", response.text
            ready = client.get("/readyz")
            assert ready.status_code == 503 and redis.url in ready.json()["reason"], ready.text
            assert client.get("/healthz").status_code == 200
            assert metric(client, "lumrec_serve_knowledge_up") == 0
            errors = [metric(client, "lumrec_serve_knowledge_errors_total", where=w) for w in ("request", "refresh")]
            assert sum(errors) >= 1, errors
            if policy == "serve":
                assert metric(client, "lumrec_serve_degraded_requests_total") == 3
            # Back, and empty (persistence off): not ready until the day is published again, then no restart needed.
            redis.start()
            time.sleep(0.3)
            assert client.get("/readyz").status_code == 503
            publish(redis, store, DAYS[1], "lumrec")
            eventually(lambda: client.get("/readyz").status_code == 200, what="ready after Redis came back")
            again = client.post("/rank", json=REQUEST)
            assert again.status_code == 200 and again.json()["knowledge_missing"] is False
            assert again.json()["scores"] == pytest.approx(first.json()["scores"], abs=1e-6)


def test_knowledge_the_model_cannot_read_is_not_ready(world, redis_server, tmp_path):
    """Knowledge of another LUM (another width) under the prefix: not ready with the reason; scored as if Redis were down."""
    _, _, bundle_a, _ = world
    prefix = f"m{next(_prefixes)}"
    write_knowledge(tmp_path / "store", DAYS[1], "other-lum", torch.arange(1, 5), CONDITIONS, torch.ones(4, len(CONDITIONS), 3),
                    torch.arange(1, 5), torch.ones(4, 3))
    publish(redis_server, str(tmp_path / "store"), DAYS[1], prefix)
    for policy, status in (("serve", 200), ("fail", 503)):
        app = create_app(ServeConfig(bundle=bundle_a, redis_url=redis_server.url, redis_prefix=prefix, on_redis_down=policy))
        with running_server(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "dim 3" in ready.json()["reason"] and "dim 4" in ready.json()["reason"]
            response = client.post("/rank", json=REQUEST)
            assert response.status_code == status, response.text
            if policy == "serve":
                assert response.json()["knowledge_missing"] is True and response.json()["knowledge_version"] is None


# -- swaps -------------------------------------------------------------------------------------------


class RequestLoop:
    """`threads` threads posting REQUEST in a closed loop until stopped; every (start time, status, body) recorded."""

    def __init__(self, url: str, threads: int = 3, body: dict | None = None) -> None:
        self.url, self.body = url, body or REQUEST
        self.results: list[tuple[float, int, dict]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = client.post("/rank", json=self.body)
                    self.results.append((start, response.status_code, response.json()))
                except httpx.HTTPError as err:
                    self.results.append((start, -1, {"error": repr(err)}))

    def __enter__(self) -> "RequestLoop":
        for thread in self._threads:
            thread.start()
        eventually(lambda: len(self.results) >= 5, what="the request loop running")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_model_swap_under_load_fails_no_request(served, world):
    _, _, bundle_a, bundle_b = world
    server, client, bundle, _ = served
    with RequestLoop(server.url) as loop:
        bad = client.post("/admin/reload", json={"bundle": str(Path(bundle_b).parent / "missing")})
        assert bad.status_code == 422 and bad.json()["field"] == "bundle" and "missing" in bad.json()["error"]
        assert bad.json()["model_version"] == bundle.version  # the old one keeps serving
        swapped = client.post("/admin/reload", json={"bundle": bundle_b})
        done = time.monotonic()
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["previous_version"] == bundle.version and swapped.json()["model_version"] == bundle.version + "-b"
        eventually(lambda: sum(start > done for start, _, _ in loop.results) >= 5, what="requests after the swap")
    try:
        assert loop.results and all(status == 200 for _, status, _ in loop.results), [r for r in loop.results if r[1] != 200][:3]
        after = {body["model_version"] for start, _, body in loop.results if start > done}
        assert after == {bundle.version + "-b"}, after  # a request that started after the swap never sees the old bundle
        assert bundle.version in {body["model_version"] for _, _, body in loop.results}
        scores = {tuple(body["scores"]) for _, _, body in loop.results}
        assert len(scores) == 1  # the same package under another label: the same scores throughout
        assert metric(client, "lumrec_serve_model_swaps_total", result="ok") == 1
        assert metric(client, "lumrec_serve_model_swaps_total", result="failed") == 1
    finally:
        assert client.post("/admin/reload", json={"bundle": bundle_a}).status_code == 200


def test_admin_reload_with_a_token_needs_the_bearer_header(world):
    _, _, bundle_a, bundle_b = world
    app = create_app(ServeConfig(bundle=bundle_a, admin_token="s3cret"))
    assert "s3cret" not in repr(app.state.serving.config)  # never logged with the config
    with running_server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        version_a = client.post("/rank", json=REQUEST).json()["model_version"]
        for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            refused = client.post("/admin/reload", json={"bundle": bundle_b}, headers=headers)
            assert refused.status_code == 401 and refused.json()["field"] == "authorization", (headers, refused.text)
        assert client.post("/rank", json=REQUEST).json()["model_version"] == version_a  # nothing swapped
        assert metric(client, "lumrec_serve_requests_total", path="/admin/reload", status="401") == 4
        swapped = client.post("/admin/reload", json={"bundle": bundle_b}, headers={"Authorization": "Bearer s3cret"})
        assert swapped.status_code == 200 and swapped.json()["model_version"] == version_a + "-b"


def test_serve_off_loopback_serves_admin_only_with_a_token(world, monkeypatch, caplog):
    _, _, bundle_a, _ = world
    args = argparse.Namespace(bundle=bundle_a, host="0.0.0.0", port=0)
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    config = config_from_args(args)
    assert not config.admin and config.admin_token is None
    assert ADMIN_TOKEN_ENV in caplog.text and "/admin/reload is not served" in caplog.text
    with running_server(create_app(config)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/admin/reload", json={"bundle": bundle_a}).status_code == 404
        assert client.post("/rank", json=REQUEST).status_code == 200
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "t0ken")
    config = config_from_args(args)
    assert config.admin and config.admin_token == "t0ken"
    for host in ("127.0.0.1", "::1", "localhost"):
        monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
        config = config_from_args(argparse.Namespace(bundle=bundle_a, host=host, port=0))
        assert config.admin and config.admin_token is None  # loopback: as before, no token needed


def test_pointer_file_swaps_the_bundle(world, tmp_path):
    _, _, bundle_a, bundle_b = world
    pointer = tmp_path / "CURRENT"
    pointer.write_text(bundle_a)
    app = create_app(ServeConfig(bundle=bundle_a, watch=str(pointer), watch_interval_s=0.05))
    with running_server(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        version_a = client.post("/rank", json=REQUEST).json()["model_version"]
        pointer.write_text(str(tmp_path / "nowhere"))  # a bad target: logged, the old bundle stays
        time.sleep(0.3)
        assert client.post("/rank", json=REQUEST).json()["model_version"] == version_a
        os.symlink(bundle_b, tmp_path / "b")
        pointer.write_text("b\n")  # relative to the pointer's folder
        eventually(lambda: client.post("/rank", json=REQUEST).json()["model_version"] == version_a + "-b",
                   what="the pointer's bundle serving")


def test_a_republished_day_is_picked_up_and_never_mixed(world, redis_server):
    _, store, bundle_a, _ = world
    prefix = f"m{next(_prefixes)}"
    versions = [publish(redis_server, store, DAYS[1], prefix)]
    app = create_app(ServeConfig(bundle=bundle_a, redis_url=redis_server.url, redis_prefix=prefix, knowledge_refresh_s=0.05))
    bundle = app.state.serving.bundle
    with running_server(app) as server, RequestLoop(server.url) as loop:
        versions.append(publish(redis_server, store, DAYS[2], prefix))
        eventually(lambda: any(body.get("knowledge_version") == versions[1] for _, _, body in loop.results[-3:]),
                   what="the new day served")
    # Each response's scores are exactly its reported version's: no request read a mixture of two days.
    expected = {}
    for version in versions:
        pinned = RedisKnowledge(RedisKnowledgeConfig(url=redis_server.url, prefix=prefix), version=version)
        expected[version] = bundle.score(REQUEST["user_id"], REQUEST["candidates"], context=REQUEST["context"],
                                         history=REQUEST["history"], knowledge=pinned).scores
    assert expected[versions[0]] != pytest.approx(expected[versions[1]], abs=1e-6)  # the days differ
    seen = set()
    for _, status, body in loop.results:
        assert status == 200 and body["knowledge_version"] in expected, body
        assert body["scores"] == pytest.approx(expected[body["knowledge_version"]], abs=1e-6), body["knowledge_version"]
        seen.add(body["knowledge_version"])
    assert seen == set(versions)


# -- the command -------------------------------------------------------------------------------------


def test_lumrec_serve_starts_answers_and_stops_on_sigterm(world, redis_server):
    _, store, bundle_a, _ = world
    prefix = f"m{next(_prefixes)}"
    publish(redis_server, store, DAYS[1], prefix)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lumrec.cli", "serve", bundle_a, "--redis", redis_server.url,
                                "--prefix", prefix, "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            lines.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            if match or not line:
                break
        assert match, "".join(lines)
        assert bundle_a in line and "version" in line and redis_server.url in line
        url = match.group(1)
        eventually(lambda: _get(url + "/readyz") == 200, timeout=20, what="the subprocess ready")
        assert httpx.post(url + "/rank", json=REQUEST).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return -1
