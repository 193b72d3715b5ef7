"""Ranking samples: hand-checked examples of each protocol, the point-in-time rule on random data,
negatives, determinism, resumable batches against a per-sample reference, and bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lumrec.data.dataset import Dataset, DatasetMeta, day_bounds, shift_ds
from lumrec.data.ranking_samples import (
    CANDIDATE_KEYS,
    TEST,
    TRAIN,
    VALID,
    RankingBatchLoader,
    RankingSampleConfig,
    build_ranking_samples,
)
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.data.validate import DataValidationError

D0 = "2024-01-01"


def day(k: int) -> int:
    """Start ts of day D0 + k."""
    return day_bounds(shift_ds(D0, k))[0]


def write_dataset(root, behaviours, impressions=None, items=None, with_rating=True, meta=True) -> Dataset:
    """Write event dicts (storage order kept within each day) as a lumrec dataset.

    behaviours: dicts with user, ts, item, cat, action (1), rating (None = null), scenario (1), query (0).
    impressions: dicts with user, ts, item, label, cat (optional).
    """
    data = Dataset(root)

    def by_day(rows):
        days = {}
        for r in rows:
            days.setdefault(r["ts"] // 86400, []).append(r)
        return sorted(days.items())

    for d, rows in by_day(behaviours):
        cols = {
            "user_id": pa.array([r["user"] for r in rows], pa.int64()),
            "ts": pa.array([r["ts"] for r in rows], pa.int64()),
            "item_id": pa.array([r["item"] for r in rows], pa.int64()),
            "scenario": pa.array([r.get("scenario", 1) for r in rows], pa.int32()),
            "category_id": pa.array([r.get("cat", 0) for r in rows], pa.int64()),
            "action": pa.array([r.get("action", 1) for r in rows], pa.int32()),
            "query_id": pa.array([r.get("query", 0) for r in rows], pa.int64()),
        }
        if with_rating:
            cols["rating"] = pa.array([r.get("rating") for r in rows], pa.float32())
        data.write_day("behaviours", str(np.datetime64(d, "D")), pa.table(cols))
    for d, rows in by_day(impressions or []):
        cols = {
            "user_id": pa.array([r["user"] for r in rows], pa.int64()),
            "ts": pa.array([r["ts"] for r in rows], pa.int64()),
            "item_id": pa.array([r["item"] for r in rows], pa.int64()),
            "scenario": pa.array([1] * len(rows), pa.int32()),
            "label": pa.array([r["label"] for r in rows], pa.float32()),
        }
        if all("cat" in r for r in rows):
            cols["category_id"] = pa.array([r["cat"] for r in rows], pa.int64())
        data.write_day("impressions", str(np.datetime64(d, "D")), pa.table(cols))
    if items is not None:
        data.write_table("items", pa.table({"item_id": pa.array(list(items), pa.int64()), "category_id": pa.array(list(items.values()), pa.int64())}))
    if meta:
        data.write_meta(DatasetMeta(name="t", source="test"))
    return data


def hist_items(s, i):
    return s.history_of(i)["item_id"].tolist()


# -- hand-checked examples --------------------------------------------------------------------


def test_explicit_ratings_hand_checked(tmp_path):
    ev = [
        dict(user=1, ts=day(0) + 10, item=1, cat=1, rating=5.0),
        dict(user=1, ts=day(0) + 10, item=2, cat=2, rating=3.0),  # same second as the previous: not its history
        dict(user=2, ts=day(0) + 20, item=2, cat=2, rating=4.0),
        dict(user=1, ts=day(1) + 5, item=3, cat=1, rating=4.0),
        dict(user=2, ts=day(2) + 7, item=1, cat=1, rating=1.0),
        dict(user=1, ts=day(3) + 1, item=4, cat=2, rating=2.0),
        dict(user=2, ts=day(4) + 3, item=3, cat=1, rating=5.0),
    ]
    s = build_ranking_samples(write_dataset(tmp_path / "d", ev), RankingSampleConfig(protocol="explicit_ratings"))
    # 5 days with samples: the last ceil(0.5) = 1 day is test, the one before validation.
    got = [
        (int(s.user_id[i]), int(s.item_id[i]), float(s.label[i]), int(s.ts[i]), str(s.ds[i]), int(s.category_id[i]), int(s.split[i]), hist_items(s, i))
        for i in range(len(s))
    ]
    assert got == [
        (1, 1, 1.0, day(0) + 10, "2024-01-01", 1, TRAIN, []),
        (1, 2, 0.0, day(0) + 10, "2024-01-01", 2, TRAIN, []),
        (1, 3, 1.0, day(1) + 5, "2024-01-02", 1, TRAIN, [1, 2]),
        (1, 4, 0.0, day(3) + 1, "2024-01-04", 2, VALID, [1, 2, 3]),
        (2, 2, 1.0, day(0) + 20, "2024-01-01", 2, TRAIN, []),
        (2, 1, 0.0, day(2) + 7, "2024-01-03", 1, TRAIN, [2]),
        (2, 3, 1.0, day(4) + 3, "2024-01-05", 1, TEST, [2, 1]),
    ]
    assert s.history_of(3)["rating"].tolist() == [5.0, 3.0, 4.0]
    assert s.info["test_start"] == "2024-01-05" and s.info["valid_start"] == "2024-01-04"
    assert s.counts()["test"] == {"samples": 1, "positives": 1, "users": 1}
    # Explicit days and a threshold of 3: the tie sample turns positive, validation = days 2..3.
    s2 = build_ranking_samples(
        tmp_path / "d", RankingSampleConfig(protocol="explicit_ratings", positive_threshold=3.0, valid_start="2024-01-03", test_start="2024-01-04")
    )
    assert s2.label.tolist() == [1, 1, 1, 0, 1, 0, 1]
    assert s2.split.tolist() == [TRAIN, TRAIN, TRAIN, TEST, TRAIN, VALID, TEST]
    # min_history drops the samples without enough past ratings.
    s3 = build_ranking_samples(tmp_path / "d", RankingSampleConfig(protocol="explicit_ratings", min_history=2, split_mode="quantile", test_fraction=0.3))
    assert s3.item_id.tolist() == [3, 4, 3] and s3.split.tolist() == [TRAIN, VALID, TEST]  # ceil(0.3 * 3) = 1 test, ceil(0.1 * 3) = 1 valid


def test_implicit_next_item_hand_checked(tmp_path):
    t = day(0)
    ev = [dict(user=1, ts=t + k, item=k + 1, cat=0) for k in range(4)]  # items 1, 2, 3, 4
    ev += [dict(user=2, ts=t + 0, item=5), dict(user=2, ts=t + 1, item=5), dict(user=2, ts=t + 2, item=1), dict(user=3, ts=t, item=2)]
    items = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3}
    data = write_dataset(tmp_path / "d", ev, items=items, with_rating=False)
    s = build_ranking_samples(data, RankingSampleConfig(protocol="implicit_next_item", seed=3))
    rows = [(int(s.user_id[i]), int(s.item_id[i]), float(s.label[i]), int(s.split[i]), hist_items(s, i)) for i in range(len(s))]
    pos = [r for r in rows if r[2] == 1.0]
    assert pos == [
        (1, 2, 1.0, TRAIN, [1]),
        (1, 3, 1.0, VALID, [1, 2]),
        (1, 4, 1.0, TEST, [1, 2, 3]),
        (2, 5, 1.0, VALID, [5]),
        (2, 1, 1.0, TEST, [5, 5]),
    ]  # user 3 has one event: no target with a history
    assert s.label.tolist() == [1, 0] * 5  # each positive followed by its negative, same context and history
    neg = [r for r in rows if r[2] == 0.0]
    assert [r[:1] + r[3:] for r in neg] == [r[:1] + r[3:] for r in pos]
    assert neg[2][1] == 5  # user 1 had items 1-4 by then: only 5 is left
    assert neg[0][1] in {3, 4, 5} and neg[1][1] in {4, 5} and neg[3][1] in {1, 2, 3, 4} and neg[4][1] in {2, 3, 4}
    assert s.category_id.tolist() == [items[i] for i in s.item_id.tolist()]  # the catalogue's category for both labels
    np.testing.assert_array_equal(s.ts[0::2], s.ts[1::2])
    # max_train_per_user keeps the most recent training targets.
    ev6 = [dict(user=1, ts=t + k, item=k + 1) for k in range(7)]
    s6 = build_ranking_samples(
        write_dataset(tmp_path / "e", ev6, items={k: 1 for k in range(1, 11)}, with_rating=False),
        RankingSampleConfig(protocol="implicit_next_item", max_train_per_user=2, num_negatives=2),
    )
    assert s6.item_id[s6.label == 1].tolist() == [4, 5, 6, 7]
    assert s6.split[s6.label == 1].tolist() == [TRAIN, TRAIN, VALID, TEST]
    assert len(s6) == 12 and s6.label.tolist() == [1, 0, 0] * 4


def test_impressions_hand_checked(tmp_path):
    beh = [
        dict(user=1, ts=day(0) + 100, item=1, cat=1, action=1),
        dict(user=1, ts=day(0) + 200, item=1, cat=1, action=3),
        dict(user=1, ts=day(1) + 50, item=2, cat=2, action=1),
    ]
    imp = [
        dict(user=1, ts=day(0) + 100, item=1, label=1.0),  # the click has the same ts: not in its history
        dict(user=1, ts=day(0) + 100, item=3, label=0.0),
        dict(user=2, ts=day(0) + 300, item=2, label=0.0),  # a user without behaviours
        dict(user=1, ts=day(1) + 50, item=2, label=1.0),
        dict(user=1, ts=day(1) + 10, item=4, label=0.0),
        dict(user=1, ts=day(2) + 1, item=5, label=0.0),
        dict(user=2, ts=day(2) + 2, item=1, label=0.0),
    ]
    items = {1: 1, 2: 2, 3: 1, 4: 3, 5: 3}
    data = write_dataset(tmp_path / "d", beh, impressions=imp, items=items, with_rating=False)
    s = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", test_start="2024-01-03", valid_fraction=0.0))
    got = [(int(s.user_id[i]), int(s.item_id[i]), float(s.label[i]), int(s.category_id[i]), int(s.split[i]), hist_items(s, i)) for i in range(len(s))]
    assert got == [
        (1, 1, 1.0, 1, TRAIN, []),
        (1, 3, 0.0, 1, TRAIN, []),
        (2, 2, 0.0, 2, TRAIN, []),
        (1, 2, 1.0, 2, TRAIN, [1, 1]),
        (1, 4, 0.0, 3, TRAIN, [1, 1]),
        (1, 5, 0.0, 3, TEST, [1, 1, 2]),
        (2, 1, 0.0, 1, TEST, []),
    ]
    assert s.history_of(5)["action"].tolist() == [1, 3, 1] and s.history_rating is None
    # A day range restricts the samples, not the histories.
    s2 = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", first_day="2024-01-02", valid_fraction=0.0))
    assert s2.item_id.tolist() == [2, 4, 5, 1] and s2.split.tolist() == [TRAIN, TRAIN, TEST, TEST]
    assert hist_items(s2, 0) == [1, 1]


# -- random data: point-in-time, negatives, batches -------------------------------------------


def random_events(seed: int, n_users: int = 12, n_items: int = 15, n_days: int = 4):
    """Behaviours with same-second ties and gaps, ratings with some nulls, and impressions on the same users."""
    rng = np.random.default_rng(seed)
    beh, imp = [], []
    for u in range(1, n_users + 1):
        n = int(rng.integers(1, 12))
        ts = np.sort(day(0) + rng.integers(0, n_days * 86400, n))
        for j in range(1, n):  # same-second events
            if rng.random() < 0.25:
                ts[j] = ts[j - 1]
        for t in ts.tolist():
            item = int(rng.integers(1, n_items + 1))
            rating = None if rng.random() < 0.1 else float(rng.integers(1, 6))
            beh.append(dict(user=u, ts=t, item=item, cat=item % 4, action=int(rng.integers(1, 4)), rating=rating, query=int(rng.integers(0, 3))))
        for t in (day(0) + rng.integers(0, n_days * 86400, int(rng.integers(0, 8)))).tolist():
            item = int(rng.integers(1, n_items + 1))
            imp.append(dict(user=u, ts=t, item=item, label=float(rng.random() < 0.3), cat=item % 4))
    beh.sort(key=lambda r: r["ts"] // 86400)  # day files; stable, so each user stays in time order
    imp.sort(key=lambda r: r["ts"] // 86400)
    return beh, imp, {i: i % 4 for i in range(1, n_items + 1)}


def reference_history(beh, user, ts):
    """The events of `user` strictly before ts, in storage order (plain Python)."""
    return [r for r in beh if r["user"] == user and r["ts"] < ts]


@pytest.fixture(scope="module")
def random_sets(tmp_path_factory):
    out = []
    for seed in range(3):
        beh, imp, items = random_events(seed)
        data = write_dataset(tmp_path_factory.mktemp(f"r{seed}"), beh, impressions=imp, items=items)
        out.append((beh, imp, items, data))
    return out


CONFIGS = [
    RankingSampleConfig(protocol="explicit_ratings", split_mode="quantile", test_fraction=0.2, valid_fraction=0.2),
    RankingSampleConfig(protocol="impressions", test_fraction=0.25, valid_fraction=0.25),
    RankingSampleConfig(protocol="implicit_next_item", num_negatives=3, negative_sampling="popularity"),
    RankingSampleConfig(protocol="implicit_next_item", min_history=0, max_train_per_user=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.protocol)
def test_histories_are_point_in_time_on_random_data(random_sets, cfg):
    for beh, imp, items, data in random_sets:
        s = build_ranking_samples(data, cfg)
        assert len(s) > 0
        for i in range(len(s)):
            ref = reference_history(beh, int(s.user_id[i]), int(s.ts[i]))
            h = s.history_of(i)
            assert h["item_id"].tolist() == [r["item"] for r in ref]
            assert h["ts"].tolist() == [r["ts"] for r in ref]
            assert h["category_id"].tolist() == [r["cat"] for r in ref]
            assert h["action"].tolist() == [r["action"] for r in ref]
            assert h["query_id"].tolist() == [r["query"] for r in ref]
            assert np.array_equal(h["rating"], np.array([np.nan if r["rating"] is None else r["rating"] for r in ref], np.float32), equal_nan=True)
            assert (h["ts"] < s.ts[i]).all()
        if cfg.protocol == "explicit_ratings":  # every rated event, in user then storage order
            rated = sorted((r for r in beh if r["rating"] is not None), key=lambda r: r["user"])
            assert s.item_id.tolist() == [r["item"] for r in rated]
            assert s.label.tolist() == [float(r["rating"] >= 4) for r in rated]
        if cfg.protocol == "impressions":
            assert sorted(zip(s.user_id.tolist(), s.ts.tolist(), s.item_id.tolist())) == sorted((r["user"], r["ts"], r["item"]) for r in imp)
        if cfg.protocol == "implicit_next_item":
            check_negatives(s, beh, items, cfg)


def check_negatives(s, beh, items, cfg):
    """Positives are the reference's next items with their leave-one-out split; each is followed by
    `num_negatives` catalogue items the user had no event with at or before its ts."""
    k, min_history = cfg.num_negatives, cfg.effective_min_history()
    expected = []
    for user in sorted({r["user"] for r in beh}):
        mine = [r for r in beh if r["user"] == user]
        for j, r in enumerate(mine):
            from_end = len(mine) - 1 - j
            if len(reference_history(beh, user, r["ts"])) < min_history:
                continue
            if cfg.max_train_per_user is not None and from_end >= 2 + cfg.max_train_per_user:
                continue
            expected.append((user, r["item"], r["ts"], TEST if from_end == 0 else VALID if from_end == 1 else TRAIN))
    pos = np.flatnonzero(s.label == 1)
    assert [(int(s.user_id[i]), int(s.item_id[i]), int(s.ts[i]), int(s.split[i])) for i in pos] == expected
    assert len(s) == len(pos) * (k + 1) and (pos == np.arange(0, len(s), k + 1)).all()
    for i in pos.tolist():
        user, ts = int(s.user_id[i]), int(s.ts[i])
        seen = {r["item"] for r in beh if r["user"] == user and r["ts"] <= ts}
        for j in range(i + 1, i + 1 + k):
            assert s.label[j] == 0 and s.user_id[j] == user and s.ts[j] == ts and s.history_length[j] == s.history_length[i]
            assert s.split[j] == s.split[i] and int(s.item_id[j]) in items and int(s.item_id[j]) not in seen


def test_negatives_avoid_seen_items_when_catalogue_is_nearly_exhausted(tmp_path):
    # 30 distinct items of a catalogue of 31: rejection sampling mostly fails, the exact fallback must finish.
    ev = [dict(user=1, ts=day(0) + k, item=k + 1) for k in range(30)]
    data = write_dataset(tmp_path / "d", ev, items={i: 1 for i in range(1, 32)}, with_rating=False)
    s = build_ranking_samples(data, RankingSampleConfig(protocol="implicit_next_item", num_negatives=2))
    check_negatives(s, ev, {i: 1 for i in range(1, 32)}, RankingSampleConfig(protocol="implicit_next_item", num_negatives=2))
    assert set(s.item_id[s.label == 0][-2:].tolist()) == {31}


def test_same_seed_same_samples_and_other_seed_other_negatives(random_sets):
    data = random_sets[0][3]
    cfg = RankingSampleConfig(protocol="implicit_next_item", num_negatives=2, seed=7)
    a, b = build_ranking_samples(data, cfg), build_ranking_samples(data, cfg)
    for name in ("user_id", "item_id", "label", "ts", "category_id", "split", "user_row", "history_length"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = build_ranking_samples(data, RankingSampleConfig(protocol="implicit_next_item", num_negatives=2, seed=8))
    np.testing.assert_array_equal(a.item_id[a.label == 1], c.item_id[c.label == 1])
    assert not np.array_equal(a.item_id, c.item_id)


def reference_batch(s, idx, max_history):
    """Per-sample Python reference of `batch`."""
    out = {"hist_item_id": [], "hist_category_id": [], "hist_action": [], "hist_ts": [], "hist_rating": []}
    for i in idx:
        h = s.history_of(int(i))
        m = len(h["item_id"]) if max_history is None else min(max_history, len(h["item_id"]))
        cut = slice(len(h["item_id"]) - m, None)
        out["hist_item_id"].append(h["item_id"][cut].tolist())
        out["hist_category_id"].append(h["category_id"][cut].tolist())
        out["hist_action"].append(h["action"][cut].tolist())
        out["hist_ts"].append(h["ts"][cut].tolist())
        out["hist_rating"].append(h["rating"][cut].tolist())
    return out


@pytest.mark.parametrize("max_history", [0, 1, 3, None])
def test_batch_equals_per_sample_reference(random_sets, max_history):
    s = build_ranking_samples(random_sets[1][3], RankingSampleConfig(protocol="explicit_ratings", split_mode="quantile"))
    rng = np.random.default_rng(0)
    for idx in (rng.integers(0, len(s), 9), np.array([0]), np.array([], np.int64), np.arange(len(s))):
        b = s.batch(idx, max_history, history_keys=("hist_item_id", "hist_category_id", "hist_action"))
        ref = reference_batch(s, idx, max_history)
        assert len(b) == len(idx) and b.history.stride() == len(idx)
        for key in ("hist_item_id", "hist_category_id", "hist_action"):
            assert [x.tolist() for x in b.history[key].to_dense()] == ref[key]
        lengths = [len(x) for x in ref["hist_item_id"]]
        assert b.hist_lengths.tolist() == lengths and b.hist_offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        assert b.hist_ts.tolist() == sum(ref["hist_ts"], []) and b.hist_action.tolist() == sum(ref["hist_action"], [])
        np.testing.assert_array_equal(b.hist_rating.numpy(), np.array(sum(ref["hist_rating"], []), np.float32))
        assert b.user_id.tolist() == s.user_id[idx].tolist() and b.item_id.tolist() == s.item_id[idx].tolist()
        assert b.labels.dtype == b.label.dtype == __import__("torch").float32 and b.label.tolist() == s.label[idx].tolist()
        assert b.ds == s.ds[idx].tolist() and b.sample_index.tolist() == idx.tolist()
        sf = b.sparse_features
        assert sf.keys() == list(CANDIDATE_KEYS) + ["hist_item_id", "hist_category_id", "hist_action"]
        assert [x.tolist() for x in sf["item_id"].to_dense()] == [[int(v)] for v in s.item_id[idx]]
        assert [x.tolist() for x in sf["hist_item_id"].to_dense()] == ref["hist_item_id"]
        moved = b.to("cpu")
        assert moved.item_id.equal(b.item_id) and moved.history.keys() == b.history.keys()


@pytest.mark.parametrize("max_history", [0, 2, None])
def test_list_keys_equal_per_sample_reference(random_sets, max_history):
    """Key X = the candidate's item list, hist_X = the kept behaviours' lists concatenated, oldest first."""
    from dataclasses import replace

    from lumrec.data.tokens import JaggedIds

    s = build_ranking_samples(random_sets[0][3], RankingSampleConfig(protocol="implicit_next_item"))
    rng = np.random.default_rng(1)
    n_items = int(max(s.item_id.max(), s.history.item_id.max())) + 1
    lengths = rng.integers(0, 4, n_items).astype(np.int32)  # empty lists included
    lists = JaggedIds(lengths, rng.integers(1, 30, int(lengths.sum())))
    per_item = [lists.values[lists.offsets()[i]:lists.offsets()[i + 1]].tolist() for i in range(n_items)]
    s = replace(s, item_lists={"tags": lists})
    assert s.list_keys() == ["tags", "hist_tags"]
    for idx in (rng.integers(0, len(s), 11), np.array([], np.int64), np.arange(len(s))):
        b = s.batch(idx, max_history, list_keys=("hist_tags", "tags"))
        ref = reference_batch(s, idx, max_history)
        assert b.lists.stride() == len(idx) and b.sparse_features.keys()[-2:] == ["hist_tags", "tags"]
        assert [x.tolist() for x in b.lists["tags"].to_dense()] == [per_item[int(i)] for i in s.item_id[idx]]
        assert [x.tolist() for x in b.lists["hist_tags"].to_dense()] == [sum((per_item[h] for h in hist), []) for hist in ref["hist_item_id"]]
    assert s.batch(np.arange(3)).lists is None
    with pytest.raises(ValueError, match="unknown list key 'colours'"):
        s.batch(np.arange(3), list_keys=("colours",))
    with pytest.raises(ValueError, match="item list 'tags' covers item ids < 2"):
        replace(s, item_lists={"tags": JaggedIds(np.ones(2, np.int32), np.ones(2, np.int64))})
    with pytest.raises(ValueError, match="starts with 'hist_'"):
        replace(s, item_lists={"hist_tags": lists})


def test_iter_batches_deterministic_and_resumable(random_sets):
    s = build_ranking_samples(random_sets[2][3], RankingSampleConfig(protocol="implicit_next_item"))
    n_train = len(s.indices("train"))
    full = RankingBatchLoader(s, "train", batch_size=4, max_history=2, shuffle_seed=5)
    epochs = [[b.sample_index.tolist() for b in full] for _ in range(2)]
    assert full.state_dict() == {"epoch": 2, "batch": 0}
    assert sorted(sum(epochs[0], [])) == s.indices("train").tolist() and len(epochs[0]) == -(-n_train // 4)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = RankingBatchLoader(s, "train", batch_size=4, max_history=2, shuffle_seed=5)
    it = iter(again)
    head = [next(it).sample_index.tolist() for _ in range(3)]
    state = again.state_dict()
    assert state == {"epoch": 0, "batch": 3} and head == epochs[0][:3]
    resumed = RankingBatchLoader(s, "train", batch_size=4, max_history=2, shuffle_seed=5)
    resumed.load_state_dict(state)
    rest = [b for b in resumed]
    assert [b.sample_index.tolist() for b in rest] == epochs[0][3:]
    assert [b.sample_index.tolist() for b in resumed] == epochs[1]
    ref = s.batch(np.array(epochs[0][3]), max_history=2)
    assert [x.tolist() for x in rest[0].history["hist_item_id"].to_dense()] == [x.tolist() for x in ref.history["hist_item_id"].to_dense()]
    # No shuffle: storage order; drop_last drops the partial batch.
    plain = [b.sample_index.tolist() for b in s.iter_batches("test", 3, drop_last=True)]
    assert sum(plain, []) == s.indices("test")[: 3 * (len(s.indices("test")) // 3)].tolist()


# -- synthetic logs ---------------------------------------------------------------------------


def test_synthetic_logs(tmp_path):
    cfg = SynthConfig(num_users=40, num_items=30, num_categories=4, num_queries=8, num_days=3, impressions_per_user_day=10)
    generate(tmp_path / "syn", cfg)
    data = Dataset(tmp_path / "syn")
    beh = data.read_days("behaviours").to_pylist()
    s = build_ranking_samples(data, RankingSampleConfig(protocol="impressions"))
    imp = data.read_days("impressions")
    assert len(s) == imp.num_rows and s.label.sum() == pa.compute.sum(imp.column("label")).as_py()
    assert s.split.tolist().count(TEST) == sum(d == "2026-01-03" for d in imp.column("ds").to_pylist())
    by_user = {}
    for r in beh:
        by_user.setdefault(r["user_id"], []).append(r)
    for i in range(0, len(s), 7):
        ref = [r for r in by_user.get(int(s.user_id[i]), []) if r["ts"] < s.ts[i]]
        assert s.history_of(i)["item_id"].tolist() == [r["item_id"] for r in ref]
        assert s.history_of(i)["query_id"].tolist() == [r["query_id"] for r in ref]
    # A click is logged at its impression's ts, so no clicked impression sees its own click.
    for i in np.flatnonzero(s.label == 1).tolist():
        h = s.history_of(i)
        assert not ((h["item_id"] == s.item_id[i]) & (h["ts"] == s.ts[i])).any()
    nxt = build_ranking_samples(data, RankingSampleConfig(protocol="implicit_next_item", seed=1))
    for i in np.flatnonzero(nxt.label == 0).tolist():
        seen = {r["item_id"] for r in by_user[int(nxt.user_id[i])] if r["ts"] <= nxt.ts[i]}
        assert int(nxt.item_id[i]) not in seen and 1 <= nxt.item_id[i] <= cfg.num_items


def test_whole_split_modes_put_one_day_in_one_split(tmp_path):
    """Daily jobs: all of day D is training data, all of day D+1 is test data (same histories as a time split)."""
    generate(tmp_path / "syn", SynthConfig(num_users=30, num_items=20, num_categories=3, num_queries=4, num_days=3,
                                           impressions_per_user_day=5), progress=False)
    data = Dataset(tmp_path / "syn")
    both = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", first_day="2026-01-02", last_day="2026-01-03",
                                                           test_start="2026-01-03", valid_fraction=0.0))
    train = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", first_day="2026-01-02", last_day="2026-01-02",
                                                            split_mode="all_train"))
    test = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", first_day="2026-01-03", last_day="2026-01-03",
                                                           split_mode="all_test"))
    assert train.counts()["valid"]["samples"] == train.counts()["test"]["samples"] == 0
    assert test.counts()["train"]["samples"] == test.counts()["valid"]["samples"] == 0
    assert train.counts()["train"] == both.counts()["train"] and test.counts()["test"] == both.counts()["test"]
    first = int(np.flatnonzero(both.split == TEST)[0])
    assert test.history_of(0)["item_id"].tolist() == both.history_of(first)["item_id"].tolist()


# -- bad input --------------------------------------------------------------------------------


def test_errors_name_what_is_missing(tmp_path):
    ev = [dict(user=1, ts=day(k), item=k + 1, rating=4.0) for k in range(3)]
    data = write_dataset(tmp_path / "d", ev)
    with pytest.raises(DataValidationError, match="no impressions table"):
        build_ranking_samples(data, RankingSampleConfig(protocol="impressions"))
    no_rating = write_dataset(tmp_path / "n", ev, with_rating=False)
    with pytest.raises(DataValidationError, match="column 'rating'.*no rating column"):
        build_ranking_samples(no_rating, RankingSampleConfig(protocol="explicit_ratings"))
    null_rating = write_dataset(tmp_path / "z", [dict(r, rating=None) for r in ev])
    with pytest.raises(DataValidationError, match="every rating is null"):
        build_ranking_samples(null_rating, RankingSampleConfig(protocol="explicit_ratings"))
    with pytest.raises(DataValidationError, match="unknown split day test_start=2030-01-01.*2024-01-01..2024-01-03"):
        build_ranking_samples(data, RankingSampleConfig(protocol="explicit_ratings", test_start="2030-01-01"))
    with pytest.raises(DataValidationError, match="unknown split day valid_start=2024-01-01"):
        build_ranking_samples(data, RankingSampleConfig(protocol="explicit_ratings", valid_start="2024-01-01"))
    with pytest.raises(DataValidationError, match="unknown split day valid_start=2024-01-02.*span 2024-01-02..2024-01-03"):
        build_ranking_samples(data, RankingSampleConfig(protocol="explicit_ratings", valid_start="2024-01-02", min_history=1))
    ties = write_dataset(tmp_path / "t", [dict(user=1, ts=day(0), item=1, rating=1.0)] + [dict(user=1, ts=day(1), item=i, rating=1.0) for i in (2, 3, 4)])
    with pytest.raises(DataValidationError, match="empty train split: no samples before 2024-01-01"):
        build_ranking_samples(ties, RankingSampleConfig(protocol="explicit_ratings", split_mode="quantile", test_fraction=0.5))
    one_day = write_dataset(tmp_path / "o", [dict(user=1, ts=day(0) + k, item=k + 1, rating=3.0) for k in range(3)])
    with pytest.raises(DataValidationError, match="only 1 day"):
        build_ranking_samples(one_day, RankingSampleConfig(protocol="explicit_ratings"))
    singles = write_dataset(tmp_path / "s", [dict(user=u, ts=day(0) + u, item=u) for u in (1, 2)], with_rating=False)
    with pytest.raises(DataValidationError, match="empty test split"):
        build_ranking_samples(singles, RankingSampleConfig(protocol="implicit_next_item"))
    imp = write_dataset(tmp_path / "i", ev, impressions=[dict(user=1, ts=day(k), item=1, label=1.0) for k in range(3)])
    with pytest.raises(DataValidationError, match="column 'click'"):
        build_ranking_samples(imp, RankingSampleConfig(protocol="impressions", label_column="click"))
    with pytest.raises(DataValidationError, match="impressions: no impressions left after.*min_history=3"):
        build_ranking_samples(imp, RankingSampleConfig(protocol="impressions", min_history=3))
    with pytest.raises(DataValidationError, match="impressions: only 1 day"):
        build_ranking_samples(imp, RankingSampleConfig(protocol="impressions", min_history=2))
    back = write_dataset(tmp_path / "b", [dict(user=1, ts=day(0) + 50, item=1), dict(user=2, ts=day(0), item=1), dict(user=1, ts=day(0) + 10, item=2)])
    with pytest.raises(DataValidationError, match=r"behaviours: column 'ts': user 1: events out of ts order.*ts 1704067210 on ds=2024-01-01"):
        build_ranking_samples(back, RankingSampleConfig(protocol="implicit_next_item"))
    with pytest.raises(FileNotFoundError, match="not a lumrec dataset"):
        build_ranking_samples(write_dataset(tmp_path / "m", ev, meta=False), RankingSampleConfig(protocol="explicit_ratings"))
    s = build_ranking_samples(data, RankingSampleConfig(protocol="explicit_ratings", test_start="2024-01-03", valid_fraction=0.0))
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        s.indices("validation")
    with pytest.raises(ValueError, match="unknown history key 'hist_rating'"):
        s.batch([0], history_keys=("hist_rating",))
    with pytest.raises(IndexError, match="out of range"):
        s.batch([len(s)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(protocol="ranking"), "protocol"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(valid_fraction=0.95), "valid_fraction"),
        (dict(num_negatives=0), "num_negatives"),
        (dict(max_train_per_user=0), "max_train_per_user"),
        (dict(test_start="2024-13-01"), "test_start: bad day '2024-13-01'"),
        (dict(valid_start="2024-02-01", test_start="2024-01-15"), "valid_start 2024-02-01 is after test_start"),
        (dict(negative_sampling="hard"), "negative_sampling"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankingSampleConfig(**kwargs)
