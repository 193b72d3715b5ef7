"""dataset_stats / format_stats on small hand-built datasets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from lumrec.data.dataset import Dataset, DatasetMeta, day_bounds, shift_ds
from lumrec.data.stats import dataset_stats, format_stats


def _events(ds: str, users: list[int], items: list[int]) -> pa.Table:
    start, _ = day_bounds(ds)
    n = len(users)
    return pa.table({
        "user_id": pa.array(users, pa.int64()), "ts": pa.array(start + np.arange(n), pa.int64()),
        "item_id": pa.array(items, pa.int64()), "scenario": pa.array([1] * n, pa.int32()),
        "category_id": pa.array([0] * n, pa.int64()), "action": pa.array([1] * n, pa.int32()),
    })  # fmt: skip


def _impressions(ds: str, labels: list[float]) -> pa.Table:
    start, _ = day_bounds(ds)
    n = len(labels)
    return pa.table({
        "user_id": pa.array([1] * n, pa.int64()), "ts": pa.array([start] * n, pa.int64()),
        "item_id": pa.array([1] * n, pa.int64()), "scenario": pa.array([1] * n, pa.int32()),
        "label": pa.array(labels, pa.float32()),
    })  # fmt: skip


@pytest.fixture()
def small(tmp_path):
    ds = Dataset(tmp_path / "small")
    ds.write_day("behaviours", "2020-01-01", _events("2020-01-01", [1, 1, 2], [3, 4, 3]))
    ds.write_day("behaviours", "2020-01-03", _events("2020-01-03", [3], [4]))
    # A second part file of the same day is counted too.
    ds.write_day("behaviours", "2020-01-03", _events("2020-01-03", [1, 4], [5, 5]), part=1)
    ds.write_day("impressions", "2020-01-01", _impressions("2020-01-01", [1.0, 0.0, 0.0]))
    ds.write_day("impressions", "2020-01-03", _impressions("2020-01-03", [1.0]))
    ds.write_meta(DatasetMeta(name="small", source="test", vocab_sizes={"user_id": 6, "item_id": 7, "category_id": 1}))
    return ds.root


def test_stats_counts(small):
    stats = dataset_stats(small)
    assert stats["events"] == 6 and stats["users"] == 4 and stats["items"] == 3
    assert stats["days"] == 2 and (stats["first_day"], stats["last_day"]) == ("2020-01-01", "2020-01-03")
    assert stats["per_day"] == {"2020-01-01": 3, "2020-01-03": 3}
    assert stats["impressions"] == 4 and stats["positive_labels"] == 2
    assert stats["name"] == "small"


def test_stats_without_manifest_counts_the_same(small):
    (small / "_lumrec.json").unlink()
    stats = dataset_stats(small)
    assert (stats["events"], stats["users"], stats["items"], stats["days"]) == (6, 4, 3, 2)


def test_format_stats_short_and_json_last_line(small):
    text = format_stats(dataset_stats(small))
    lines = text.splitlines()
    summary = json.loads(lines[-1])
    assert summary == {
        "events": 6, "users": 4, "items": 3, "days": 2, "impressions": 4, "positive_labels": 2,
        "first_day": "2020-01-01", "last_day": "2020-01-03", "per_day": {"2020-01-01": 3, "2020-01-03": 3},
    }  # fmt: skip
    assert any(line.split()[:2] == ["events", "6"] for line in lines)
    assert "2 positive, 50.0%" in text and "..." not in text


def test_format_stats_long_is_shortened(tmp_path):
    ds = Dataset(tmp_path / "long")
    days = [shift_ds("2021-05-01", i) for i in range(30)]
    for i, day in enumerate(days):
        ds.write_day("behaviours", day, _events(day, [i + 1] * (i + 1), [1] * (i + 1)))
    stats = dataset_stats(ds.root)
    assert stats["events"] == sum(range(1, 31)) and stats["users"] == 30 and stats["items"] == 1
    text = format_stats(stats)
    assert days[0] in text and days[-1] in text
    table_days = [line.split()[0] for line in text.splitlines() if line.strip()[:4] == "2021"]
    assert len(table_days) == 20 and days[15] not in table_days
    assert any(line.split() == ["...", "..."] for line in text.splitlines())
    summary = json.loads(text.splitlines()[-1])
    assert "per_day" not in summary and summary["days"] == 30 and "impressions" not in summary


def test_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset_stats(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="behaviours"):
        dataset_stats(tmp_path / "empty")
