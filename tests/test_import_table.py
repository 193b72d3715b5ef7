"""`lumrec import table`: CSV and Parquet event tables with mapped columns, bad tables, and a CSV through pretrain."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lumrec.data.dataset import Dataset
from lumrec.data.importers import run_import
from lumrec.data.schema import ACTION_CLICK, ACTION_RATE
from lumrec.data.validate import DataValidationError
from lumrec.errors import EXIT_DATA
from lumrec.faults import ENV as FAILPOINTS

DAY = 86_400
T0 = 1_714_521_600  # 2024-05-01 00:00:00 UTC


def _vocab(root: Path, column: str) -> dict[str, int]:
    t = pq.read_table(root / "vocab" / f"{column}.parquet")
    return dict(zip(t.column("raw_id").to_pylist(), t.column("id").to_pylist()))


def _rows(root: Path, table: str, *columns: str) -> list[tuple]:
    t = Dataset(root).read_days(table)
    return list(zip(*(t.column(c).to_pylist() for c in columns)))


def _csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def test_csv_with_string_ids_seconds_and_categories(tmp_path):
    src = _csv(tmp_path / "shop.csv", f"""
visitor,product,at,cat
bob,sku-9,{T0 + 5},toys
ann,sku-1,{T0 + 10},books
ann,sku-9,{T0 + 1},games
bob,sku-1,{T0 + DAY},books
""")
    out = tmp_path / "out"
    meta = run_import("table", src, out, user_col="visitor", item_col="product", time_col="at", category_col="cat")
    assert meta.name == "shop" and not meta.synthetic_timestamps
    assert meta.source == str(src.resolve()) and meta.extra["source_files"] == [str(src.resolve())]
    assert meta.extra["columns"] == {"user": "visitor", "item": "product", "time": "at", "category": "cat"}
    assert _vocab(out, "user_id") == {"ann": 1, "bob": 2} and _vocab(out, "item_id") == {"sku-1": 1, "sku-9": 2}
    cats = _vocab(out, "category_id")
    assert cats == {"books": 1, "games": 2, "toys": 3}
    assert Dataset(out).days("behaviours") == ["2024-05-01", "2024-05-02"]
    # sku-9's earliest row says games: one category per item, in the items table and every event alike.
    assert _rows(out, "behaviours", "user_id", "item_id", "ts", "category_id", "action") == [
        (1, 2, T0 + 1, 2, ACTION_CLICK), (1, 1, T0 + 10, 1, ACTION_CLICK),
        (2, 2, T0 + 5, 2, ACTION_CLICK), (2, 1, T0 + DAY, 1, ACTION_CLICK),
    ]  # fmt: skip
    items = Dataset(out).read_table("items").to_pylist()
    assert [(it["item_id"], it["category_id"], it["category_ids"]) for it in items] == [(1, 1, [1]), (2, 2, [2, 3])]
    assert not Dataset(out).has_table("impressions")


def test_parquet_with_integer_ids_milliseconds_ratings_and_list_column(tmp_path):
    src = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({
        "user_id": pa.array([30, 30, 7], pa.int32()),
        "item_id": [100, 5, 100],
        "timestamp": [(T0 + 3) * 1000, (T0 + 2) * 1000 + 999, (T0 + 4) * 1000],
        "stars": [5.0, 2.0, 4.0],
        "genres": [["drama", "crime"], [], ["drama"]],
    }), src)
    out = tmp_path / "out"
    meta = run_import("table", src, out, time_unit="ms", rating_col="stars", categories_col="genres", name="my-ratings")
    assert meta.name == "my-ratings" and meta.extra["time_unit"] == "ms"
    assert _vocab(out, "user_id") == {"7": 1, "30": 2} and _vocab(out, "item_id") == {"5": 1, "100": 2}
    assert _vocab(out, "category_id") == {"crime": 1, "drama": 2}
    beh = _rows(out, "behaviours", "user_id", "item_id", "ts", "rating", "category_id", "action")
    assert beh == [(1, 2, T0 + 4, 4.0, 2, ACTION_RATE), (2, 1, T0 + 2, 2.0, 0, ACTION_RATE), (2, 2, T0 + 3, 5.0, 2, ACTION_RATE)]
    assert _rows(out, "impressions", "item_id", "label") == [(2, 1.0), (1, 0.0), (2, 1.0)]
    items = Dataset(out).read_table("items").to_pylist()
    assert [(it["category_id"], it["category_ids"]) for it in items] == [(0, []), (2, [2, 1])]


def test_dates_gzip_tsv_text_list_and_label_column(tmp_path):
    text = ("u\ti\twhen\tlabel\ttags\n"
            "1\ta\t2024-05-01\t1\tx|y\n"
            "1\tb\t2024-05-01 10:30:00\t0\ty\n"
            "2\ta\t2024-05-02T00:00:00+02:00\t1\t\n")
    src = tmp_path / "log.tsv.gz"
    src.write_bytes(gzip.compress(text.encode()))
    out = tmp_path / "out"
    meta = run_import("table", src, out, user_col="u", item_col="i", time_col="when", time_unit="date",
                      label_col="label", categories_col="tags")
    assert meta.name == "log"
    assert _rows(out, "behaviours", "user_id", "ts") == [(1, T0), (1, T0 + 10 * 3600 + 1800), (2, T0 + DAY - 2 * 3600)]
    assert _rows(out, "impressions", "label") == [(1.0,), (0.0,), (1.0,)]


@pytest.mark.parametrize(("text", "options", "error"), [
    ("user_id,item_id\n1,2\n", {}, r"bad\.csv: column 'timestamp': missing column \(set by --time-col\); the file has \['user_id', 'item_id'\]"),
    ("user,item_id,timestamp\n1,2,3\n", {}, r"bad\.csv: column 'user_id': missing column \(set by --user-col\)"),
    ("user_id,item_id,timestamp\n1,2,yesterday\n", {},
     r"bad\.csv: column 'timestamp': expected integer seconds since 1970 \(--time-unit s\), got string; pass --time-unit date"),
    ("user_id,item_id,timestamp\n1,2,2024-13-45\n", {"time_unit": "date"}, r"bad\.csv: column 'timestamp': row 1: '2024-13-45' is not a date or date-time"),
    ("user_id,item_id,timestamp\n1,2,5\n", {"time_unit": "date"}, r"column 'timestamp': expected dates or date-times \(--time-unit date\), got int64"),
    ("user_id,item_id,timestamp\n1,2,-5\n", {}, r"column 'timestamp': times before 1970-01-01 \(check --time-unit\) \(1 row\)"),
    ("user_id,item_id,timestamp\n1.5,2,5\n", {}, r"column 'user_id': expected integer or string ids, got double"),
    ("user_id,item_id,timestamp\n1,,5\n2,3,6\n", {}, r"column 'item_id': empty values \(1 row\)"),
    ("user_id,item_id,timestamp,r\n1,2,5,good\n", {"rating_col": "r"}, r"column 'r': expected numbers, got string"),
    ("user_id,item_id,timestamp\n", {}, r"bad\.csv: no rows \(columns \['user_id', 'item_id', 'timestamp'\]\)"),
    ("", {}, r"bad\.csv: empty file \(expected a header line and rows\)"),
    ("user_id,item_id,timestamp\n1,2,3,4\n", {}, r"bad\.csv: unreadable CSV: .*Expected 3 columns, got 4"),
])  # fmt: skip
def test_bad_tables_name_the_file_and_column(tmp_path, text, options, error):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataValidationError, match=error):
        run_import("table", tmp_path / "bad.csv", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_bad_options_and_files(tmp_path):
    _csv(tmp_path / "ok.csv", "user_id,item_id,timestamp\n1,2,3")
    with pytest.raises(ValueError, match=r"time_unit must be one of \['s', 'ms', 'date'\], got 'h'"):
        run_import("table", tmp_path / "ok.csv", tmp_path / "out", time_unit="h")
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: events table \(CSV or Parquet\) not found"):
        run_import("table", tmp_path / "nope.csv", tmp_path / "out")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 20)
    with pytest.raises(DataValidationError, match=r"broken\.parquet: unreadable Parquet file"):
        run_import("table", tmp_path / "broken.parquet", tmp_path / "out")
    run_import("table", tmp_path / "ok.csv", tmp_path / "out")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_import("table", tmp_path / "ok.csv", tmp_path / "out")
    assert run_import("table", tmp_path / "ok.csv", tmp_path / "out", overwrite=True).name == "ok"


def _lumrec(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lumrec.cli", *args], capture_output=True, text=True, timeout=400, env=full_env)


def test_cli_errors_and_a_killed_table_import(tmp_path):
    src = _csv(tmp_path / "events.csv", f"user,item_id,ts\n1,2,{T0}\n2,2,{T0 + 1}")
    out = tmp_path / "out"
    missing = _lumrec("import", "table", str(src), str(out), "--user-col", "user")
    assert missing.returncode == EXIT_DATA and "Traceback" not in missing.stderr
    assert "events.csv: column 'timestamp': missing column (set by --time-col)" in missing.stderr
    killed = _lumrec("import", "table", str(src), str(out), "--user-col", "user", "--time-col", "ts",
                     env={FAILPOINTS: "import.before_manifest"})
    assert killed.returncode == -signal.SIGKILL and (out / "behaviours").is_dir()
    again = _lumrec("import", "table", str(src), str(out), "--user-col", "user", "--time-col", "ts")
    assert again.returncode == 0, again.stderr
    complete = _lumrec("import", "table", str(src), str(out), "--user-col", "user", "--time-col", "ts")
    assert complete.returncode != 0 and "pass --overwrite" in complete.stderr


def test_a_csv_goes_through_the_cli_import_and_pretrain(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["member,sku,time"]
    for user in range(24):
        t = T0 + user * 60
        for _ in range(int(rng.integers(4, 9))):
            t += int(rng.integers(1, 20_000))
            lines.append(f"m{user},p{int(rng.integers(0, 15))},{t}")
    src = _csv(tmp_path / "clicks.csv", "\n".join(lines))
    data = tmp_path / "data"
    imported = _lumrec("import", "table", str(src), str(data), "--user-col", "member", "--item-col", "sku", "--time-col", "time",
                       "--name", "my-clicks")
    assert imported.returncode == 0, imported.stderr
    assert Dataset(data).read_meta().name == "my-clicks"
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump({
        "model": "sasrec", "out": str(tmp_path / "run"),
        "data": {"path": str(data), "max_len": 8},
        "train": {"seed": 0, "epochs": 1, "rows_per_batch": 8, "num_negatives": 4, "threads": 1, "eval_every_epochs": 1},
        "model_config": {"d_model": 8, "num_blocks": 1, "num_heads": 1},
    }))
    trained = _lumrec("pretrain", str(config))
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results, "pretrain wrote no results"
