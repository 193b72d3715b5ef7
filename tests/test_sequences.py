"""Tests of per-user behaviour sequences: grouping, stable time order, truncation, selections, leave-n-out."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumrec.data.dataset import Dataset, day_bounds
from lumrec.data.sequences import (
    EVENT_COLUMNS,
    UserSequences,
    build_user_sequences,
    concat_sequences,
    ragged_arange,
    sequences_from_dataset,
)
from lumrec.data.validate import DataValidationError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def events(rows: list[tuple[int, int, int]], **extra) -> pa.Table:
    """A behaviours table from (user, ts, item) triples; other columns derived from the item so order is checkable."""
    u, t, i = (np.array(c, dtype=np.int64) for c in zip(*rows))
    cols = {
        "user_id": u,
        "ts": t,
        "item_id": i,
        "scenario": pa.array((i % 2 + 1).astype(np.int32)),
        "category_id": i % 3 + 1,
        "action": pa.array((i % 4).astype(np.int32)),
    }
    cols.update(extra)
    return pa.table(cols)


def reference(table: pa.Table) -> dict[int, list[int]]:
    """Per user, item ids ordered by (ts, input position): a per-event Python reference."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for pos, (u, t, i) in enumerate(zip(table["user_id"].to_pylist(), table["ts"].to_pylist(), table["item_id"].to_pylist())):
        out.setdefault(u, []).append((t, pos, i))
    return {u: [i for _, _, i in sorted(v)] for u, v in out.items()}


def test_unsorted_input_with_ties_is_grouped_and_stably_time_ordered():
    # user 7: ts 5 (item 10), 3 (item 11), 5 (item 12), 1 (item 13); user 2: ts 9, 9 (ties).
    table = events([(7, 5, 10), (2, 9, 20), (7, 3, 11), (7, 5, 12), (2, 9, 21), (7, 1, 13)])
    seqs = build_user_sequences(table)
    assert seqs.user_ids.tolist() == [2, 7]
    assert seqs.offsets.tolist() == [0, 2, 6]
    assert seqs.item_id.tolist() == [20, 21, 13, 11, 10, 12]  # ties keep input order: 10 before 12, 20 before 21
    assert seqs.ts.tolist() == [9, 9, 1, 3, 5, 5]
    assert seqs.category_id.tolist() == [i % 3 + 1 for i in [20, 21, 13, 11, 10, 12]]
    assert seqs.scenario.dtype == np.int32 and seqs.action.dtype == np.int32 and seqs.item_id.dtype == np.int64
    assert seqs.query_id.tolist() == [0] * 6  # column absent -> 0
    assert len(seqs) == 2 and seqs.num_events == 6 and seqs.lengths().tolist() == [2, 4]
    assert seqs.user(1)["item_id"].tolist() == [13, 11, 10, 12]


def test_random_events_match_python_reference():
    rng = np.random.default_rng(3)
    n = 2000
    table = events(list(zip(rng.integers(1, 60, n).tolist(), rng.integers(0, 30, n).tolist(), range(1, n + 1))))
    seqs = build_user_sequences(table)
    ref = reference(table)
    assert seqs.user_ids.tolist() == sorted(ref)
    for row, uid in enumerate(seqs.user_ids.tolist()):
        assert seqs.user(row)["item_id"].tolist() == ref[uid]
        assert np.all(np.diff(seqs.user(row)["ts"]) >= 0)


def test_query_id_nulls_become_zero_and_required_nulls_fail():
    table = events([(1, 1, 5), (1, 2, 6)], query_id=pa.array([None, 4], pa.int64()))
    assert build_user_sequences(table).query_id.tolist() == [0, 4]
    bad = events([(1, 1, 5), (1, 2, 6)]).set_column(2, "item_id", pa.array([5, None], pa.int64()))
    with pytest.raises(DataValidationError, match="item_id.*null.*1 row"):
        build_user_sequences(bad, source="day1.parquet")


def test_missing_column_is_named():
    table = events([(1, 1, 5)]).drop_columns(["scenario"])
    with pytest.raises(DataValidationError, match=r"day\.parquet.*'scenario'"):
        build_user_sequences(table, source="day.parquet")


def test_truncate_keeps_most_recent_events():
    seqs = build_user_sequences(events([(1, t, 100 + t) for t in range(5)] + [(2, 0, 7)]))
    cut = seqs.truncate(3)
    assert cut.offsets.tolist() == [0, 3, 4]
    assert cut.item_id.tolist() == [102, 103, 104, 7]
    assert cut.ts.tolist() == [2, 3, 4, 0]
    assert seqs.truncate(None).equals(seqs) and seqs.truncate(10).equals(seqs)


def test_take_and_select_users():
    seqs = build_user_sequences(events([(5, 0, 1), (3, 0, 2), (3, 1, 3), (9, 0, 4)]))
    assert seqs.take([2, 0]).user_ids.tolist() == [9, 3]
    assert seqs.take([2, 0]).item_id.tolist() == [4, 2, 3]
    sub = seqs.select_users([9, 3])
    assert sub.user_ids.tolist() == [3, 9] and sub.item_id.tolist() == [2, 3, 4]
    with pytest.raises(KeyError, match="not in the sequences"):
        seqs.select_users([3, 4])
    assert seqs.select_users([3, 4], missing_ok=True).user_ids.tolist() == [3]
    assert seqs.filter_min_length(2).user_ids.tolist() == [3]


def test_split_last_leave_one_and_two_out():
    seqs = build_user_sequences(events([(1, t, 10 + t) for t in range(4)] + [(2, t, 20 + t) for t in range(2)] + [(3, 0, 30)]))
    hist, tgt = seqs.split_last(1)
    assert hist.user_ids.tolist() == tgt.user_ids.tolist() == [1, 2]  # user 3 has no history left
    assert hist.item_id.tolist() == [10, 11, 12, 20] and hist.offsets.tolist() == [0, 3, 4]
    assert tgt.item_id.tolist() == [13, 21] and tgt.lengths().tolist() == [1, 1]
    assert tgt.last_events()["item_id"].tolist() == [13, 21]
    hist2, tgt2 = seqs.split_last(2)
    assert hist2.user_ids.tolist() == [1] and hist2.item_id.tolist() == [10, 11] and tgt2.item_id.tolist() == [12, 13]
    # validation / test chain: train = all but last 2, val = second last, test = last
    train_val, test = seqs.split_last(1, min_history=2)
    train, val = train_val.split_last(1)
    assert train.item_id.tolist() == [10, 11] and val.item_id.tolist() == [12] and test.item_id.tolist() == [13]
    with pytest.raises(ValueError):
        seqs.split_last(0)


def test_concat_of_history_and_targets_restores_sequences():
    rng = np.random.default_rng(0)
    table = events(list(zip(rng.integers(1, 30, 500).tolist(), rng.permutation(500).tolist(), range(1, 501))))
    seqs = build_user_sequences(table).filter_min_length(2)
    hist, tgt = seqs.split_last(1)
    assert concat_sequences([hist, tgt]).equals(seqs)


def test_ragged_arange_matches_loop():
    starts, lengths = np.array([5, 0, 9, 2]), np.array([3, 0, 1, 4])
    assert ragged_arange(starts, lengths).tolist() == [5, 6, 7, 9, 2, 3, 4, 5]
    assert ragged_arange(np.zeros(0), np.zeros(0)).tolist() == []


def test_bad_offsets_rejected():
    with pytest.raises(ValueError, match="offsets"):
        UserSequences(np.array([1, 2]), np.array([0, 1]), *[np.zeros(1, d) for d in EVENT_COLUMNS.values()])


def test_stream_from_dataset_over_a_day_range(tmp_path):
    ds = Dataset(tmp_path / "d")
    days = ["2024-01-01", "2024-01-02", "2024-01-03"]
    for k, day in enumerate(days):
        t0 = day_bounds(day)[0]
        extra = {"query_id": pa.array([k, 0], pa.int64())} if k != 1 else {}  # day 2 has no query_id column
        ds.write_day("behaviours", day, events([(1, t0 + 5, 10 * k + 1), (2, t0, 10 * k + 2)], **extra))
    seqs = sequences_from_dataset(ds, start="2024-01-02", end="2024-01-03", batch_size=1)
    assert seqs.user_ids.tolist() == [1, 2]
    assert seqs.item_id.tolist() == [11, 21, 12, 22]
    assert seqs.query_id.tolist() == [0, 2, 0, 0]
    full = sequences_from_dataset(ds)
    assert full.num_events == 6 and full.item_id[:3].tolist() == [1, 11, 21]


@pytest.mark.skipif(not (DATA / "ml-1m" / "interactions.parquet").exists(), reason="shared ML-1M data not present")
def test_ml1m_builds_fast_and_in_position_order():
    raw = pq.read_table(DATA / "ml-1m" / "interactions.parquet")
    n = raw.num_rows
    # Reverse the rows so the build has real sorting to do.
    raw = raw.take(pa.array(np.arange(n)[::-1]))
    table = pa.table(
        {
            "user_id": raw["user_id"],
            "ts": raw["pos"],
            "item_id": raw["movie_id"],
            "scenario": pa.array(np.ones(n, np.int32)),
            "category_id": pa.array(np.zeros(n, np.int64)),
            "action": pa.array(np.ones(n, np.int32)),
        }
    )
    t0 = time.perf_counter()
    seqs = build_user_sequences(table)
    elapsed = time.perf_counter() - t0
    assert len(seqs) == 6040 and seqs.num_events == n
    assert elapsed < 10.0, f"building ML-1M sequences took {elapsed:.1f}s"
    # pos is 0..len-1 within each user once sorted.
    expected_pos = np.arange(n) - np.repeat(seqs.offsets[:-1], seqs.lengths())
    assert np.array_equal(seqs.ts, expected_pos)
