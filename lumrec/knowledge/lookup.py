"""``KnowledgeLookup``: one as-of partition in memory, `(user, condition) -> o_q` and `item -> e_i`.

Lookups are vectorised (sorted keys + ``searchsorted``, no Python loop per row); unknown
(user, condition) pairs and unknown items get zeros and ``missing=True``. ``NoKnowledge`` is
the source for samples with no knowledge before their day: zeros, all missing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lumrec.data.validate import DataValidationError
from lumrec.knowledge.conditions import ConditionLike, parse_condition, parse_conditions
from lumrec.knowledge.partitions import ITEMS_FILE, USERS_FILE

__all__ = ["KnowledgeLookup", "NoKnowledge"]


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
        parsed = [parse_condition(c, source=source) for c in conditions]
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
        conditions: Sequence[ConditionLike],
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
        conditions = [str(c) for c in parse_conditions(conditions, source="KnowledgeLookup.from_tensors")]
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


class NoKnowledge:
    """A knowledge source that knows nothing (samples with no knowledge before their day): zeros, all missing.

        >>> vectors, missing = NoKnowledge(dim=2).user_vectors(torch.tensor([7]), "scenario", torch.tensor([[1, 2]]))
        >>> vectors.shape, missing.tolist()
        (torch.Size([1, 2, 2]), [[True, True]])
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(*values.shape, self.dim), torch.ones(values.shape, dtype=torch.bool)

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(*item_ids.shape, self.dim), torch.ones(item_ids.shape, dtype=torch.bool)
