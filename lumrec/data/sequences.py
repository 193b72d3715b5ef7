"""Per-user behaviour sequences: events grouped by user, time-ordered, kept jagged as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from lumrec.data.validate import DataValidationError

# Event columns carried by a UserSequences, with the dtype each is kept in.
EVENT_COLUMNS: dict[str, np.dtype] = {
    "item_id": np.dtype(np.int64),
    "ts": np.dtype(np.int64),
    "action": np.dtype(np.int32),
    "scenario": np.dtype(np.int32),
    "query_id": np.dtype(np.int64),
    "category_id": np.dtype(np.int64),
}
# Columns an events table must have; query_id is optional (0 = no query).
REQUIRED_EVENT_COLUMNS = ("user_id", "ts", "item_id", "scenario", "category_id", "action")


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate `arange(s, s + n)` for every (s, n) pair, without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out_offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=out_offsets[1:])
    # Each output slot = its start + (slot - first slot of its run).
    return np.repeat(starts - out_offsets, lengths) + np.arange(total, dtype=np.int64)


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """int64 offsets (len n+1, starting at 0) of a jagged array with the given row lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


@dataclass
class UserSequences:
    """Every user's time-ordered events as one jagged structure: user `u`'s events are `[offsets[u], offsets[u+1])`."""

    user_ids: np.ndarray  # int64 (U,), sorted ascending, unique
    offsets: np.ndarray  # int64 (U+1,)
    item_id: np.ndarray  # int64 (E,)
    ts: np.ndarray  # int64 (E,), non-decreasing within a user
    action: np.ndarray  # int32 (E,)
    scenario: np.ndarray  # int32 (E,)
    query_id: np.ndarray  # int64 (E,), 0 where the event had no query
    category_id: np.ndarray  # int64 (E,)

    def __post_init__(self) -> None:
        n_users = len(self.user_ids)
        if len(self.offsets) != n_users + 1 or self.offsets[0] != 0:
            raise ValueError(f"offsets must have len(user_ids)+1 = {n_users + 1} entries starting at 0, got {len(self.offsets)}")
        n_events = int(self.offsets[-1])
        for name in EVENT_COLUMNS:
            if len(getattr(self, name)) != n_events:
                raise ValueError(f"event column {name!r} has {len(getattr(self, name))} values, offsets say {n_events}")

    # -- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of users."""
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        """Total number of events over all users."""
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        """Events per user, int64 (U,)."""
        return np.diff(self.offsets)

    def last_event_ts(self) -> np.ndarray:
        """Timestamp of each user's newest event, -1 for a user without events, int64 (U,)."""
        has = self.lengths() > 0
        last = np.full(len(self.user_ids), -1, dtype=np.int64)
        last[has] = self.ts[self.offsets[1:][has] - 1]
        return last

    def active_since(self, min_ts: int) -> "UserSequences":
        """The users with an event at or after `min_ts`."""
        return self.take(np.flatnonzero(self.last_event_ts() >= min_ts))

    def columns(self) -> dict[str, np.ndarray]:
        """The per-event arrays by name."""
        return {name: getattr(self, name) for name in EVENT_COLUMNS}

    def user(self, row: int) -> dict[str, np.ndarray]:
        """One user's events (by row index, not user id), as column arrays."""
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        return {name: arr[lo:hi] for name, arr in self.columns().items()}

    # -- selections -----------------------------------------------------------------------
    def _gather(self, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> "UserSequences":
        """A new UserSequences made of `lengths[k]` events from `starts[k]` for each selected row."""
        idx = ragged_arange(starts, lengths)
        cols = {name: arr[idx] for name, arr in self.columns().items()}
        return UserSequences(user_ids=self.user_ids[rows], offsets=offsets_from_lengths(lengths), **cols)

    def take(self, rows: Sequence[int] | np.ndarray) -> "UserSequences":
        """The users at row indices `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        return self._gather(rows, self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows])

    def select_users(self, user_ids: Iterable[int] | np.ndarray, missing_ok: bool = False) -> "UserSequences":
        """The users with the given ids, in ascending id order; unknown ids are an error unless `missing_ok`."""
        wanted = np.unique(np.fromiter(user_ids, dtype=np.int64) if not isinstance(user_ids, np.ndarray) else user_ids.astype(np.int64))
        pos = np.searchsorted(self.user_ids, wanted)
        found = np.zeros(len(wanted), dtype=bool)
        inside = pos < len(self)
        found[inside] = self.user_ids[pos[inside]] == wanted[inside]
        if not missing_ok and not found.all():
            absent = wanted[~found]
            raise KeyError(f"{absent.size} user id(s) not in the sequences, e.g. {absent[:5].tolist()}")
        return self.take(pos[found])

    def filter_min_length(self, min_events: int) -> "UserSequences":
        """Only the users with at least `min_events` events."""
        return self.take(np.flatnonzero(self.lengths() >= min_events))

    def truncate(self, max_events: int | None) -> "UserSequences":
        """Keep each user's `max_events` most recent events (None or <= 0: keep all)."""
        if not max_events or max_events <= 0:
            return self
        lengths = np.minimum(self.lengths(), max_events)
        rows = np.arange(len(self), dtype=np.int64)
        return self._gather(rows, self.offsets[1:] - lengths, lengths)

    def split_last(self, n: int = 1, min_history: int = 1) -> tuple["UserSequences", "UserSequences"]:
        """Leave-n-out: (histories without each user's last `n` events, those held-out events).

        Users with fewer than `n + min_history` events are dropped from both, so the two
        results have the same users in the same order.
        """
        if n < 1:
            raise ValueError(f"split_last needs n >= 1, got {n}")
        keep = self.filter_min_length(n + min_history)
        lengths = keep.lengths()
        rows = np.arange(len(keep), dtype=np.int64)
        history = keep._gather(rows, keep.offsets[:-1], lengths - n)
        targets = keep._gather(rows, keep.offsets[1:] - n, np.full(len(keep), n, dtype=np.int64))
        return history, targets

    def last_events(self) -> dict[str, np.ndarray]:
        """Each user's most recent event as column arrays (users without events are an error)."""
        if (self.lengths() == 0).any():
            raise ValueError("last_events: some users have no events")
        return {name: arr[self.offsets[1:] - 1] for name, arr in self.columns().items()}

    def equals(self, other: "UserSequences") -> bool:
        """True when both hold the same users and events, array by array."""
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


def _column(table: pa.Table, name: str, source: str, dtype: np.dtype, null_value: int | None = None) -> np.ndarray:
    """A column as a numpy array of `dtype`; nulls are an error unless `null_value` replaces them."""
    col = table.column(name)
    if col.null_count:
        if null_value is None:
            raise DataValidationError(source, "null values in a required column", column=name, rows=col.null_count)
        col = col.fill_null(null_value)
    if not (pa.types.is_integer(col.type)):
        raise DataValidationError(source, f"wrong type {col.type}, expected an integer type", column=name)
    return col.to_numpy().astype(dtype, copy=False)


def event_arrays(events: pa.Table | pa.RecordBatch, source: str = "<events>") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Check a behaviour-events table and return (user_id, per-event column arrays) in input order."""
    if isinstance(events, pa.RecordBatch):
        events = pa.Table.from_batches([events])
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.column_names]
    if missing:
        raise DataValidationError(
            source, f"missing required column(s) {missing} of behaviour events; has {events.column_names}", column=missing[0]
        )
    user_id = _column(events, "user_id", source, np.dtype(np.int64))
    cols = {name: _column(events, name, source, dtype) for name, dtype in EVENT_COLUMNS.items() if name != "query_id"}
    if "query_id" in events.column_names:
        cols["query_id"] = _column(events, "query_id", source, EVENT_COLUMNS["query_id"], null_value=0)
    else:
        cols["query_id"] = np.zeros(events.num_rows, dtype=np.int64)
    return user_id, cols


def build_user_sequences(events: pa.Table | pa.RecordBatch, source: str = "<events>") -> UserSequences:
    """Group behaviour events by user and order them by time (stable: ties keep input order)."""
    user_id, cols = event_arrays(events, source)
    return sequences_from_arrays(user_id, cols)


def sequences_from_arrays(user_id: np.ndarray, cols: dict[str, np.ndarray]) -> UserSequences:
    """Build UserSequences from flat per-event arrays (a stable sort by (user_id, ts))."""
    user_id = np.asarray(user_id, dtype=np.int64)
    ts = cols["ts"]
    # Two stable passes (minor key first) give a stable lexicographic sort: equal
    # (user, ts) pairs keep their input order, which is the order they were logged in.
    order = np.argsort(ts, kind="stable")
    order = order[np.argsort(user_id[order], kind="stable")]
    sorted_users = user_id[order]
    if len(sorted_users):
        starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    else:
        starts = np.zeros(0, dtype=np.int64)
    offsets = np.append(starts, len(sorted_users)).astype(np.int64)
    out = {name: np.asarray(cols[name])[order].astype(dtype, copy=False) for name, dtype in EVENT_COLUMNS.items()}
    return UserSequences(user_ids=sorted_users[starts], offsets=offsets, **out)


def sequences_from_dataset(dataset, start: str | None = None, end: str | None = None, batch_size: int = 1 << 18) -> UserSequences:
    """Stream behaviours of days [start, end] from a `lumrec.data.dataset.Dataset` and build the sequences."""
    users: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in EVENT_COLUMNS}
    for ds, batch in dataset.iter_batches("behaviours", start, end, batch_size=batch_size):
        # Only numpy columns are kept, so memory is the events' ids, not Arrow buffers.
        user_id, cols = event_arrays(batch, source=f"{dataset.root}/behaviours/ds={ds}")
        users.append(user_id)
        for name in EVENT_COLUMNS:
            parts[name].append(cols[name])
    if not users:
        raise DataValidationError(str(dataset.root / "behaviours"), f"no behaviour events in days [{start}, {end}]")
    # Days arrive in order, so the stable sort keeps same-timestamp events in logged order.
    return sequences_from_arrays(np.concatenate(users), {name: np.concatenate(p) for name, p in parts.items()})


def concat_sequences(parts: Sequence[UserSequences]) -> UserSequences:
    """Merge sequences of several periods (in time order) into one, users merged and re-sorted."""
    if not parts:
        raise ValueError("concat_sequences needs at least one part")
    users = np.concatenate([np.repeat(p.user_ids, p.lengths()) for p in parts])
    cols = {name: np.concatenate([getattr(p, name) for p in parts]) for name in EVENT_COLUMNS}
    return sequences_from_arrays(users, cols)


__all__ = [
    "EVENT_COLUMNS",
    "UserSequences",
    "build_user_sequences",
    "concat_sequences",
    "event_arrays",
    "offsets_from_lengths",
    "ragged_arange",
    "sequences_from_arrays",
    "sequences_from_dataset",
]
