"""Checks of Parquet files and record batches against lumrec's schemas, with errors naming the culprit."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lumrec.data.schema import TableSpec, vocabulary_column
from lumrec.errors import DataError


class DataValidationError(DataError, ValueError):
    """Bad input data; the message names the file, the column and how many rows are affected."""

    def __init__(self, file: str, problem: str, column: str | None = None, rows: int | None = None):
        self.file, self.column, self.problem, self.rows = file, column, problem, rows
        where = f"{file}" + (f": column {column!r}" if column else "")
        count = f" ({rows} row{'s' if rows != 1 else ''})" if rows is not None else ""
        super().__init__(f"{where}: {problem}{count}")


def _type_ok(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Accept the exact type, or a narrower integer / float of the same kind (cast on read)."""
    if actual == expected:
        return True
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual)
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual) or pa.types.is_fixed_size_list(actual)) and _type_ok(
            actual.value_type, expected.value_type
        )
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return False


def check_schema(file: str, schema: pa.Schema, spec: TableSpec) -> None:
    """Raise if a required column is missing or a known column has the wrong type."""
    names = set(schema.names)
    missing = [f.name for f in spec.schema if f.name not in names]
    if missing:
        raise DataValidationError(
            file, f"missing required column(s) {missing} of table {spec.name!r}; has {schema.names}", column=missing[0]
        )
    for field in list(spec.schema) + list(spec.optional):
        if field.name in names:
            actual = schema.field(field.name).type
            if not _type_ok(actual, field.type):
                raise DataValidationError(file, f"wrong type {actual}, expected {field.type}", column=field.name)


def conform(batch: pa.RecordBatch | pa.Table, spec: TableSpec) -> pa.Table:
    """Cast known columns to the schema's exact types (e.g. int32 ids -> int64)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    for field in list(spec.schema) + list(spec.optional):
        if field.name in table.column_names:
            col = table.column(field.name)
            if col.type != field.type:
                idx = table.column_names.index(field.name)
                table = table.set_column(idx, field.name, pc.cast(col, field.type))
    return table


def _float_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Flat float values of a float or list-of-float column, else None."""
    typ = col.type
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=typ)
    while pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        col = col.flatten()
        typ = typ.value_type
    if not pa.types.is_floating(typ):
        return None
    # Nulls are "missing", checked elsewhere; only present values must be finite.
    return col.drop_null().to_numpy(zero_copy_only=False)


def check_batch(
    file: str,
    batch: pa.RecordBatch | pa.Table,
    spec: TableSpec,
    ds_bounds: tuple[int, int] | None = None,
    vocab_sizes: Mapping[str, int] | None = None,
) -> None:
    """Raise on null ids, timestamps outside the partition's day, ids outside the vocabulary, NaN/inf floats."""
    names = batch.schema.names
    for field in spec.schema:
        if field.name in names:
            nulls = batch.column(field.name).null_count
            if nulls:
                raise DataValidationError(file, "null values in a required column", column=field.name, rows=nulls)
    if ds_bounds is not None and "ts" in names and batch.num_rows:
        ts = batch.column("ts").to_numpy(zero_copy_only=False)
        lo, hi = ds_bounds
        bad = int(np.count_nonzero((ts < lo) | (ts >= hi)))
        if bad:
            raise DataValidationError(
                file, f"timestamps outside the partition's day [{lo}, {hi}) (e.g. {int(ts[(ts < lo) | (ts >= hi)][0])})", column="ts", rows=bad
            )
    if vocab_sizes:
        for column in names:
            source = vocabulary_column(column, vocab_sizes)
            if source is None:
                continue
            size = vocab_sizes[source]
            values = batch.column(column)
            if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                values = values.flatten()
            arr = values.drop_null().to_numpy(zero_copy_only=False)
            if arr.dtype.kind not in "iu":
                continue
            bad = int(np.count_nonzero((arr < 0) | (arr >= size)))
            if bad:
                sample = int(arr[(arr < 0) | (arr >= size)][0])
                raise DataValidationError(
                    file, f"ids outside the declared vocabulary [0, {size}) (e.g. {sample})", column=column, rows=bad
                )
    for column in names:
        if column in ("ts",):
            continue
        values = _float_values(batch.column(column))
        if values is None:
            continue
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise DataValidationError(file, "NaN or inf values", column=column, rows=bad)
