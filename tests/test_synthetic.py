"""Synthetic logs: determinism, valid schemas, point-in-time stats, the planted condition effect, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lumrec.data.dataset import Dataset, day_bounds
from lumrec.data.schema import ACTION_CLICK, ACTION_PURCHASE, SCENARIO_FEED, SCENARIO_SEARCH
from lumrec.data.synthetic import SynthConfig, build_world, generate, interests_on, item_stats_table

# Small on purpose; users_per_chunk < num_users so every day has several part files.
SMALL = dict(num_users=300, num_items=200, num_categories=10, num_queries=30, num_days=3,
             impressions_per_user_day=12.0, users_per_chunk=128, content_dim=8, hidden_dim=8)


def small(**overrides) -> SynthConfig:
    return SynthConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, SynthConfig]:
    cfg = small()
    root = tmp_path_factory.mktemp("synth") / "d"
    generate(root, cfg)
    return root, cfg


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(root: Path, table: str) -> pa.Table:
    return Dataset(root).read_days(table)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC with tied scores counted half (reference for the manifest's streamed AUC)."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    ranks = np.repeat(first + (counts + 1) / 2.0, counts)  # average 1-based ranks
    pos = y.sum()
    neg = len(y) - pos
    return float((ranks[y > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))


def test_same_seed_same_bytes_other_seed_differs(small_set, tmp_path):
    root, cfg = small_set
    generate(tmp_path / "again", cfg)
    first, second = _files(root), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert any(name.startswith("impressions/") for name in first)
    assert first == second
    generate(tmp_path / "other", small(seed=1))
    a, b = _read(root, "impressions"), _read(tmp_path / "other", "impressions")
    assert a.num_rows != b.num_rows or not a.equals(b)


def test_every_table_reads_back_valid(small_set):
    root, cfg = small_set
    data = Dataset(root)
    meta = data.read_meta()
    assert meta.vocab_sizes["user_id"] == cfg.num_users + 1 and meta.vocab_sizes["query_id"] == cfg.num_queries + 1
    assert meta.extra["config"]["seed"] == cfg.seed and meta.extra["planted"]["w_condition"] == cfg.condition_strength
    days = data.days("impressions")
    assert len(days) == cfg.num_days and days[0] == cfg.start_day
    for table in ("impressions", "behaviours", "item_stats"):
        assert data.days(table) == days
        assert sum(b.num_rows for _, b in data.iter_batches(table, validate=True)) > 0
    assert len(data.day_files("impressions", days[0])) == 3  # 300 users in chunks of 128
    users = data.read_table("users")
    assert users.column_names == ["user_id", "region", "age_bucket"]
    assert users.column("user_id").to_pylist() == list(range(1, cfg.num_users + 1))
    items = data.read_table("items")
    assert items.num_rows == cfg.num_items
    lengths = {len(v) for v in items.column("content").to_pylist()}
    assert lengths == {cfg.content_dim}
    for primary, cats in zip(items.column("category_id").to_pylist(), items.column("category_ids").to_pylist()):
        assert cats[0] == primary and 1 <= len(cats) <= 2
    imp = _read(root, "impressions")
    assert set(imp.column_names) >= {"user_id", "ts", "item_id", "scenario", "query_id", "category_id", "label"}
    assert set(np.unique(imp.column("label").to_numpy())) == {0.0, 1.0}


def test_timestamps_inside_their_day_and_sorted_per_user(small_set):
    root, _ = small_set
    data = Dataset(root)
    for table in ("impressions", "behaviours"):
        for ds in data.days(table):
            lo, hi = day_bounds(ds)
            for path in data.day_files(table, ds):
                t = pq.read_table(path)
                user, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
                assert ((ts >= lo) & (ts < hi)).all(), path
                same_user = user[1:] == user[:-1]
                assert (user[1:] >= user[:-1]).all() and (ts[1:][same_user] >= ts[:-1][same_user]).all(), path


def test_query_ids_only_in_search(small_set):
    root, cfg = small_set
    world = build_world(cfg)
    for table in ("impressions", "behaviours"):
        t = _read(root, table)
        scenario, query = t.column("scenario").to_numpy(), t.column("query_id").to_numpy()
        assert set(np.unique(scenario)) == {SCENARIO_FEED, SCENARIO_SEARCH}
        assert (query[scenario == SCENARIO_SEARCH] > 0).all()
        assert (query[scenario == SCENARIO_FEED] == 0).all()
        assert (t.column("category_id").to_numpy() == world.item_cat[t.column("item_id").to_numpy()]).all()
    imp = _read(root, "impressions")
    search = imp.column("scenario").to_numpy() == SCENARIO_SEARCH
    share = search.mean()
    assert abs(share - cfg.search_share) < 0.08
    # Search mostly shows the query's category (search_precision), the feed rarely does.
    in_query_cat = world.query_cat[imp.column("query_id").to_numpy()] == imp.column("category_id").to_numpy()
    assert in_query_cat[search].mean() > cfg.search_precision - 0.05


def test_behaviours_are_the_clicks_plus_purchases(small_set):
    root, _ = small_set
    imp, beh = _read(root, "impressions"), _read(root, "behaviours")
    action = beh.column("action").to_numpy()
    assert set(np.unique(action)) == {ACTION_CLICK, ACTION_PURCHASE}
    key = ["user_id", "ts", "item_id", "scenario", "query_id"]
    clicks = imp.filter(pc.equal(imp.column("label"), 1.0)).select(key).sort_by([(k, "ascending") for k in key])
    beh_clicks = beh.filter(pc.equal(beh.column("action"), ACTION_CLICK)).select(key)
    assert beh_clicks.sort_by([(k, "ascending") for k in key]).equals(clicks)
    assert 0 < (action == ACTION_PURCHASE).sum() < (action == ACTION_CLICK).sum()


def test_item_stats_are_point_in_time(small_set):
    root, cfg = small_set
    data = Dataset(root)
    days = data.days("item_stats")
    stats = {ds: data.read_days("item_stats", ds, ds) for ds in days}
    day0 = stats[days[0]]
    assert day0.column("item_id").to_pylist() == list(range(1, cfg.num_items + 1))
    np.testing.assert_allclose(day0.column("f_ctr_7d").to_numpy(), cfg.stats_prior_ctr, rtol=1e-6)
    assert (day0.column("f_log_impressions_7d").to_numpy() == 0).all()
    assert (day0.column("f_popularity").to_numpy() == 0).all()
    imps = np.zeros(cfg.num_items + 1)
    clicks = np.zeros(cfg.num_items + 1)
    for before, ds in zip(days[:-1], days[1:]):
        t = data.read_days("impressions", before, before)
        item, label = t.column("item_id").to_numpy(), t.column("label").to_numpy()
        imps += np.bincount(item, minlength=cfg.num_items + 1)
        clicks += np.bincount(item, weights=label, minlength=cfg.num_items + 1)
        expected = item_stats_table(imps, clicks, clicks, cfg.stats_prior_ctr, cfg.stats_prior_weight)
        got = stats[ds].drop_columns(["ds"])
        for col in expected.column_names:
            np.testing.assert_allclose(got.column(col).to_numpy(), expected.column(col).to_numpy(), rtol=1e-6, err_msg=col)
        assert np.isfinite(got.column("f_ctr_7d").to_numpy()).all()
    # Shown items get a CTR pulled from the prior towards their own clicks.
    assert stats[days[1]].column("f_ctr_7d").to_numpy().std() > 0


def _condition_fit(root: Path, cfg: SynthConfig, scenario: int) -> tuple[float, float, float]:
    """Fit w in P(click) = sigmoid(oracle_logit_without_condition + w * match) by Newton's method.

    Returns (w, exact oracle AUC, exact oracle AUC without the condition term) over that scenario.
    """
    world = build_world(cfg)
    from lumrec.data.synthetic.events import match

    offsets, matches, labels = [], [], []
    data = Dataset(root)
    for day, ds in enumerate(data.days("impressions")):
        t = data.read_days("impressions", ds, ds)
        t = t.filter(pc.equal(t.column("scenario"), scenario))
        user, item = t.column("user_id").to_numpy(), t.column("item_id").to_numpy()
        u = interests_on(world, cfg, day)
        interest = np.einsum("ij,ij->i", u[user], world.item_vec[item])
        offsets.append(cfg.bias + cfg.interest_strength * interest + cfg.quality_strength * world.item_quality[item])
        matches.append(match(world, user, item, world.query_cat[t.column("query_id").to_numpy()]))
        labels.append(t.column("label").to_numpy())
    off, m, y = (np.concatenate(x).astype(np.float64) for x in (offsets, matches, labels))
    w = 0.0
    for _ in range(50):  # damped Newton steps: a plain one can overshoot from w = 0
        p = 1 / (1 + np.exp(-(off + w * m)))
        w += float(np.clip(((y - p) * m).sum() / (p * (1 - p) * m * m).sum(), -1.0, 1.0))
    return w, _auc(off + cfg.condition_strength * m, y), _auc(off, y)


@pytest.mark.parametrize("strength", [1.5, 0.0])
def test_planted_condition_effect_matches_the_knob(tmp_path, strength):
    cfg = small(num_users=1500, num_days=4, users_per_chunk=50000, condition_strength=strength)
    meta = generate(tmp_path / "d", cfg)
    for scenario, name in ((SCENARIO_SEARCH, "search"), (SCENARIO_FEED, "feed")):
        w, auc_full, auc_plain = _condition_fit(tmp_path / "d", cfg, scenario)
        assert abs(w - strength) < 0.3, (name, w)
        # The streamed AUCs in the manifest agree with an exact computation.
        assert abs(meta.extra["oracle_auc"][name] - auc_full) < 2e-3
        assert abs(meta.extra["oracle_auc_no_condition"][name] - auc_plain) < 2e-3
    ctr = meta.extra["ctr_by_match"]
    gain = meta.extra["oracle_auc"]["all"] - meta.extra["oracle_auc_no_condition"]["all"]
    if strength > 0:
        assert ctr["search_match"] > 2 * ctr["search_nomatch"] and ctr["feed_match"] > 2 * ctr["feed_nomatch"]
        assert gain > 0.02
    else:
        assert abs(ctr["feed_match"] - ctr["feed_nomatch"]) < 0.02  # feed-mode set is independent of taste
        assert gain == 0


def test_each_day_is_written_before_the_next_is_sampled(tmp_path):
    cfg = small(num_days=4)
    root = tmp_path / "d"
    seen = []

    def on_day(report):
        data = Dataset(root)
        # This day's files are complete on disk; no later day exists yet; no manifest yet.
        assert data.days("impressions")[-1] == report.ds and data.days("behaviours")[-1] == report.ds
        assert len(data.day_files("impressions", report.ds)) == report.parts
        rows = sum(pq.read_metadata(p).num_rows for p in data.day_files("impressions", report.ds))
        assert rows == report.impressions > 0
        assert not data.manifest_path.exists()
        seen.append(report.ds)

    generate(root, cfg, on_day=on_day)
    assert seen == Dataset(root).days("impressions")
    assert Dataset(root).manifest_path.exists()


def _peak_traced_bytes(root: Path, cfg: SynthConfig) -> int:
    tracemalloc.start()
    try:
        generate(root, cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_days(tmp_path):
    base = dict(num_users=2000, users_per_chunk=500, impressions_per_user_day=20.0)
    generate(tmp_path / "warm", small(num_days=1, **base))  # one-off import-time allocations out of the way
    short = _peak_traced_bytes(tmp_path / "a", small(num_days=2, **base))
    long = _peak_traced_bytes(tmp_path / "b", small(num_days=8, **base))
    rows = Dataset(tmp_path / "b").read_meta().extra["counts"]["impressions"]
    assert rows > 250_000
    assert long < 1.25 * short, (short, long)


def test_replaces_a_dataset_but_refuses_a_foreign_folder(tmp_path):
    root = tmp_path / "d"
    generate(root, small(num_days=3))
    generate(root, small(num_days=2))  # a shorter regeneration must not leave day 3 behind
    assert len(Dataset(root).days("impressions")) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a lumrec dataset"):
        generate(foreign, small())
    assert (foreign / "notes.txt").exists()


@pytest.mark.parametrize("field,value", [("num_users", 0), ("drift", 1.5), ("search_share", -0.1),
                                         ("num_queries", 5), ("start_day", "2026-13-01")])
def test_bad_config_names_the_field(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        generate(tmp_path / "d", small(**{field: value}))
    assert not (tmp_path / "d").exists()
