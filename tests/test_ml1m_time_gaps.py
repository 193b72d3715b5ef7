"""The time-gap ablation's data step: the subset keeps the main benchmark's event order, real timestamps beside it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from benchmark_scripts import load_benchmark


def _bench():
    return load_benchmark("ml1m_time_gaps")


def _write(tmp_path: Path, inter: list[tuple[int, int, int]], ratings: list[str]) -> tuple[Path, Path]:
    users, movies, pos = zip(*inter)
    inter_path = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"user_id": list(users), "movie_id": list(movies), "pos": list(pos)}), inter_path)
    ratings_path = tmp_path / "ratings.dat"
    ratings_path.write_text("".join(line + "\n" for line in ratings))
    return inter_path, ratings_path


def test_subset_keeps_the_interaction_order_and_attaches_real_times(tmp_path):
    bench = _bench()
    # User 1 rated 20 and 30 in the same second: the interactions file puts 30 first, and so must the output.
    inter, ratings = _write(
        tmp_path,
        [(1, 10, 0), (1, 30, 1), (1, 20, 2), (2, 40, 0), (3, 50, 0), (2, 10, 1)],
        ["1::10::4::100", "1::20::3::200", "1::30::5::200", "2::40::1::50", "2::10::2::60"],
    )
    folder, out = bench.subset_interactions(inter, ratings, tmp_path / "work")
    assert out.read_text().splitlines() == ["1::10::4::100", "1::30::5::200", "1::20::3::200", "2::40::1::50", "2::10::2::60"]
    kept = pq.read_table(folder / "interactions.parquet")
    assert sorted(kept.column("user_id").to_pylist()) == [1, 1, 1, 2, 2]  # user 3 has no timestamps: left out


def test_subset_refuses_data_that_does_not_line_up(tmp_path):
    bench = _bench()
    inter, ratings = _write(tmp_path, [(1, 10, 0), (1, 20, 1)], ["1::10::4::300", "1::20::3::200"])
    with pytest.raises(ValueError, match="not in time order"):
        bench.subset_interactions(inter, ratings, tmp_path / "a")
    inter, ratings = _write(tmp_path, [(1, 10, 0), (1, 99, 1)], ["1::10::4::100", "1::20::3::200"])
    with pytest.raises(ValueError, match="movie 99 has no rating"):
        bench.subset_interactions(inter, ratings, tmp_path / "b")


def test_table_shows_each_arm_against_event_order():
    bench = _bench()
    test = {"hr@10": 0.30, "ndcg@10": 0.17, "hr@50": 0.57, "hr@200": 0.76}
    rows = {
        "request": {"label": "request", "test": {**test, "hr@10": 0.32}, "epochs_run": 120, "tokens_per_s": 30000.0},
        "order": {"label": "order", "test": test, "epochs_run": 118, "tokens_per_s": 31000.0},
    }
    lines = bench.format_table(rows).splitlines()[2:]
    assert [line.split()[0] for line in lines] == ["order", "request"]
    assert "+0.0200" in lines[1] and "+0.0000" in lines[0]


def test_arms_keep_the_loss_their_rows_were_measured_with():
    # The benchmark config adopted train.loss_excludes_seen after these rows were measured; a new seed must not mix losses.
    from lumrec.config import load_config
    from lumrec.pipelines.pretrain import PretrainConfig

    bench = _bench()
    assert load_config(PretrainConfig, bench.REPO / bench.CONFIG).train.loss_excludes_seen
    pinned = load_config(PretrainConfig, bench.REPO / bench.CONFIG, overrides=bench.PINNED_OVERRIDES)
    assert not pinned.train.loss_excludes_seen
