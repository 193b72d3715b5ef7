"""Arrow schemas of lumrec's tables and the contract every importer and generator writes.

Ids in every table are dense integers: 0 means "missing / padding", real ids are 1..N-1,
so they index TorchRec embedding tables directly. Importers keep the original ids in
``vocab/<column>.parquet`` (columns ``raw_id`` (string), ``id`` (int64)).
Timestamps are unix seconds (UTC). Event tables are hive-partitioned by ``ds=YYYY-MM-DD``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pyarrow as pa

# Scenario codes used by importers and the synthetic generator.
SCENARIO_FEED = 1
SCENARIO_SEARCH = 2
SCENARIO_NAMES = {0: "none", SCENARIO_FEED: "feed", SCENARIO_SEARCH: "search"}

# Action codes of behaviour events; ratings keep their value (1..5) in `rating`.
ACTION_CLICK = 1
ACTION_RATE = 2
ACTION_PURCHASE = 3
ACTION_REVIEW = 4


@dataclass(frozen=True)
class TableSpec:
    """A table's required columns, optional columns and whether it is partitioned by day."""

    name: str
    schema: pa.Schema  # required columns, in order
    optional: pa.Schema  # columns that may be present, with their types
    partitioned: bool
    id_columns: tuple[str, ...]  # checked for nulls and against the declared vocabulary
    # Columns whose float values must be finite (list columns are checked element-wise);
    # extra float columns named f_* are feature columns and are checked too.
    feature_prefix: str = "f_"


BEHAVIOURS = TableSpec(
    name="behaviours",
    schema=pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("ts", pa.int64(), nullable=False),
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("scenario", pa.int32(), nullable=False),
            pa.field("category_id", pa.int64(), nullable=False),
            pa.field("action", pa.int32(), nullable=False),
        ]
    ),
    optional=pa.schema(
        [
            pa.field("query_id", pa.int64()),  # 0 / null when the event had no query
            pa.field("rating", pa.float32()),
        ]
    ),
    partitioned=True,
    id_columns=("user_id", "item_id", "category_id"),
)

IMPRESSIONS = TableSpec(
    name="impressions",
    schema=pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("ts", pa.int64(), nullable=False),
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("scenario", pa.int32(), nullable=False),
            pa.field("label", pa.float32(), nullable=False),
        ]
    ),
    optional=pa.schema(
        [
            pa.field("query_id", pa.int64()),
            pa.field("category_id", pa.int64()),
            pa.field("rating", pa.float32()),
        ]
    ),
    partitioned=True,
    id_columns=("user_id", "item_id"),
)

ITEMS = TableSpec(
    name="items",
    schema=pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("category_id", pa.int64(), nullable=False),  # primary category
        ]
    ),
    optional=pa.schema(
        [
            pa.field("category_ids", pa.list_(pa.int64())),  # all categories (multi-genre)
            pa.field("content", pa.list_(pa.float32())),  # content vector, fixed length
            pa.field("title", pa.string()),
        ]
    ),
    # Items are one file; daily item statistics (point-in-time) live in `item_stats`.
    partitioned=False,
    id_columns=("item_id", "category_id"),
)

ITEM_STATS = TableSpec(
    name="item_stats",
    # Row for day D holds statistics computed from events strictly before day D.
    schema=pa.schema([pa.field("item_id", pa.int64(), nullable=False)]),
    optional=pa.schema([]),
    partitioned=True,
    id_columns=("item_id",),
)

USERS = TableSpec(
    name="users",
    schema=pa.schema([pa.field("user_id", pa.int64(), nullable=False)]),
    optional=pa.schema([]),  # any int64 (categorical) or float (f_*) user features
    partitioned=False,
    id_columns=("user_id",),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec for spec in (BEHAVIOURS, IMPRESSIONS, ITEMS, ITEM_STATS, USERS)
}


def table_spec(name: str) -> TableSpec:
    """Return the spec of table `name`, with an error listing the known tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known tables: {sorted(TABLES)}") from None


def vocabulary_column(column: str, vocab_sizes: Mapping[str, int]) -> str | None:
    """The column whose vocabulary `column` uses: itself, or `x_id` for a list column `x_ids`; None if it has none."""
    if column in vocab_sizes:
        return column
    if column.endswith("_ids") and column[:-1] in vocab_sizes:  # e.g. category_ids shares category_id's ids
        return column[:-1]
    return None
