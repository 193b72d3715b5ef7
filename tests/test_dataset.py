"""Dataset layout, atomic writes, streaming reads and every class of bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumrec.data.dataset import Dataset, DatasetMeta, day_bounds, ds_of, shift_ds
from lumrec.data.validate import DataValidationError

DAY0 = "2026-01-01"
T0 = day_bounds(DAY0)[0]


def behaviours(n: int, day_start: int, seed: int = 0, **overrides) -> pa.Table:
    """A valid behaviours table of n rows inside the day starting at day_start."""
    rng = np.random.default_rng(seed)
    cols = {
        "user_id": pa.array(rng.integers(1, 10, n), pa.int64()),
        "ts": pa.array(np.sort(day_start + rng.integers(0, 86400, n)), pa.int64()),
        "item_id": pa.array(rng.integers(1, 50, n), pa.int64()),
        "scenario": pa.array(np.ones(n, np.int32), pa.int32()),
        "category_id": pa.array(rng.integers(1, 5, n), pa.int64()),
        "action": pa.array(np.ones(n, np.int32), pa.int32()),
    }
    cols.update(overrides)
    return pa.table(cols)


@pytest.fixture()
def dataset(tmp_path):
    data = Dataset(tmp_path / "d")
    for d in range(3):
        ds = shift_ds(DAY0, d)
        data.write_day("behaviours", ds, behaviours(100 + d, day_bounds(ds)[0], seed=d))
    data.write_meta(DatasetMeta(name="t", source="test", vocab_sizes={"user_id": 10, "item_id": 50, "category_id": 5}))
    return data


def test_day_helpers():
    assert ds_of(T0) == DAY0 and ds_of(T0 + 86399) == DAY0 and ds_of(T0 + 86400) == "2026-01-02"
    assert shift_ds(DAY0, -1) == "2025-12-31"
    with pytest.raises(ValueError, match="2026-13-01"):
        day_bounds("2026-13-01")


def test_round_trip_and_day_range(dataset):
    assert dataset.days("behaviours") == ["2026-01-01", "2026-01-02", "2026-01-03"]
    rows = {ds: 0 for ds in dataset.days("behaviours")}
    for ds, batch in dataset.iter_batches("behaviours", batch_size=32):
        assert batch.num_rows <= 32  # streaming: bounded batches
        rows[ds] += batch.num_rows
    assert rows == {"2026-01-01": 100, "2026-01-02": 101, "2026-01-03": 102}
    table = dataset.read_days("behaviours", start="2026-01-02", end="2026-01-02")
    assert table.num_rows == 101 and set(table.column("ds").to_pylist()) == {"2026-01-02"}
    assert dataset.read_meta().vocab_sizes["item_id"] == 50


def test_narrow_int_types_are_conformed(tmp_path):
    data = Dataset(tmp_path)
    t = behaviours(5, T0)
    t = t.set_column(0, "user_id", pa.array(t.column("user_id").to_numpy().astype(np.int32)))
    data.write_day("behaviours", DAY0, t)
    (_, batch), = list(data.iter_batches("behaviours"))
    assert batch.schema.field("user_id").type == pa.int64()


def _write_raw(data: Dataset, ds: str, table: pa.Table) -> str:
    """Write a file bypassing the writer's checks, as a foreign producer would."""
    path = data.partition_path("behaviours", ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def test_missing_column_names_file_and_column(tmp_path):
    data = Dataset(tmp_path)
    path = _write_raw(data, DAY0, behaviours(5, T0).drop(["item_id"]))
    with pytest.raises(DataValidationError) as err:
        list(data.iter_batches("behaviours"))
    assert path in str(err.value) and "'item_id'" in str(err.value)


def test_wrong_type_names_column(tmp_path):
    data = Dataset(tmp_path)
    _write_raw(data, DAY0, behaviours(5, T0, item_id=pa.array(["a"] * 5)))
    with pytest.raises(DataValidationError, match=r"column 'item_id': wrong type string"):
        list(data.iter_batches("behaviours"))


def test_null_ids_counted(tmp_path):
    data = Dataset(tmp_path)
    _write_raw(data, DAY0, behaviours(5, T0, user_id=pa.array([1, None, 3, None, 5], pa.int64())))
    with pytest.raises(DataValidationError, match=r"column 'user_id': null values .*\(2 rows\)"):
        list(data.iter_batches("behaviours"))


def test_timestamp_outside_partition_day(tmp_path):
    data = Dataset(tmp_path)
    ts = pa.array([T0, T0 + 10, T0 + 86400 + 5], pa.int64())  # last one belongs to the next day
    path = _write_raw(data, DAY0, behaviours(3, T0, ts=ts))
    with pytest.raises(DataValidationError) as err:
        list(data.iter_batches("behaviours"))
    assert path in str(err.value) and "'ts'" in str(err.value) and "(1 row)" in str(err.value)
    # The writer refuses the same table before anything reaches disk.
    with pytest.raises(DataValidationError, match="outside the partition's day"):
        Dataset(tmp_path / "w").write_day("behaviours", DAY0, behaviours(3, T0, ts=ts))


def test_ids_outside_vocabulary(tmp_path):
    data = Dataset(tmp_path)
    _write_raw(data, DAY0, behaviours(4, T0, item_id=pa.array([1, 2, 50, 99], pa.int64())))
    data.write_meta(DatasetMeta(name="t", source="test", vocab_sizes={"item_id": 50}))
    with pytest.raises(DataValidationError, match=r"column 'item_id': ids outside the declared vocabulary \[0, 50\) .*\(2 rows\)"):
        list(data.iter_batches("behaviours"))


def test_nan_and_inf_features(tmp_path):
    data = Dataset(tmp_path)
    table = pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "f_ctr": pa.array([0.1, float("nan"), float("inf")], pa.float32())})
    with pytest.raises(DataValidationError, match=r"column 'f_ctr': NaN or inf values \(2 rows\)"):
        data.write_day("item_stats", DAY0, table)
    content = pa.array([[0.0, 1.0], [float("nan"), 0.0]], pa.list_(pa.float32()))
    items = pa.table({"item_id": pa.array([1, 2], pa.int64()), "category_id": pa.array([1, 1], pa.int64()), "content": content})
    with pytest.raises(DataValidationError, match=r"column 'content': NaN or inf"):
        data.write_table("items", items)


def test_null_optional_float_is_not_nan(tmp_path):
    data = Dataset(tmp_path)
    data.write_day("behaviours", DAY0, behaviours(2, T0, rating=pa.array([4.0, None], pa.float32())))
    assert sum(b.num_rows for _, b in data.iter_batches("behaviours")) == 2


def test_empty_partition_and_empty_table(tmp_path):
    data = Dataset(tmp_path)
    with pytest.raises(DataValidationError, match="no partitions of table 'behaviours'"):
        list(data.iter_batches("behaviours"))
    (tmp_path / "behaviours" / f"ds={DAY0}").mkdir(parents=True)
    with pytest.raises(DataValidationError, match=rf"ds={DAY0}: empty partition"):
        list(data.iter_batches("behaviours"))


def test_stray_folder_and_corrupt_file(tmp_path):
    data = Dataset(tmp_path)
    (tmp_path / "behaviours" / "day=1").mkdir(parents=True)
    with pytest.raises(DataValidationError, match="day=1: unexpected folder"):
        data.days("behaviours")
    data2 = Dataset(tmp_path / "c")
    path = data2.partition_path("behaviours", DAY0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataValidationError, match="unreadable Parquet file"):
        list(data2.iter_batches("behaviours"))


def test_manifest_missing_and_corrupt(tmp_path):
    data = Dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a lumrec dataset"):
        data.read_meta()
    data.manifest_path.write_text("{ half written")
    with pytest.raises(DataValidationError, match="_lumrec.json: corrupt manifest"):
        data.read_meta()
    data.manifest_path.write_text(json.dumps({"name": "x", "source": "y", "no_such_key": 1}))
    with pytest.raises(DataValidationError, match="no_such_key"):
        data.read_meta()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    data = Dataset(tmp_path)
    data.write_day("behaviours", DAY0, behaviours(10, T0))
    data.write_day("behaviours", DAY0, behaviours(20, T0, seed=1))  # overwrite in place
    files = [p.name for p in (tmp_path / "behaviours" / f"ds={DAY0}").iterdir()]
    assert files == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "behaviours" / f"ds={DAY0}" / "part-00000.parquet").num_rows == 20


def test_unpartitioned_tables_and_vocab(tmp_path):
    data = Dataset(tmp_path)
    items = pa.table({"item_id": pa.array([1, 2], pa.int64()), "category_id": pa.array([1, 2], pa.int64()),
                      "category_ids": pa.array([[1, 3], [2]], pa.list_(pa.int64()))})
    data.write_table("items", items)
    assert data.read_table("items").column("category_ids").to_pylist() == [[1, 3], [2]]
    mapping = data.write_vocab("item_id", [1193, 661, 914])
    assert mapping == {1193: 1, 661: 2, 914: 3}
    with pytest.raises(ValueError, match="not partitioned"):
        data.write_day("items", DAY0, items)
    with pytest.raises(KeyError, match="unknown table 'itemz'"):
        data.write_table("itemz", items)


def test_list_columns_share_the_vocabulary_of_their_id_column():
    from lumrec.data.schema import vocabulary_column
    from lumrec.modules.layers.token_encoder import vocabulary_source

    sizes = {"item_id": 10, "category_id": 5}
    assert vocabulary_column("category_ids", sizes) == "category_id"
    assert vocabulary_column("item_id", sizes) == "item_id"
    assert vocabulary_column("brand_ids", sizes) is None and vocabulary_column("score", sizes) is None
    # The token encoder and the validator read the same rule.
    assert vocabulary_source("category_ids", sizes) == "category_id" and vocabulary_source("score", sizes) == "score"


def test_impossible_days_say_why_and_the_format():
    from lumrec.data.dataset import parse_day

    for text, why in (("2026-13-01", "month must be in 1..12"), ("2026-02-30", "day is out of range for month"),
                      ("26-01-01", "not in the form YYYY-MM-DD")):
        with pytest.raises(ValueError, match=rf"bad as_of_ds '{text}': not a valid date \({why}\); expected YYYY-MM-DD"):
            parse_day(text, what="as_of_ds")
    with pytest.raises(ValueError, match="bad day '2026-02-30'"):
        shift_ds("2026-02-30", 1)


def test_a_zero_row_file_names_its_table_and_partition(tmp_path):
    data = Dataset(tmp_path)
    path = data.write_day("behaviours", DAY0, behaviours(0, T0))  # written (an empty day is no schema error) ...
    with pytest.raises(DataValidationError, match=rf"{path}: empty Parquet file \(0 rows\) in table 'behaviours', "
                                                  rf"partition ds={DAY0}; delete it or write the partition again"):
        list(data.iter_batches("behaviours"))  # ... but never read as "no events that day"
    assert sum(b.num_rows for _, b in data.iter_batches("behaviours", validate=False)) == 0


def test_a_failed_atomic_write_removes_its_temporary_file(tmp_path):
    from lumrec.data.dataset import write_text_atomic

    target = tmp_path / "folder"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_text_atomic(target, "x")  # the rename onto a folder fails after the temporary file was written
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
