"""The store's layout, one folder per as-of day, and the point-in-time rule that picks the day a sample may read.

    STORE/as_of_ds=YYYY-MM-DD/users.parquet   user_id int64, condition string ("feature=value"),
                                              vector list<float32>, as_of_ds string, model_version string
    STORE/as_of_ds=YYYY-MM-DD/items.parquet   item_id int64, vector list<float32>, as_of_ds, model_version
    STORE/as_of_ds=YYYY-MM-DD/_knowledge.json manifest, written last (its presence = complete)

Point-in-time rule: knowledge used on day D comes from `latest_as_of(store, D)`, the newest
complete as-of day strictly before D (a model and histories as of D-1 or earlier).

    >>> import tempfile
    >>> store = tempfile.mkdtemp()
    >>> knowledge_days(store), latest_as_of(store, "2026-01-03")
    ([], None)
    >>> partition_dir(store, "2026-01-02").name
    'as_of_ds=2026-01-02'
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from lumrec.data.dataset import day_bounds
from lumrec.data.validate import DataValidationError

__all__ = [
    "ITEMS_FILE",
    "ITEM_SCHEMA",
    "KNOWLEDGE_MANIFEST",
    "KnowledgeManifest",
    "USERS_FILE",
    "USER_SCHEMA",
    "knowledge_days",
    "latest_as_of",
    "partition_dir",
    "read_manifest",
]

KNOWLEDGE_MANIFEST = "_knowledge.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
_PART_RE = re.compile(r"^as_of_ds=(\d{4}-\d{2}-\d{2})$")

USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("condition", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("as_of_ds", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)
ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("as_of_ds", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)


@dataclass
class KnowledgeManifest:
    """What one as-of partition holds; written last, so its presence means the partition is complete."""

    as_of_ds: str
    model_version: str
    dim: int
    conditions: list[str]
    num_users: int
    num_user_rows: int
    num_items: int
    created_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def partition_dir(store_path: str | os.PathLike, as_of_ds: str) -> Path:
    """The folder of one as-of day."""
    day_bounds(as_of_ds)  # validates the day string
    return Path(store_path) / f"as_of_ds={as_of_ds}"


def knowledge_days(store_path: str | os.PathLike) -> list[str]:
    """The complete as-of days of a store (a partition folder with its manifest), sorted."""
    root = Path(store_path)
    if not root.exists():
        return []
    days = []
    for child in root.iterdir():
        match = _PART_RE.match(child.name)
        if match and child.is_dir() and (child / KNOWLEDGE_MANIFEST).exists():
            days.append(match.group(1))
    return sorted(days)


def latest_as_of(store_path: str | os.PathLike, before_ds: str) -> str | None:
    """The newest complete as-of day strictly before `before_ds` (knowledge usable on that day), or None."""
    day_bounds(before_ds)
    usable = [d for d in knowledge_days(store_path) if d < before_ds]
    return usable[-1] if usable else None


def read_manifest(store_path: str | os.PathLike, as_of_ds: str) -> KnowledgeManifest:
    """The manifest of the partition of `as_of_ds` (missing: FileNotFoundError listing the complete days)."""
    path = partition_dir(store_path, as_of_ds) / KNOWLEDGE_MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no knowledge for as_of_ds={as_of_ds} (manifest missing: never written or not complete); "
            f"complete as-of days in {store_path}: {knowledge_days(store_path)}"
        )
    try:
        return KnowledgeManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise DataValidationError(str(path), f"corrupt knowledge manifest: {err}") from None
