"""Reading a knowledge partition back, checked: manifest, schema, row counts, vector lengths, conditions, duplicates.

    >>> import tempfile
    >>> from lumrec.knowledge import write_knowledge
    >>> store = tempfile.mkdtemp()
    >>> _ = write_knowledge(store, "2026-01-02", "v1", [7], ["scenario=1"], np.ones((1, 1, 2), np.float32), [3], np.ones((1, 2)))
    >>> load_knowledge(store, "2026-01-02")
    KnowledgeLookup(as_of_ds='2026-01-02', model_version='v1', dim=2, users=1, conditions=1, items=1)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lumrec.data.validate import DataValidationError
from lumrec.knowledge.conditions import parse_condition
from lumrec.knowledge.lookup import KnowledgeLookup
from lumrec.knowledge.partitions import (
    ITEM_SCHEMA,
    ITEMS_FILE,
    USER_SCHEMA,
    USERS_FILE,
    KnowledgeManifest,
    partition_dir,
    read_manifest,
)

__all__ = ["load_knowledge"]


def _read_checked(path: Path, schema: pa.Schema, manifest: KnowledgeManifest, rows: int) -> tuple[pa.Table, np.ndarray]:
    """Read one store file and check schema, row count, constants and vector lengths; returns (table, vectors [n, dim])."""
    if not path.exists():
        raise DataValidationError(str(path), "file missing from a complete knowledge partition")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataValidationError(str(path), f"unreadable Parquet file: {err}") from None
    for f in schema:
        if f.name not in table.column_names:
            raise DataValidationError(str(path), f"missing column; has {table.column_names}", column=f.name)
        actual = table.schema.field(f.name).type
        ok = actual == f.type or (pa.types.is_integer(f.type) and pa.types.is_integer(actual)) or (
            pa.types.is_list(f.type) and (pa.types.is_list(actual) or pa.types.is_large_list(actual) or pa.types.is_fixed_size_list(actual))
            and pa.types.is_floating(actual.value_type)
        ) or (pa.types.is_string(f.type) and pa.types.is_large_string(actual))
        if not ok:
            raise DataValidationError(str(path), f"wrong type {actual}, expected {f.type}", column=f.name)
        if table.column(f.name).null_count:
            raise DataValidationError(str(path), "null values", column=f.name, rows=table.column(f.name).null_count)
    if table.num_rows != rows:
        raise DataValidationError(str(path), f"has {table.num_rows} rows but the manifest says {rows}")
    for name in ("as_of_ds", "model_version"):
        expected = getattr(manifest, name)
        wrong = table.num_rows - int(pc.sum(pc.equal(table.column(name), expected)).as_py() or 0)
        if wrong:
            raise DataValidationError(str(path), f"values differ from the manifest's {expected!r}", column=name, rows=wrong)
    col = table.column("vector").combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        lengths = np.full(len(col), col.type.list_size, np.int64)
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    bad = lengths != manifest.dim
    if bad.any():
        raise DataValidationError(
            str(path), f"vector length {int(lengths[bad][0])} != dim {manifest.dim} of the manifest", column="vector", rows=int(bad.sum())
        )
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return table, values.reshape(table.num_rows, manifest.dim)


def load_knowledge(store_path: str | os.PathLike, as_of_ds: str) -> KnowledgeLookup:
    """Load the complete partition of `as_of_ds` (checked: manifest, schema, vector lengths, duplicates)."""
    folder = partition_dir(store_path, as_of_ds)
    manifest = read_manifest(store_path, as_of_ds)
    users, user_vecs = _read_checked(folder / USERS_FILE, USER_SCHEMA, manifest, manifest.num_user_rows)
    items, item_vecs = _read_checked(folder / ITEMS_FILE, ITEM_SCHEMA, manifest, manifest.num_items)
    encoded = users.column("condition").combine_chunks().dictionary_encode()
    conditions = [str(c) for c in encoded.dictionary.to_pylist()]
    for text in conditions:
        try:
            parse_condition(text)
        except ValueError as err:
            raise DataValidationError(str(folder / USERS_FILE), str(err), column="condition") from None
    return KnowledgeLookup._build(
        user_rows=torch.from_numpy(users.column("user_id").to_numpy().astype(np.int64)),
        condition_rows=torch.from_numpy(encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)),
        conditions=conditions,
        user_table=torch.from_numpy(user_vecs.copy()),
        item_ids=torch.from_numpy(items.column("item_id").to_numpy().astype(np.int64)),
        item_table=torch.from_numpy(item_vecs.copy()),
        dim=manifest.dim,
        as_of_ds=manifest.as_of_ds,
        model_version=manifest.model_version,
        source=str(folder),
    )
