"""Helpers shared by the importers: output folder, dense id vocabularies, text parsing, event writing."""

from __future__ import annotations

import gzip
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lumrec.data.dataset import MANIFEST, SECONDS_PER_DAY, Dataset, DatasetMeta, day_bounds
from lumrec.data.schema import TABLES
from lumrec.data.validate import DataValidationError
from lumrec.errors import one_line, storage_error, writing
from lumrec.faults import failpoint

log = logging.getLogger(__name__)

# Entries an import may leave in its output folder; only these are removed on overwrite.
_DATASET_ENTRIES = frozenset([MANIFEST, "vocab", *TABLES])

# Events without timestamps are laid out from this day on, one second per position.
DEFAULT_BASE_DAY = "2000-01-01"

# A single day partition is split into files of at most this many rows.
MAX_ROWS_PER_PART = 1_000_000


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming it and what it should hold."""
    p = Path(path)
    if p.is_dir():
        raise FileNotFoundError(f"{p}: is a folder; expected the {what} file")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} not found")
    return p


def prepare_output(out: str | Path, overwrite: bool) -> Dataset:
    """Create (or clear) the output folder and return it as a Dataset.

    The manifest is written last, so a folder with dataset entries and no manifest is the output of
    a killed import: it is replaced without asking. A complete dataset is replaced only with
    `overwrite`. Only a lumrec dataset's own entries are ever removed, so a wrong path cannot wipe
    unrelated files; hidden entries other than the manifest's temporary files (e.g. a lock) stay.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: output exists and is not a folder; choose another output folder")
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []
    if entries:
        complete = (root / MANIFEST).exists()
        if complete and not overwrite:
            raise FileExistsError(f"{root}: output folder holds a complete dataset; pass --overwrite "
                                  "(overwrite=True from Python) to replace the dataset in it, or choose another folder")
        foreign = [name for name in entries if name not in _DATASET_ENTRIES]
        if foreign:
            raise FileExistsError(f"{root}: refusing to {'overwrite' if complete else 'import into'} it: the folder holds "
                                  f"non-dataset entries {foreign}; choose another output folder")
        if not complete:
            log.info("%s: replacing the output of an interrupted import (no %s)", root, MANIFEST)
        # The manifest goes first, so an interrupted clean-up never leaves a folder that looks complete.
        (root / MANIFEST).unlink(missing_ok=True)
        for name in entries:
            child = root / name
            shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
    if root.exists():
        for leftover in root.glob(f".{MANIFEST}.*.tmp"):  # a killed manifest write's temporary file
            leftover.unlink(missing_ok=True)
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
    return Dataset(root)


def read_source_parquet(path: Path) -> pa.Table:
    """A source Parquet file, whole; a damaged file is a DataValidationError, a disk failure a StorageError, both naming it."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        disk = storage_error(err, path) if isinstance(err, OSError) else None
        if disk is not None:
            raise disk from None
        raise DataValidationError(str(path), f"unreadable Parquet file: {one_line(str(err))}") from None


_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_ZIP_MAGIC = b"PK\x03\x04"


def file_format(path: Path) -> str:
    """What a source file holds, by its first bytes: "parquet", "zip", "gzip-parquet" or "text" (plain or gzipped)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head[:2] == _GZIP_MAGIC:
                with gzip.open(path, "rb") as gz:
                    inner = gz.read(4)
                return "gzip-parquet" if inner == _PARQUET_MAGIC else "text"
    except (OSError, EOFError):
        return "text"  # the reader that follows names the file and the failure
    if head == _PARQUET_MAGIC:
        return "parquet"
    if head == _ZIP_MAGIC:
        return "zip"
    return "text"


def require_text(path: Path, layout: str) -> None:
    """Raise DataValidationError naming what a binary file given to a line-format importer really is."""
    fmt = file_format(path)
    if fmt == "parquet":
        raise DataValidationError(str(path), f"is a Parquet file, not `{layout}` lines; use `lumrec import table`")
    if fmt == "gzip-parquet":
        raise DataValidationError(str(path), f"is a gzipped Parquet file, not `{layout}` lines; gunzip it and use `lumrec import table`")
    if fmt == "zip":
        raise DataValidationError(str(path), f"is a zip archive, not `{layout}` lines; unzip it and give the file inside")


def source_name(path: Path) -> str:
    """A dataset name from a source path: a folder's name, or a file's name without compression and format suffixes."""
    name = path.resolve().name
    for suffix in (".gz", ".bz2", ".zst", ".parquet", ".csv", ".tsv", ".txt", ".dat", ".inter"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def open_text(path: Path, encoding: str = "latin-1") -> Any:
    """Open a text file, transparently gunzipping `.gz` files (and gzip data under any other name)."""
    if path.suffix == ".gz" or is_gzip(path):
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, "rt", encoding=encoding, newline="")


def is_gzip(path: Path) -> bool:
    """Whether the file starts with gzip's magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == _GZIP_MAGIC
    except OSError:
        return False


def iter_lines(path: Path, encoding: str = "latin-1", layout: str = "text") -> Iterator[tuple[int, str]]:
    """Yield `(line_number, line)` of a text file (1-based, newline stripped), skipping blank lines.

    A Parquet file or zip archive is refused up front, named for what it is (`layout` says what was expected).
    """
    require_text(path, layout)
    try:
        with open_text(path, encoding) as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataValidationError(str(path), f"unreadable text file: {err}") from None


def parse_int(path: Path, lineno: int, value: str, what: str) -> int:
    """Parse an integer field of a text line, with an error naming file, line and field."""
    try:
        return int(value)
    except ValueError:
        raise DataValidationError(str(path), f"line {lineno}: {what} {value!r} is not an integer") from None


def split_fields(path: Path, lineno: int, line: str, sep: str, count: int, layout: str) -> list[str]:
    """Split a line into exactly `count` fields, with an error naming file and line otherwise."""
    parts = line.split(sep)
    if len(parts) != count:
        raise DataValidationError(str(path), f"line {lineno}: expected {count} fields `{layout}`, got {line[:80]!r}")
    return parts


def dense_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to dense ids 1..N in sorted raw order; returns (sorted unique raws, dense ids)."""
    uniq, inverse = np.unique(raw, return_inverse=True)
    return uniq, inverse.astype(np.int64) + 1


def write_vocab(ds: Dataset, column: str, sorted_raw: Sequence[Any]) -> int:
    """Write vocab/<column>.parquet for raws already in id order (id = position + 1); return the vocab size."""
    ds.write_vocab(column, [r.item() if isinstance(r, np.generic) else r for r in sorted_raw])
    return len(sorted_raw) + 1  # + the reserved 0 = missing


def sort_values(values: set[str] | list[str]) -> list[str]:
    """Sort category values numerically when they all are integers, else as strings (deterministic)."""
    vals = sorted(set(values))
    if vals and all(v.lstrip("-").isdigit() for v in vals):
        return sorted(vals, key=int)
    return vals


def synthetic_ts(pos: np.ndarray, base_day: str) -> np.ndarray:
    """Monotone timestamps for sources without time: `base_day` 00:00 UTC + position seconds."""
    start, _ = day_bounds(base_day)
    return start + pos.astype(np.int64)


@dataclass
class Events:
    """Columns of all events of an import, dense ids already assigned; `order` breaks timestamp ties."""

    user_id: np.ndarray
    ts: np.ndarray
    item_id: np.ndarray
    category_id: np.ndarray
    action: int
    scenario: int
    order: np.ndarray
    rating: np.ndarray | None = None
    # Impressions are written too when labels are given (same rows as the behaviours).
    label: np.ndarray | None = None


def write_events(ds: Dataset, ev: Events, max_rows_per_part: int = MAX_ROWS_PER_PART) -> list[str]:
    """Write behaviours (and impressions when labelled) day by day, rows sorted by (user, ts, source order)."""
    day_index = ev.ts // SECONDS_PER_DAY
    perm = np.lexsort((ev.order, ev.ts, ev.user_id, day_index))
    day_sorted = day_index[perm]
    # Boundaries of each day's run in the sorted order.
    cuts = np.flatnonzero(np.diff(day_sorted)) + 1
    starts = np.concatenate([[0], cuts]) if len(perm) else np.array([], np.int64)
    ends = np.concatenate([cuts, [len(perm)]]) if len(perm) else np.array([], np.int64)
    days: list[str] = []
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        idx = perm[lo:hi]
        ds_name = _ds_of_day(int(day_sorted[lo]))
        days.append(ds_name)
        for part, plo in enumerate(range(0, hi - lo, max_rows_per_part)):
            sel = idx[plo : plo + max_rows_per_part]
            ds.write_day("behaviours", ds_name, _behaviour_table(ev, sel), part=part)
            if ev.label is not None:
                ds.write_day("impressions", ds_name, _impression_table(ev, sel), part=part)
    return days


def _ds_of_day(day: int) -> str:
    """The YYYY-MM-DD name of a day counted from the unix epoch."""
    return str(np.datetime64(day, "D"))


def _behaviour_table(ev: Events, sel: np.ndarray) -> pa.Table:
    """One partition's behaviour rows."""
    n = len(sel)
    cols = {
        "user_id": pa.array(ev.user_id[sel], pa.int64()),
        "ts": pa.array(ev.ts[sel], pa.int64()),
        "item_id": pa.array(ev.item_id[sel], pa.int64()),
        "scenario": pa.array(np.full(n, ev.scenario, np.int32)),
        "category_id": pa.array(ev.category_id[sel], pa.int64()),
        "action": pa.array(np.full(n, ev.action, np.int32)),
    }
    if ev.rating is not None:
        cols["rating"] = pa.array(ev.rating[sel].astype(np.float32))
    return pa.table(cols)


def _impression_table(ev: Events, sel: np.ndarray) -> pa.Table:
    """One partition's impression rows (labelled events)."""
    assert ev.label is not None
    cols = {
        "user_id": pa.array(ev.user_id[sel], pa.int64()),
        "ts": pa.array(ev.ts[sel], pa.int64()),
        "item_id": pa.array(ev.item_id[sel], pa.int64()),
        "scenario": pa.array(np.full(len(sel), ev.scenario, np.int32)),
        "label": pa.array(ev.label[sel].astype(np.float32)),
        "category_id": pa.array(ev.category_id[sel], pa.int64()),
    }
    if ev.rating is not None:
        cols["rating"] = pa.array(ev.rating[sel].astype(np.float32))
    return pa.table(cols)


def items_table(
    item_ids: np.ndarray,
    categories: list[list[int]],
    titles: list[str] | None = None,
    primary: Sequence[int] | None = None,
) -> pa.Table:
    """The items table: dense id, primary category (`primary`, else first of its list, 0 if none), all categories.

    Importers pass the same `primary` they give the events, so every table agrees on an item's category.
    """
    cols: dict[str, pa.Array] = {
        "item_id": pa.array(item_ids, pa.int64()),
        "category_id": pa.array(list(primary) if primary is not None else [c[0] if c else 0 for c in categories], pa.int64()),
        "category_ids": pa.array(categories, pa.list_(pa.int64())),
    }
    if titles is not None:
        cols["title"] = pa.array(titles, pa.string())
    return pa.table(cols)


def finish(ds: Dataset, meta: DatasetMeta) -> DatasetMeta:
    """Write the manifest (last: its presence marks the dataset complete) and return it."""
    failpoint("import.before_manifest")  # every table written, no manifest: what a killed import leaves
    ds.write_meta(meta)
    return meta


def check_columns(path: Path, table: pa.Table, columns: Sequence[str]) -> None:
    """Raise DataValidationError naming the file and column when a required source column is missing or not integer."""
    for col in columns:
        if col not in table.column_names:
            raise DataValidationError(str(path), f"missing column; has {table.column_names}", column=col)


def int_column(path: Path, table: pa.Table, column: str) -> np.ndarray:
    """A source column as int64 numpy, rejecting nulls and non-integer types with the file and column named."""
    col = table.column(column)
    if col.null_count:
        raise DataValidationError(str(path), "null values", column=column, rows=col.null_count)
    if not pa.types.is_integer(col.type):
        raise DataValidationError(str(path), f"expected integers, got {col.type}", column=column)
    return col.to_numpy().astype(np.int64)
