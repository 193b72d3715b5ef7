"""A lumrec dataset on disk: hive-partitioned Parquet tables plus a metadata manifest.

Layout::

    ROOT/_lumrec.json                         manifest, written last (its presence = complete)
    ROOT/behaviours/ds=YYYY-MM-DD/part-00000.parquet
    ROOT/impressions/ds=YYYY-MM-DD/part-00000.parquet
    ROOT/item_stats/ds=YYYY-MM-DD/part-00000.parquet
    ROOT/items/items.parquet
    ROOT/users/users.parquet
    ROOT/vocab/<column>.parquet               raw_id (string) -> id (int64)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lumrec.data.schema import TableSpec, table_spec
from lumrec.data.validate import DataValidationError, check_batch, check_schema, conform
from lumrec.config import DATE_FORMAT, ConfigError, date_problem
from lumrec.errors import one_line, storage_error, writing

MANIFEST = "_lumrec.json"
_DS_RE = re.compile(r"^ds=(\d{4}-\d{2}-\d{2})$")
SECONDS_PER_DAY = 86400


@dataclass
class DatasetMeta:
    """What a dataset is: its source, id vocabularies and how it was made."""

    name: str
    source: str
    # Declared vocabulary sizes per id column: valid ids are 0..size-1 (0 = missing).
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    # True where the source had no timestamps and ts was synthesised from event order.
    synthetic_timestamps: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def ds_of(ts: int) -> str:
    """The UTC day (YYYY-MM-DD) of a unix timestamp in seconds."""
    return dt.datetime.fromtimestamp(int(ts), tz=dt.timezone.utc).strftime("%Y-%m-%d")


def parse_day(ds: str, what: str = "day") -> dt.datetime:
    """Day `ds` (YYYY-MM-DD) as midnight UTC; an impossible date is a ConfigError naming `what` and the format.

        >>> parse_day("2026-13-45", what="ds")
        Traceback (most recent call last):
        lumrec.config.ConfigError: bad ds '2026-13-45': not a valid date (month must be in 1..12); expected YYYY-MM-DD, e.g. 2026-01-15
    """
    try:
        return dt.datetime.strptime(ds, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        problem = date_problem(ds) or "not in the form YYYY-MM-DD"
        raise ConfigError(f"bad {what} {ds!r}: not a valid date ({problem}); expected {DATE_FORMAT}") from None


def day_bounds(ds: str) -> tuple[int, int]:
    """[start, end) unix seconds of day `ds` (UTC)."""
    start = int(parse_day(ds).timestamp())
    return start, start + SECONDS_PER_DAY


def shift_ds(ds: str, days: int) -> str:
    """The day `days` after `ds` (negative: before)."""
    return (parse_day(ds) + dt.timedelta(days=days)).strftime("%Y-%m-%d")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part.

    A disk failure (full, read-only, too large) is a StorageError naming `path`; the temporary file goes.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with writing(path), _removed_on_error(tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


@contextmanager
def _removed_on_error(tmp: Path) -> Iterator[None]:
    """Delete the writer's own temporary file when the block fails (a half-written file on a full disk is no use)."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old file or the whole new one, never a part."""
    _atomic_write_bytes(Path(path), text.encode())


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Write `table` to `path` via a temporary file and rename; a disk failure is a StorageError naming `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with writing(path), _removed_on_error(tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)


class Dataset:
    """A dataset folder: write and read its tables, partition by partition."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- metadata -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def write_meta(self, meta: DatasetMeta) -> None:
        """Write the manifest; call it last so that its presence means the dataset is complete."""
        _atomic_write_bytes(self.manifest_path, json.dumps(asdict(meta), indent=2, sort_keys=True).encode())

    def read_meta(self) -> DatasetMeta:
        """Read the manifest, with an error naming the folder when there is none."""
        if not self.manifest_path.exists():
            raise FileNotFoundError(
                f"{self.root}: not a lumrec dataset (no {MANIFEST}); create one with `lumrec import` or `lumrec synth`"
            )
        try:
            raw = json.loads(self.manifest_path.read_text())
            return DatasetMeta(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise DataValidationError(str(self.manifest_path), f"corrupt manifest: {err}") from None

    # -- writing --------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        return self.root / table

    def partition_path(self, table: str, ds: str, part: int = 0) -> Path:
        day_bounds(ds)  # validates the day string
        return self.table_dir(table) / f"ds={ds}" / f"part-{part:05d}.parquet"

    def write_day(self, table: str, ds: str, data: pa.Table, part: int = 0, validate: bool = True) -> Path:
        """Write one day's partition of a partitioned table, atomically."""
        spec = table_spec(table)
        if not spec.partitioned:
            raise ValueError(f"table {table!r} is not partitioned by day; use write_table")
        path = self.partition_path(table, ds, part)
        data = conform(data, spec)
        if validate:
            check_schema(str(path), data.schema, spec)
            check_batch(str(path), data, spec, ds_bounds=day_bounds(ds) if "ts" in data.column_names else None)
        write_parquet_atomic(path, data)
        return path

    def write_table(self, table: str, data: pa.Table, validate: bool = True) -> Path:
        """Write an unpartitioned table (items, users), atomically."""
        spec = table_spec(table)
        if spec.partitioned:
            raise ValueError(f"table {table!r} is partitioned by day; use write_day")
        path = self.table_dir(table) / f"{table}.parquet"
        data = conform(data, spec)
        if validate:
            check_schema(str(path), data.schema, spec)
            check_batch(str(path), data, spec)
        write_parquet_atomic(path, data)
        return path

    def write_vocab(self, column: str, raw_ids: list[Any]) -> dict[Any, int]:
        """Assign dense ids 1..N to `raw_ids` in the given order; write and return the mapping."""
        mapping = {raw: i + 1 for i, raw in enumerate(raw_ids)}
        table = pa.table({"raw_id": [str(r) for r in raw_ids], "id": pa.array(list(mapping.values()), pa.int64())})
        write_parquet_atomic(self.root / "vocab" / f"{column}.parquet", table)
        return mapping

    # -- reading --------------------------------------------------------------------------
    def days(self, table: str) -> list[str]:
        """The sorted days that have a partition of `table`."""
        tdir = self.table_dir(table)
        if not tdir.exists():
            return []
        days = []
        for child in tdir.iterdir():
            match = _DS_RE.match(child.name)
            if match and child.is_dir():
                days.append(match.group(1))
            elif child.is_dir() and not child.name.startswith("."):
                raise DataValidationError(str(child), "unexpected folder in a partitioned table (expected ds=YYYY-MM-DD)")
        return sorted(days)

    def day_files(self, table: str, ds: str) -> list[Path]:
        """The Parquet files of one day's partition, sorted; an error if the partition is empty."""
        pdir = self.table_dir(table) / f"ds={ds}"
        files = sorted(p for p in pdir.glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise DataValidationError(str(pdir), f"empty partition: no Parquet files for table {table!r}")
        return files

    def iter_batches(
        self,
        table: str,
        start: str | None = None,
        end: str | None = None,
        columns: list[str] | None = None,
        batch_size: int = 65536,
        validate: bool = True,
    ) -> Iterator[tuple[str, pa.RecordBatch]]:
        """Stream `(ds, batch)` for days in [start, end] of a partitioned table, in day order.

        Memory stays bounded by one record batch; each file is validated as it is read.
        """
        spec = table_spec(table)
        if not spec.partitioned:
            raise ValueError(f"table {table!r} is not partitioned by day; use read_table")
        days = self.days(table)
        if not days:
            raise DataValidationError(str(self.table_dir(table)), f"no partitions of table {table!r}")
        vocab = self.read_meta().vocab_sizes if (validate and self.manifest_path.exists()) else None
        for ds in days:
            if (start and ds < start) or (end and ds > end):
                continue
            bounds = day_bounds(ds)
            for path in self.day_files(table, ds):
                yield from ((ds, b) for b in _read_file_batches(path, spec, columns, batch_size, validate, bounds, vocab))

    def read_days(self, table: str, start: str | None = None, end: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Read days [start, end] of a partitioned table into one Table (with a `ds` column)."""
        parts = []
        for ds, batch in self.iter_batches(table, start, end, columns):
            t = pa.Table.from_batches([batch])
            parts.append(t.append_column("ds", pa.array([ds] * t.num_rows, pa.string())))
        if not parts:
            raise DataValidationError(str(self.table_dir(table)), f"no rows of table {table!r} in days [{start}, {end}]")
        return pa.concat_tables(parts, promote_options="default")

    def read_table(self, table: str, columns: list[str] | None = None, validate: bool = True) -> pa.Table:
        """Read an unpartitioned table (items, users), validated."""
        spec = table_spec(table)
        path = self.table_dir(table) / f"{table}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path}: table {table!r} not found in dataset {self.root}")
        vocab = self.read_meta().vocab_sizes if (validate and self.manifest_path.exists()) else None
        batches = list(_read_file_batches(path, spec, columns, 1 << 20, validate, None, vocab))
        schema = batches[0].schema if batches else None
        return pa.Table.from_batches(batches, schema=schema) if batches else pq.read_table(path, columns=columns)

    def has_table(self, table: str) -> bool:
        """True when the table exists (a file, or at least one day partition)."""
        spec = table_spec(table)
        if spec.partitioned:
            return bool(self.days(table))
        return (self.table_dir(table) / f"{table}.parquet").exists()


def _read_file_batches(
    path: Path,
    spec: TableSpec,
    columns: list[str] | None,
    batch_size: int,
    validate: bool,
    bounds: tuple[int, int] | None,
    vocab: dict[str, int] | None,
) -> Iterator[pa.RecordBatch]:
    """Yield validated, type-conformed record batches of one Parquet file.

    A file that cannot be read (corrupt footer or data page, 0 bytes) or, when validating, holds no
    rows is a DataValidationError naming the file and its table and partition; a disk failure is a StorageError.
    """
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, spec, err) from None
    if validate:
        check_schema(str(path), pfile.schema_arrow, spec)
        if pfile.metadata.num_rows == 0:
            raise DataValidationError(str(path), f"empty Parquet file (0 rows) in {_where(path, spec)}; "
                                      "delete it or write the partition again")
    if columns:
        absent = [c for c in columns if c not in pfile.schema_arrow.names]
        if absent:
            raise DataValidationError(str(path), f"requested column(s) {absent} not in file", column=absent[0])
    batches = pfile.iter_batches(batch_size=batch_size, columns=columns)
    while True:
        # Only the reads are guarded: an error of the consumer between batches is not this file's.
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(path, spec, err) from None
        if validate:
            check_batch(str(path), batch, spec, ds_bounds=bounds, vocab_sizes=vocab)
        yield from conform(batch, spec).to_batches()


def _where(path: Path, spec: TableSpec) -> str:
    """"table 'behaviours', partition ds=2026-01-02" of a day file, "table 'items'" of another."""
    partition = f", partition {path.parent.name}" if spec.partitioned and _DS_RE.match(path.parent.name) else ""
    return f"table {spec.name!r}{partition}"


def _unreadable(path: Path, spec: TableSpec, err: BaseException) -> Exception:
    """The error of a Parquet file that could not be read: the disk's (StorageError) or the file's own damage."""
    if isinstance(err, OSError):
        disk = storage_error(err, path)
        if disk is not None:
            return disk
    return DataValidationError(str(path), f"unreadable Parquet file in {_where(path, spec)} ({one_line(str(err))}); "
                               "the file is damaged: restore it, or import or generate the dataset again")
