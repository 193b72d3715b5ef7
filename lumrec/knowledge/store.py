"""Writing the knowledge store: one as-of partition at a time, atomically (see ``lumrec.knowledge.partitions``).

A partition is written into a hidden temporary folder and renamed into place when complete,
so a reader sees a whole partition or none, never a part (a rewrite of the same day swaps
the folders: for an instant the day is absent, which reads as "no knowledge yet").

A killed writer leaves its hidden folder (``.tmp-as_of_ds=D-xxxxxxxx``) and, when killed
amid a swap, the day's previous partition moved aside (``.old-as_of_ds=D-xxxxxxxx``). The
next job that takes the store's lock (the query job, `lumrec.locks.RunLock`) removes the
first and puts the second back, so the store again holds the day's previous partition.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lumrec.errors import writing
from lumrec.faults import failpoint
from lumrec.knowledge.conditions import ConditionLike, parse_conditions
from lumrec.knowledge.partitions import (
    ITEM_SCHEMA,
    ITEMS_FILE,
    KNOWLEDGE_MANIFEST,
    USER_SCHEMA,
    USERS_FILE,
    KnowledgeManifest,
    partition_dir,
)

__all__ = ["KnowledgeWriter", "write_knowledge"]


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
        >>> from lumrec.knowledge import latest_as_of
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
        conditions: Sequence[ConditionLike],
        dim: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.final = partition_dir(store_path, as_of_ds)
        self.as_of_ds, self.model_version, self.dim = as_of_ds, str(model_version), int(dim)
        # Stored in the canonical "feature=value" form, the form every reader compares against.
        self.conditions = [str(c) for c in parse_conditions(conditions, source="KnowledgeWriter")]
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
        with writing(self.tmp / USERS_FILE):  # a full disk names the file (ENOSPC names none)
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
        with writing(self.tmp / ITEMS_FILE):
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
            with writing(self.tmp / name):
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
        with writing(meta_tmp):
            meta_tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
        os.replace(meta_tmp, self.tmp / KNOWLEDGE_MANIFEST)
        old = None
        if self.final.exists():
            # A directory cannot be replaced by rename while it has files: move the old one aside first.
            old = self.final.parent / f".old-{self.final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
            failpoint("knowledge.old_moved_aside")
        try:
            os.replace(self.tmp, self.final)
        except BaseException:
            if old is not None:  # keep the day's previous partition rather than none
                os.replace(old, self.final)
            raise
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
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()  # a writer removes its own temporary folder
            raise


def write_knowledge(
    store_path: str | os.PathLike,
    as_of_ds: str,
    model_version: str,
    user_ids: Any,
    conditions: Sequence[ConditionLike],
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


