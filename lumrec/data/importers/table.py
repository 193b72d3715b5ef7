"""Import a plain table of events (CSV, TSV or Parquet; CSV may be gzipped): one row per interaction.

Columns are mapped by name: user, item and time are required; rating, label, a category and a list of
categories are optional. Ids of any type (integers or strings) become dense ids 1..N in sorted raw order,
as in the other importers, with the raw ids kept in `vocab/`.

>>> import tempfile; from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> _ = (d / "clicks.csv").write_text("user,item,time\\nann,sku-1,2024-05-01\\nbob,sku-2,2024-05-02 10:00\\n")
>>> meta = import_table(d / "clicks.csv", d / "out", user_col="user", item_col="item", time_col="time", time_unit="date")
>>> meta.name, meta.vocab_sizes["user_id"], meta.synthetic_timestamps
('clicks', 3, False)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lumrec.data.dataset import DatasetMeta
from lumrec.data.importers._common import (
    Events,
    dense_ids,
    file_format,
    finish,
    is_gzip,
    items_table,
    prepare_output,
    read_source_parquet,
    require_file,
    sort_values,
    source_name,
    write_events,
    write_vocab,
)
from lumrec.data.schema import ACTION_CLICK, ACTION_RATE, SCENARIO_FEED
from lumrec.data.validate import DataValidationError
from lumrec.errors import one_line

# How the time column is read: integer seconds or milliseconds since the epoch (UTC), or dates /
# date-times (strings such as 2024-05-01 or 2024-05-01T10:00:00Z, or Arrow date/timestamp columns).
TIME_UNITS = ("s", "ms", "date")


def read_source_table(path: Path, delimiter: str | None = None) -> pa.Table:
    """The whole source table: Parquet by its magic bytes, else CSV (TSV for `.tsv`, gzip by magic bytes)."""
    fmt = file_format(path)
    if fmt == "parquet":
        return read_source_parquet(path)
    if fmt == "gzip-parquet":
        raise DataValidationError(str(path), "is a gzipped Parquet file; gunzip it first")
    if fmt == "zip":
        raise DataValidationError(str(path), "is a zip archive; unzip it and give the CSV or Parquet file inside")
    sep = delimiter or ("\t" if ".tsv" in path.suffixes else ",")
    try:
        with pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None) as stream:
            return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=sep))
    except pa.ArrowInvalid as err:
        problem = "empty file (expected a header line and rows)" if "Empty CSV" in str(err) else f"unreadable CSV: {one_line(str(err))}"
        raise DataValidationError(str(path), problem) from None
    except (OSError, EOFError) as err:
        raise DataValidationError(str(path), f"unreadable file: {one_line(str(err))}") from None


def _column(path: Path, table: pa.Table, name: str, option: str) -> pa.ChunkedArray:
    """A source column without nulls, or an error naming the file, the column and the option that maps it."""
    if name not in table.column_names:
        raise DataValidationError(str(path), f"missing column (set by {option}); the file has {table.column_names}", column=name)
    col = table.column(name)
    if col.null_count:
        raise DataValidationError(str(path), "empty values", column=name, rows=col.null_count)
    return col


def id_column(path: Path, table: pa.Table, name: str, option: str) -> np.ndarray:
    """Raw ids (integers or strings) as a numpy array ready for `dense_ids`."""
    col = _column(path, table, name, option)
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.asarray(col.to_pylist(), dtype=object)
    raise DataValidationError(str(path), f"expected integer or string ids, got {col.type}", column=name)


def time_column(path: Path, table: pa.Table, name: str, unit: str) -> np.ndarray:
    """Event times as int64 unix seconds; `unit` says how integers and strings are read (see TIME_UNITS)."""
    if unit not in TIME_UNITS:
        raise ValueError(f"table import: time_unit must be one of {list(TIME_UNITS)}, got {unit!r}")
    col = _column(path, table, name, "--time-col")
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        # Sub-second parts are dropped (safe=False), as integer milliseconds are floored below.
        tz = col.type.tz if pa.types.is_timestamp(col.type) else None
        ts = pc.cast(pc.cast(col, pa.timestamp("s", tz), safe=False), pa.int64()).to_numpy()
    elif pa.types.is_integer(col.type) and unit in ("s", "ms"):
        ts = col.to_numpy().astype(np.int64)
        ts = ts if unit == "s" else ts // 1000
    elif (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) and unit == "date":
        ts = pc.cast(_parse_dates(path, name, col), pa.int64()).to_numpy()
    else:
        want = "dates or date-times" if unit == "date" else f"integer {'seconds' if unit == 's' else 'milliseconds'} since 1970"
        hint = "; pass --time-unit date for date strings" if unit != "date" else "; pass --time-unit s or ms for numbers"
        raise DataValidationError(str(path), f"expected {want} (--time-unit {unit}), got {col.type}{hint}", column=name)
    ts = np.asarray(ts, dtype=np.int64)
    if (ts < 0).any():
        raise DataValidationError(str(path), "times before 1970-01-01 (check --time-unit)", column=name, rows=int((ts < 0).sum()))
    return ts


def _parse_dates(path: Path, name: str, col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Date strings as timestamps: naive ones read as UTC, ones with a zone offset converted to UTC."""
    naive, zoned = pa.timestamp("s"), pa.timestamp("s", "UTC")
    for target in (naive, zoned):
        try:
            return pc.cast(col, target)
        except pa.ArrowInvalid:
            pass
    # A column mixing naive and zoned values (or holding a bad one): value by value, naming the first bad row.
    out: list[int] = []
    for row, text in enumerate(col.to_pylist(), start=1):
        for target in (naive, zoned):
            try:
                out.append(pc.cast(pa.array([text]), target).cast(pa.int64())[0].as_py())
                break
            except pa.ArrowInvalid:
                continue
        else:
            raise DataValidationError(str(path), f"row {row}: {text!r} is not a date or date-time (e.g. 2024-05-01, "
                                      "2024-05-01 10:00:00, 2024-05-01T10:00:00+02:00)", column=name)
    return pa.chunked_array([pa.array(out, pa.int64())])


def numeric_column(path: Path, table: pa.Table, name: str, option: str) -> np.ndarray:
    """A numeric source column (rating, label) as float32."""
    col = _column(path, table, name, option)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise DataValidationError(str(path), f"expected numbers, got {col.type}", column=name)
    values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataValidationError(str(path), "values that are not finite numbers", column=name, rows=int((~np.isfinite(values)).sum()))
    return values


def category_lists(path: Path, table: pa.Table, category_col: str | None, categories_col: str | None, list_sep: str) -> list[list[str]]:
    """Per row, its categories as strings: the category column's value first, then the list column's (deduplicated)."""
    rows: list[list[str]] = [[] for _ in range(table.num_rows)]
    if category_col:
        col = _column(path, table, category_col, "--category-col")
        for row, value in zip(rows, col.to_pylist()):
            row.append(str(value))
    if categories_col:
        col = _column(path, table, categories_col, "--categories-col")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lists = [[str(v) for v in (values or []) if v is not None] for values in col.to_pylist()]
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            lists = [[v.strip() for v in text.split(list_sep) if v.strip()] for text in col.to_pylist()]
        else:
            raise DataValidationError(str(path), f"expected a list column or `{list_sep}`-separated text, got {col.type}", column=categories_col)
        for row, values in zip(rows, lists):
            row.extend(v for v in values if v not in row)
    return rows


def import_table(
    src: str | Path,
    out: str | Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    time_unit: str = "s",
    rating_col: str | None = None,
    label_col: str | None = None,
    positive_threshold: float = 4.0,
    category_col: str | None = None,
    categories_col: str | None = None,
    list_sep: str = "|",
    delimiter: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> DatasetMeta:
    """Import a CSV/Parquet table of events into behaviours (+ labelled impressions with a rating or label column).

    Each item gets one category, from its earliest row (category column, else the first of the list
    column), written alike to the items table and every event table; `category_ids` holds all values
    seen on its rows. With `label_col` the labels are its values; with only `rating_col`,
    label = rating >= `positive_threshold`.
    """
    path = require_file(src, "events table (CSV or Parquet)")
    table = read_source_table(path, delimiter)
    if table.num_rows == 0:
        raise DataValidationError(str(path), f"no rows (columns {table.column_names})")
    user_raw = id_column(path, table, user_col, "--user-col")
    item_raw = id_column(path, table, item_col, "--item-col")
    ts = time_column(path, table, time_col, time_unit)
    rating = numeric_column(path, table, rating_col, "--rating-col") if rating_col else None
    label = numeric_column(path, table, label_col, "--label-col") if label_col else None
    if label is None and rating is not None:
        label = (rating >= positive_threshold).astype(np.float32)
    row_cats = category_lists(path, table, category_col, categories_col, list_sep)
    ds = prepare_output(out, overwrite)

    user_uniq, user_id = dense_ids(user_raw)
    item_uniq, item_id = dense_ids(item_raw)
    sizes = {"user_id": write_vocab(ds, "user_id", user_uniq), "item_id": write_vocab(ds, "item_id", item_uniq)}
    cat_uniq = sort_values({c for row in row_cats for c in row})
    sizes["category_id"] = write_vocab(ds, "category_id", cat_uniq) if cat_uniq else 1
    cats, primary = _item_categories(row_cats, cat_uniq, item_id, ts, len(item_uniq))
    ds.write_table("items", items_table(np.arange(1, len(item_uniq) + 1), cats, primary=primary[1:].tolist()))
    events = Events(
        user_id=user_id,
        ts=ts,
        item_id=item_id,
        category_id=primary[item_id],
        action=ACTION_RATE if rating is not None else ACTION_CLICK,
        scenario=SCENARIO_FEED,
        order=np.arange(table.num_rows, dtype=np.int64),
        rating=rating,
        label=label,
    )
    days = write_events(ds, events)
    meta = DatasetMeta(
        name=name or source_name(path),
        source=str(path.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=False,
        notes=_notes(table.num_rows, days, rating_col, label_col, positive_threshold, bool(cat_uniq)),
        extra={
            "kind": "table",
            "source_files": [str(path.resolve())],
            "columns": {k: v for k, v in dict(user=user_col, item=item_col, time=time_col, rating=rating_col, label=label_col,
                                                category=category_col, categories=categories_col).items() if v},
            "time_unit": time_unit,
            "category_ids_vocab": "category_id",
        },
    )
    return finish(ds, meta)


def _item_categories(
    row_cats: list[list[str]], cat_uniq: list[str], item_id: np.ndarray, ts: np.ndarray, n_items: int
) -> tuple[list[list[int]], np.ndarray]:
    """Per item (dense id order): all its category codes, and its one category (from its earliest row; 0 if none)."""
    code = {c: i + 1 for i, c in enumerate(cat_uniq)}
    cats: list[list[int]] = [[] for _ in range(n_items)]
    primary = np.zeros(n_items + 1, np.int64)
    if not cat_uniq:
        return cats, primary
    for row in np.lexsort((np.arange(len(ts)), ts)).tolist():  # earliest rows first, so the primary is the earliest one's
        item = int(item_id[row])
        known = cats[item - 1]
        for c in row_cats[row]:
            if code[c] not in known:
                known.append(code[c])
        if primary[item] == 0 and row_cats[row]:
            primary[item] = code[row_cats[row][0]]
    return cats, primary


def _notes(rows: int, days: list[str], rating_col: str | None, label_col: str | None, threshold: float, with_cats: bool) -> str:
    """The manifest's description of what was imported."""
    parts = [f"{rows} rows -> behaviours, real timestamps, {len(days)} daily UTC partition(s)."]
    if label_col:
        parts.append(f"impressions labelled from column {label_col!r}.")
    elif rating_col:
        parts.append(f"ratings kept; impressions labelled 1.0 if rating >= {threshold:g} else 0.0.")
    else:
        parts.append("action=click, no ratings, no impressions.")
    parts.append("category_id = the category on the item's earliest row, the same in every table." if with_cats
                 else "no category columns: category_id is 0 (missing) everywhere.")
    return " ".join(parts)
