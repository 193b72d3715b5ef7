"""The knowledge store: LUM's answers `o_q` per (user, condition) and item-token embeddings `e_i`, per as-of day.

Layout::

    STORE/as_of_ds=YYYY-MM-DD/users.parquet   user_id int64, condition string ("feature=value"),
                                              vector list<float32>, as_of_ds string, model_version string
    STORE/as_of_ds=YYYY-MM-DD/items.parquet   item_id int64, vector list<float32>, as_of_ds, model_version
    STORE/as_of_ds=YYYY-MM-DD/_knowledge.json manifest, written last (its presence = complete)

A partition is written into a hidden temporary folder and renamed into place when complete,
so a reader sees a whole partition or none, never a part (a rewrite of the same day swaps
the folders: for an instant the day is absent, which reads as "no knowledge yet").

Point-in-time rule: knowledge used on day D comes from `latest_as_of(store, D)`, the newest
complete as-of day strictly before D (a model and histories as of D-1 or earlier).

``KnowledgeLookup`` answers vectorised lookups (sorted keys + ``searchsorted``, no Python loop
per row); unknown (user, condition) pairs and unknown items get zeros and ``missing=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lumrec.data.dataset import day_bounds
from lumrec.data.validate import DataValidationError
from lumrec.faults import failpoint

__all__ = [
    "Condition",
    "KNOWLEDGE_MANIFEST",
    "KnowledgeLookup",
    "KnowledgeManifest",
    "KnowledgeWriter",
    "ITEM_SCHEMA",
    "USER_SCHEMA",
    "format_condition",
    "knowledge_days",
    "latest_as_of",
    "load_knowledge",
    "parse_condition",
    "partition_dir",
    "write_knowledge",
]

KNOWLEDGE_MANIFEST = "_knowledge.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
_PART_RE = re.compile(r"^as_of_ds=(\d{4}-\d{2}-\d{2})$")
_CONDITION_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(-?\d+)$")

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


# -- conditions -----------------------------------------------------------------------------


class Condition(NamedTuple):
    """A query condition: one value of one condition feature, e.g. `Condition("category_id", 5)`; `str()` = "category_id=5"."""

    feature: str
    value: int

    def __str__(self) -> str:
        return format_condition(self.feature, self.value)


def format_condition(feature: str, value: int) -> str:
    """The store's condition string `"feature=value"`."""
    text = f"{feature}={int(value)}"
    if not _CONDITION_RE.match(text):
        raise ValueError(f"condition feature {feature!r} must be an identifier (letters, digits, _)")
    return text


def parse_condition(text: str) -> Condition:
    """`"category_id=5"` -> `Condition("category_id", 5)`; anything else is a ValueError quoting the text."""
    match = _CONDITION_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"condition {text!r} must look like feature=value with an integer value, e.g. 'category_id=5'")
    return Condition(match.group(1), int(match.group(2)))


# -- manifest and paths -----------------------------------------------------------------------


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


# -- writing ---------------------------------------------------------------------------------


def _as_numpy(x: Any, dtype: Any) -> np.ndarray:
    """A numpy array of `dtype` from a tensor / array / sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _list_array(vectors: np.ndarray) -> pa.ListArray:
    """`[n, dim]` float32 -> a list<float32> column without copying row by row."""
    n, dim = vectors.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)))


def _check_finite(vectors: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(vectors).all(axis=-1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} vector(s) hold NaN or inf; refusing to store them")


class KnowledgeWriter:
    """Streams one as-of partition: `write_users` per batch, `write_items`, then `commit` (atomic).

    Use as a context manager: it commits on success and removes the temporary folder on error.

    Example::

        >>> import tempfile
        >>> store = tempfile.mkdtemp()
        >>> with KnowledgeWriter(store, "2026-01-02", "v1", ["scenario=1", "scenario=2"], dim=3) as w:
        ...     w.write_users(np.array([7, 9]), np.zeros((2, 2, 3), np.float32))
        ...     w.write_items(np.array([1, 2, 3]), np.ones((3, 3), np.float32))
        >>> latest_as_of(store, "2026-01-03"), latest_as_of(store, "2026-01-02")
        ('2026-01-02', None)
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        as_of_ds: str,
        model_version: str,
        conditions: Sequence[str],
        dim: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.final = partition_dir(store_path, as_of_ds)
        self.as_of_ds, self.model_version, self.dim = as_of_ds, str(model_version), int(dim)
        self.conditions = [str(c) for c in conditions]
        for text in self.conditions:
            parse_condition(text)
        dups = sorted({c for c in self.conditions if self.conditions.count(c) > 1})
        if dups:
            raise ValueError(f"KnowledgeWriter: condition(s) {dups} listed more than once")
        if not self.conditions:
            raise ValueError("KnowledgeWriter: no conditions")
        if self.dim < 1:
            raise ValueError(f"KnowledgeWriter: dim must be >= 1, got {dim}")
        self.extra = dict(extra or {})
        self.tmp = self.final.parent / f".tmp-{self.final.name}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True, exist_ok=False)
        self._users: pq.ParquetWriter | None = None
        self._items: pq.ParquetWriter | None = None
        self._user_ids: list[np.ndarray] = []
        self._item_ids: list[np.ndarray] = []
        self._cond_column = pa.array(self.conditions, pa.string())
        self._done = False

    def _constant(self, value: str, n: int) -> pa.Array:
        return pa.array([value], pa.string()).take(pa.array(np.zeros(n, np.int64)))

    def write_users(self, user_ids: Any, vectors: Any) -> None:
        """Add users: `user_ids [B]`, `vectors [B, N, dim]` (condition j = `conditions[j]`)."""
        ids = _as_numpy(user_ids, np.int64).reshape(-1)
        vecs = _as_numpy(vectors, np.float32)
        want = (len(ids), len(self.conditions), self.dim)
        if vecs.shape != want:
            raise ValueError(f"KnowledgeWriter.write_users: vectors have shape {vecs.shape}, expected {want} (users, conditions, dim)")
        _check_finite(vecs, "KnowledgeWriter.write_users")
        n = len(ids) * len(self.conditions)
        table = pa.Table.from_arrays(
            [
                pa.array(np.repeat(ids, len(self.conditions)), pa.int64()),
                self._cond_column.take(pa.array(np.tile(np.arange(len(self.conditions)), len(ids)))),
                _list_array(vecs.reshape(n, self.dim)),
                self._constant(self.as_of_ds, n),
                self._constant(self.model_version, n),
            ],
            schema=USER_SCHEMA,
        )
        if self._users is None:
            self._users = pq.ParquetWriter(self.tmp / USERS_FILE, USER_SCHEMA, compression="zstd")
        self._users.write_table(table)
        self._user_ids.append(ids)
        failpoint("knowledge.users_written")

    def write_items(self, item_ids: Any, vectors: Any) -> None:
        """Add item-token embeddings: `item_ids [I]`, `vectors [I, dim]`."""
        ids = _as_numpy(item_ids, np.int64).reshape(-1)
        vecs = _as_numpy(vectors, np.float32)
        if vecs.shape != (len(ids), self.dim):
            raise ValueError(f"KnowledgeWriter.write_items: vectors have shape {vecs.shape}, expected {(len(ids), self.dim)}")
        _check_finite(vecs, "KnowledgeWriter.write_items")
        n = len(ids)
        table = pa.Table.from_arrays(
            [pa.array(ids, pa.int64()), _list_array(vecs), self._constant(self.as_of_ds, n), self._constant(self.model_version, n)],
            schema=ITEM_SCHEMA,
        )
        if self._items is None:
            self._items = pq.ParquetWriter(self.tmp / ITEMS_FILE, ITEM_SCHEMA, compression="zstd")
        self._items.write_table(table)
        self._item_ids.append(ids)

    @staticmethod
    def _unique_count(parts: list[np.ndarray], what: str) -> int:
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"KnowledgeWriter: {what} id(s) written more than once, e.g. {uniq[counts > 1][:5].tolist()}")
        return len(ids)

    def commit(self) -> Path:
        """Close the files, write the manifest last and move the partition into place; returns its folder."""
        num_users = self._unique_count(self._user_ids, "user")
        num_items = self._unique_count(self._item_ids, "item")
        # Empty tables are still written, so a reader never meets a missing file in a complete partition.
        for attr, name, schema in (("_users", USERS_FILE, USER_SCHEMA), ("_items", ITEMS_FILE, ITEM_SCHEMA)):
            writer = getattr(self, attr)
            if writer is None:
                writer = pq.ParquetWriter(self.tmp / name, schema, compression="zstd")
            writer.close()
            setattr(self, attr, None)
        manifest = KnowledgeManifest(
            as_of_ds=self.as_of_ds, model_version=self.model_version, dim=self.dim, conditions=self.conditions,
            num_users=num_users, num_user_rows=num_users * len(self.conditions), num_items=num_items,
            created_at=time.time(), extra=self.extra,
        )
        meta_tmp = self.tmp / f".{KNOWLEDGE_MANIFEST}.tmp"
        meta_tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
        os.replace(meta_tmp, self.tmp / KNOWLEDGE_MANIFEST)
        old = None
        if self.final.exists():
            # A directory cannot be replaced by rename while it has files: move the old one aside first.
            old = self.final.parent / f".old-{self.final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.final

    def abort(self) -> None:
        """Drop everything written so far."""
        for attr in ("_users", "_items"):
            writer = getattr(self, attr)
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - the folder is deleted anyway
                    pass
                setattr(self, attr, None)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> "KnowledgeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_knowledge(
    store_path: str | os.PathLike,
    as_of_ds: str,
    model_version: str,
    user_ids: Any,
    conditions: Sequence[str],
    vectors: Any,
    item_ids: Any,
    item_vectors: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a whole as-of partition at once: `vectors [U, N, dim]` for `user_ids [U]` x `conditions [N]`, items `[I, dim]`."""
    vecs = _as_numpy(vectors, np.float32)
    if vecs.ndim != 3:
        raise ValueError(f"write_knowledge: vectors must be [users, conditions, dim], got shape {vecs.shape}")
    with KnowledgeWriter(store_path, as_of_ds, model_version, conditions, vecs.shape[2], extra) as writer:
        writer.write_users(user_ids, vecs)
        writer.write_items(item_ids, item_vectors)
    return writer.final


# -- reading ---------------------------------------------------------------------------------


def _read_manifest(folder: Path, store_path: str | os.PathLike, as_of_ds: str) -> KnowledgeManifest:
    path = folder / KNOWLEDGE_MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no knowledge for as_of_ds={as_of_ds} (manifest missing: never written or not complete); "
            f"complete as-of days in {store_path}: {knowledge_days(store_path)}"
        )
    try:
        return KnowledgeManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise DataValidationError(str(path), f"corrupt knowledge manifest: {err}") from None


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


def load_knowledge(store_path: str | os.PathLike, as_of_ds: str) -> "KnowledgeLookup":
    """Load the complete partition of `as_of_ds` (checked: manifest, schema, vector lengths, duplicates)."""
    folder = partition_dir(store_path, as_of_ds)
    manifest = _read_manifest(folder, store_path, as_of_ds)
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


class KnowledgeLookup:
    """In-memory knowledge of one as-of day: `(user, condition) -> o_q` and `item -> e_i`, vectorised.

    Example::

        >>> kl = KnowledgeLookup.from_tensors(torch.tensor([10, 20]), ["scenario=1", "scenario=2"],
        ...                                   torch.arange(12.).view(2, 2, 3), torch.tensor([5]), torch.ones(1, 3))
        >>> vecs, missing = kl.user_vectors(torch.tensor([20, 99]), "scenario", torch.tensor([[2, 1], [1, 1]]))
        >>> vecs[0].tolist(), missing.tolist()
        ([[9.0, 10.0, 11.0], [6.0, 7.0, 8.0]], [[False, False], [True, True]])
        >>> kl.item_vectors(torch.tensor([5, 6]))[1].tolist()
        [False, True]
    """

    dim: int
    as_of_ds: str
    model_version: str

    def __init__(self) -> None:  # pragma: no cover - built by _build only
        raise TypeError("KnowledgeLookup: use load_knowledge(...) or KnowledgeLookup.from_tensors(...)")

    @classmethod
    def _build(
        cls,
        user_rows: torch.Tensor,
        condition_rows: torch.Tensor,
        conditions: list[str],
        user_table: torch.Tensor,
        item_ids: torch.Tensor,
        item_table: torch.Tensor,
        dim: int,
        as_of_ds: str,
        model_version: str,
        source: str,
    ) -> "KnowledgeLookup":
        """Index rows `(user_rows[r], conditions[condition_rows[r]]) -> user_table[r]`; duplicates are an error naming `source`."""
        self = object.__new__(cls)
        self.dim, self.as_of_ds, self.model_version = int(dim), str(as_of_ds), str(model_version)
        self.conditions = list(conditions)
        self._source = source
        # Users: sorted unique ids; a row matrix [U, C] holds each pair's row (-1: absent).
        self._user_ids, user_index = torch.unique(user_rows, sorted=True, return_inverse=True)
        num_c = len(conditions)
        pair = user_index * num_c + condition_rows
        uniq, counts = torch.unique(pair, return_counts=True)
        if bool((counts > 1).any()):
            dup = int(uniq[counts > 1][0])
            raise DataValidationError(
                f"{source}/{USERS_FILE}" if not source.startswith("<") else source,
                f"duplicate (user_id, condition) rows, e.g. ({int(self._user_ids[dup // num_c])}, {conditions[dup % num_c]!r})",
                column="user_id, condition",
                rows=int((counts[counts > 1] - 1).sum()),
            )
        self._rows = torch.full((len(self._user_ids), num_c), -1, dtype=torch.int64)
        self._rows.view(-1)[pair] = torch.arange(len(pair), dtype=torch.int64)
        self._user_table = user_table.to(torch.float32).reshape(-1, self.dim)
        # Per feature: its values sorted, and the condition column of each.
        parsed = [parse_condition(c) for c in conditions]
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for feature in sorted({p.feature for p in parsed}):
            cols = [j for j, p in enumerate(parsed) if p.feature == feature]
            values = torch.tensor([parsed[j].value for j in cols], dtype=torch.int64)
            order = torch.argsort(values)
            self._features[feature] = (values[order], torch.tensor(cols, dtype=torch.int64)[order])
        item_ids = item_ids.to(torch.int64).reshape(-1)
        self._item_ids, order = torch.sort(item_ids)
        if item_ids.numel() > 1 and bool((self._item_ids[1:] == self._item_ids[:-1]).any()):
            dup = self._item_ids[1:][self._item_ids[1:] == self._item_ids[:-1]]
            raise DataValidationError(
                f"{source}/{ITEMS_FILE}" if not source.startswith("<") else source,
                f"duplicate item_id rows, e.g. {dup[:5].tolist()}", column="item_id", rows=int(dup.numel()),
            )
        self._item_table = item_table.to(torch.float32).reshape(-1, self.dim)[order]
        return self

    @classmethod
    def from_tensors(
        cls,
        user_ids: torch.Tensor,
        conditions: list[str],
        user_vectors: torch.Tensor,
        item_ids: torch.Tensor,
        item_vectors: torch.Tensor,
        as_of_ds: str = "",
        model_version: str = "",
    ) -> "KnowledgeLookup":
        """A lookup from dense tensors: `user_vectors [U, N, dim]` for `user_ids [U]` x `conditions [N]`, items `[I, dim]`."""
        user_ids = torch.as_tensor(user_ids, dtype=torch.int64).reshape(-1)
        if user_vectors.dim() != 3 or user_vectors.shape[:2] != (user_ids.numel(), len(conditions)):
            raise ValueError(
                f"KnowledgeLookup.from_tensors: user_vectors must be [{user_ids.numel()}, {len(conditions)}, dim], got {tuple(user_vectors.shape)}"
            )
        dim = int(user_vectors.shape[2])
        item_ids = torch.as_tensor(item_ids, dtype=torch.int64).reshape(-1)
        if item_vectors.shape != (item_ids.numel(), dim):
            raise ValueError(f"KnowledgeLookup.from_tensors: item_vectors must be [{item_ids.numel()}, {dim}], got {tuple(item_vectors.shape)}")
        conditions = [str(c) for c in conditions]
        dups = sorted({c for c in conditions if conditions.count(c) > 1})
        if dups:
            raise ValueError(f"KnowledgeLookup.from_tensors: condition(s) {dups} listed more than once")
        n = len(conditions)
        return cls._build(
            user_rows=user_ids.repeat_interleave(n),
            condition_rows=torch.arange(n).repeat(user_ids.numel()),
            conditions=conditions,
            user_table=user_vectors.detach().reshape(-1, dim),
            item_ids=item_ids,
            item_table=item_vectors.detach(),
            dim=dim,
            as_of_ds=as_of_ds,
            model_version=model_version,
            source="<from_tensors>",
        )

    # -- lookups -----------------------------------------------------------------------------

    @property
    def features(self) -> list[str]:
        """Condition features present in the store."""
        return list(self._features)

    @property
    def num_users(self) -> int:
        """Users with at least one stored vector."""
        return int(self._user_ids.numel())

    @property
    def num_items(self) -> int:
        """Items with a stored vector."""
        return int(self._item_ids.numel())

    @staticmethod
    def _find(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into sorted_keys, found) for every query; index is 0 where not found."""
        if sorted_keys.numel() == 0:
            zeros = torch.zeros_like(queries)
            return zeros, torch.zeros_like(queries, dtype=torch.bool)
        pos = torch.searchsorted(sorted_keys, queries.contiguous()).clamp(max=sorted_keys.numel() - 1)
        found = sorted_keys[pos] == queries
        return torch.where(found, pos, torch.zeros_like(pos)), found

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user_ids [B] int64; values [B, N] int64 condition values of `feature` -> (vectors [B, N, dim] float32, missing [B, N] bool)."""
        if feature not in self._features:
            raise KeyError(f"KnowledgeLookup: condition feature {feature!r} is not in the store (as_of_ds={self.as_of_ds}); it has {self.features}")
        if user_ids.dim() != 1 or values.dim() != 2 or values.shape[0] != user_ids.shape[0]:
            raise ValueError(
                f"KnowledgeLookup.user_vectors: need user_ids [B] and values [B, N], got {tuple(user_ids.shape)} and {tuple(values.shape)}"
            )
        device = user_ids.device
        users = user_ids.to(torch.int64).cpu()
        vals = values.to(torch.int64).cpu()
        u, u_found = self._find(self._user_ids, users)
        sorted_values, columns = self._features[feature]
        c, c_found = self._find(sorted_values, vals)
        rows = self._rows[u[:, None], columns[c]] if self._rows.numel() else torch.full(vals.shape, -1, dtype=torch.int64)
        rows = torch.where(u_found[:, None] & c_found, rows, torch.full_like(rows, -1))
        missing = rows < 0
        if self._user_table.shape[0]:
            out = self._user_table[rows.clamp(min=0)]
            out = out.masked_fill(missing[..., None], 0.0)
        else:
            out = torch.zeros(*vals.shape, self.dim)
        return out.to(device), missing.to(device)

    def user_table(self, conditions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(user ids [U], vectors [U, N, dim]) of every user of the partition under `conditions`, in that order."""
        missing = [c for c in conditions if c not in self.conditions]
        if missing:
            raise KeyError(f"{self._source}: no condition(s) {missing} in this partition; it has {self.conditions}")
        rows = self._rows[:, [self.conditions.index(c) for c in conditions]]
        if bool((rows < 0).any()):
            user = int(self._user_ids[torch.nonzero(rows < 0)[0, 0]])
            raise DataValidationError(self._source, f"user {user} lacks some of the conditions {list(conditions)}", column="condition")
        return self._user_ids.clone(), self._user_table[rows]

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """item_ids [...] int64 -> (vectors [..., dim], missing [...] bool)."""
        device = item_ids.device
        ids = item_ids.to(torch.int64).cpu()
        pos, found = self._find(self._item_ids, ids)
        if self._item_table.shape[0]:
            out = self._item_table[pos].masked_fill(~found[..., None], 0.0)
        else:
            out = torch.zeros(*ids.shape, self.dim)
        return out.to(device), (~found).to(device)

    def __repr__(self) -> str:
        return (
            f"KnowledgeLookup(as_of_ds={self.as_of_ds!r}, model_version={self.model_version!r}, dim={self.dim}, "
            f"users={self.num_users}, conditions={len(self.conditions)}, items={self.num_items})"
        )
