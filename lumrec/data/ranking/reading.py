"""Behaviours grouped per user in storage order (time order checked), item categories, point-in-time history lengths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lumrec.data.dataset import Dataset, ds_of
from lumrec.data.sequences import EVENT_COLUMNS, UserSequences, offsets_from_lengths
from lumrec.data.validate import DataValidationError


@dataclass
class Behaviours:
    """Every behaviour event grouped by user in storage order (checked to be time-ordered), plus ratings."""

    seqs: UserSequences
    rating: np.ndarray  # float32 (E,), NaN where unrated
    has_rating_column: bool  # False: the table has no `rating` column at all


def read_behaviours(data: Dataset) -> Behaviours:
    """Every user's behaviours (all days) and their ratings, grouped by user.

    Storage order is kept within a user (it orders same-second events); a user whose events
    in storage order go back in time is an error naming the user, the ts and the day.
    """
    source = str(data.table_dir("behaviours"))
    if not data.has_table("behaviours"):
        raise DataValidationError(source, "no behaviours table: every protocol needs the users' behaviours for their histories")
    users, cols, ratings = [], {name: [] for name in EVENT_COLUMNS}, []
    has_rating = False
    for ds, batch in data.iter_batches("behaviours"):
        names = batch.schema.names
        users.append(batch.column("user_id").to_numpy().astype(np.int64))
        for name, dtype in EVENT_COLUMNS.items():
            if name in names:
                col = batch.column(name)
                if col.null_count:
                    col = col.fill_null(0)
                cols[name].append(col.to_numpy(zero_copy_only=False).astype(dtype))
            else:  # only query_id is optional; the schema check guarantees the rest
                cols[name].append(np.zeros(batch.num_rows, dtype))
        if "rating" in names:
            has_rating = True
            ratings.append(batch.column("rating").to_numpy(zero_copy_only=False).astype(np.float32))  # nulls -> NaN
        else:
            ratings.append(np.full(batch.num_rows, np.nan, np.float32))
    user = np.concatenate(users)
    flat = {name: np.concatenate(parts) for name, parts in cols.items()}
    rating = np.concatenate(ratings)
    # Group by user keeping storage order (a stable sort on user only), then check time order.
    order = np.argsort(user, kind="stable")
    user = user[order]
    flat = {name: arr[order] for name, arr in flat.items()}
    rating = rating[order]
    same_user = user[1:] == user[:-1]
    back = np.flatnonzero(same_user & (flat["ts"][1:] < flat["ts"][:-1]))
    if back.size:
        k = int(back[0]) + 1
        ts_prev, ts_k = int(flat["ts"][k - 1]), int(flat["ts"][k])
        raise DataValidationError(
            source,
            f"user {int(user[k])}: events out of ts order in storage order (ts {ts_k} on ds={ds_of(ts_k)} "
            f"after ts {ts_prev} on ds={ds_of(ts_prev)}); a user's behaviours must be time-ordered",
            column="ts",
        )
    starts = np.flatnonzero(np.r_[True, ~same_user]) if len(user) else np.zeros(0, np.int64)
    seqs = UserSequences(user_ids=user[starts], offsets=np.append(starts, len(user)).astype(np.int64), **flat)
    return Behaviours(seqs, rating, has_rating)


def with_users(beh: Behaviours, user_ids: np.ndarray) -> Behaviours:
    """The same behaviours with users `user_ids` added (with no events) where they have none."""
    extra = np.setdiff1d(np.unique(user_ids), beh.seqs.user_ids)
    if extra.size == 0:
        return beh
    seqs = beh.seqs
    all_users = np.concatenate([seqs.user_ids, extra])
    order = np.argsort(all_users, kind="stable")
    lengths = np.concatenate([seqs.lengths(), np.zeros(len(extra), np.int64)])[order]
    # Events stay in place: users are re-ordered, but old users keep their relative order and new ones are empty.
    new = UserSequences(user_ids=all_users[order], offsets=offsets_from_lengths(lengths), **seqs.columns())
    return Behaviours(new, beh.rating, beh.has_rating_column)


def item_categories(data: Dataset, seqs: UserSequences) -> tuple[np.ndarray, np.ndarray]:
    """(primary category by item id, catalogue item ids): from the items table, else from the behaviours."""
    if data.has_table("items"):
        items = data.read_table("items", columns=["item_id", "category_id"])
        ids = items.column("item_id").to_numpy().astype(np.int64)
        cats = items.column("category_id").to_numpy().astype(np.int64)
        catalogue = np.unique(ids)
    else:
        ids, cats = seqs.item_id, seqs.category_id
        catalogue = np.unique(ids)
    n = int(max(ids.max(initial=0), seqs.item_id.max(initial=0))) + 1
    category = np.zeros(n, np.int64)
    category[ids] = cats
    return category, catalogue[catalogue > 0]


def history_lengths(seqs: UserSequences, user_row: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """For each query (user row, ts): how many of the user's events have ts strictly before ts."""
    user_row = np.asarray(user_row, np.int64)
    ts = np.asarray(ts, np.int64)
    n_ev, n_q = seqs.num_events, len(ts)
    ev_row = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths())
    rows = np.concatenate([ev_row, user_row])
    stamps = np.concatenate([seqs.ts, ts])
    # kind 0 = query, 1 = event: on equal (user, ts) the query sorts first, so tied events do not count.
    kind = np.concatenate([np.ones(n_ev, np.int8), np.zeros(n_q, np.int8)])
    order = np.lexsort((kind, stamps, rows))
    events_before = np.cumsum(kind[order], dtype=np.int64)
    out = np.empty(n_q, np.int64)
    is_query = order >= n_ev
    # Events are globally ordered by (user, ts) too, so the running count minus the user's offset is the prefix length.
    out[order[is_query] - n_ev] = events_before[is_query]
    return out - seqs.offsets[user_row]
