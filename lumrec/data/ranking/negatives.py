"""Negative sampling: catalogue items a user had no event with at or before a given time."""

from __future__ import annotations

import numpy as np

from lumrec.data.sequences import UserSequences
from lumrec.data.validate import DataValidationError

# Rejection-sampling rounds before the exact per-sample fallback.
_REJECTION_ROUNDS = 64


def sample_negatives(
    seqs: UserSequences,
    user_row: np.ndarray,
    ts: np.ndarray,
    catalogue: np.ndarray,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
    source: str = "<behaviours>",
) -> np.ndarray:
    """One catalogue item per (user row, ts) that the user had no event with at or before ts (uniform or by `weights`)."""
    n_items = int(max(catalogue.max(initial=0), seqs.item_id.max(initial=0))) + 1
    if len(seqs) * n_items >= 2**62:
        raise ValueError(f"sample_negatives: {len(seqs)} users x {n_items} items overflow the int64 (user, item) key")
    # First time each (user, item) pair occurs: events are time-ordered per user, so the first occurrence is the earliest.
    ev_row = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths())
    pair_keys, first = np.unique(ev_row * n_items + seqs.item_id, return_index=True)
    first_ts = seqs.ts[first]
    prob = None if weights is None else weights / weights.sum()

    def seen(rows: np.ndarray, items: np.ndarray, at: np.ndarray) -> np.ndarray:
        keys = rows * n_items + items
        if len(pair_keys) == 0:
            return np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(pair_keys, keys), len(pair_keys) - 1)
        return (pair_keys[pos] == keys) & (first_ts[pos] <= at)

    out = np.zeros(len(user_row), np.int64)
    todo = np.arange(len(user_row))
    for _ in range(_REJECTION_ROUNDS):
        if todo.size == 0:
            break
        cand = catalogue[rng.choice(len(catalogue), size=todo.size, p=prob)]
        ok = ~seen(user_row[todo], cand, ts[todo])
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    for i in todo.tolist():  # users who saw most of the catalogue: draw from exactly what is left
        allowed = ~seen(np.full(len(catalogue), user_row[i]), catalogue, np.full(len(catalogue), ts[i]))
        if not allowed.any():
            raise DataValidationError(
                source, f"user {int(seqs.user_ids[user_row[i]])} interacted with every catalogue item by ts {int(ts[i])}: no negative to sample"
            )
        p = None
        if prob is not None and prob[allowed].sum() > 0:
            p = prob[allowed] / prob[allowed].sum()
        out[i] = catalogue[allowed][rng.choice(int(allowed.sum()), p=p)]
    return out
