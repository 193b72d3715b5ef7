"""Which knowledge partition a sample reads, under the point-in-time rule, and the checks that keep it honest.

A sample of day D reads the partition as of the newest complete day strictly before D
(``latest_as_of``), so no knowledge built from D's own events reaches it; a day with no earlier
partition reads ``NoKnowledge`` (zeros, all missing). Alternatively one fixed partition serves
every sample; then each sample on or before that partition's day must come after its user's
whole knowledge history, shown by the knowledge view the store was queried from
(``check_fixed_store``).

``PointInTimeKnowledge`` holds no model: ``lumrec.modules.lum_join.LUMJoin`` turns the source of
each partition into features with ``LUMFeatureModule``.

    >>> import tempfile
    >>> from lumrec.knowledge import write_knowledge
    >>> store = tempfile.mkdtemp()
    >>> _ = write_knowledge(store, "2026-01-02", "v1", [7], ["scenario=1"], np.ones((1, 1, 2), np.float32), [3], np.ones((1, 2)))
    >>> pit = PointInTimeKnowledge(store, ["scenario=1"])
    >>> day = int(np.datetime64("2026-01-03", "D").astype(np.int64))
    >>> pit.as_of(day), pit.as_of(day - 1)
    ('2026-01-02', None)
    >>> [(as_of, rows.tolist()) for as_of, rows in pit.groups(torch.tensor([day, day - 1, day]))]
    [(None, [1]), ('2026-01-02', [0, 2])]
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from lumrec.data.dataset import Dataset, day_bounds
from lumrec.data.ranking_samples import RankingSamples
from lumrec.data.sequences import sequences_from_dataset
from lumrec.knowledge.conditions import ConditionLike, parse_conditions
from lumrec.knowledge.lookup import KnowledgeLookup, NoKnowledge
from lumrec.knowledge.partitions import knowledge_days, latest_as_of, read_manifest
from lumrec.knowledge.reading import load_knowledge

log = logging.getLogger("lumrec.rank")

__all__ = ["CANDIDATE_FEATURES", "PointInTimeKnowledge", "day_to_ds"]

# Sample columns a candidate condition can be read from (RankingSampleBatch fields).
CANDIDATE_FEATURES = ("category_id", "scenario", "query_id")


def day_to_ds(day: int) -> str:
    """YYYY-MM-DD of a day number (days since 1970-01-01)."""
    return str(np.datetime64(int(day), "D"))


class PointInTimeKnowledge:
    """The partitions of one store as the samples of each day may read them, loaded and checked.

    `conditions`: the fixed conditions every user is asked under; `candidate_feature`: a sample
    column whose value is also asked (one of `CANDIDATE_FEATURES`); `as_of_ds`: one partition for
    every sample instead of the newest before each sample's day; `history_data`: the knowledge view
    that partition was queried from. `key` names the config section in error messages.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        conditions: Sequence[ConditionLike],
        candidate_feature: str | None = None,
        as_of_ds: str | None = None,
        history_data: str | None = None,
        key: str = "lum",
    ) -> None:
        self.store, self.as_of_ds, self.history_data, self.key = str(store), as_of_ds, history_data, key
        self.candidate_feature = candidate_feature
        self.days = knowledge_days(store)
        if not self.days:
            raise FileNotFoundError(f"{key}.store: {store} holds no complete knowledge partition (run `lumrec query` first)")
        self.conditions = parse_conditions(conditions, source=f"{key}.conditions")
        if candidate_feature is not None and candidate_feature not in CANDIDATE_FEATURES:
            raise ValueError(
                f"{key}.candidate_condition_feature: {candidate_feature!r} is not a sample column; choose from {list(CANDIDATE_FEATURES)}"
            )
        if as_of_ds is not None and as_of_ds not in self.days:
            raise ValueError(f"{key}.as_of_ds: {store} has no complete partition as_of_ds={as_of_ds}; it has {self.days}")
        self.dim = int(read_manifest(store, self.days[-1]).dim)
        self._as_of: dict[int, str | None] = {}

    def as_of(self, day: int) -> str | None:
        """The partition a sample of `day` (days since epoch) may use, or None (no knowledge yet)."""
        if day not in self._as_of:
            self._as_of[day] = self.as_of_ds if self.as_of_ds is not None else latest_as_of(self.store, day_to_ds(day))
        return self._as_of[day]

    def groups(self, day: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
        """(partition, row indices) for the distinct partitions a batch's days use, in order of first day."""
        groups: dict[str | None, list[torch.Tensor]] = {}
        for d in torch.unique(day).tolist():
            groups.setdefault(self.as_of(int(d)), []).append(torch.nonzero(day == d).view(-1))
        return [(k, torch.cat(v)) for k, v in groups.items()]

    def source(self, as_of: str | None, candidate_lookups: bool = True) -> KnowledgeLookup | NoKnowledge:
        """The knowledge of partition `as_of` (None: `NoKnowledge`), checked against the configured conditions.

        `candidate_lookups`: whether the candidate feature will be looked up (then it must be a
        condition feature of the partition).
        """
        if as_of is None:
            return NoKnowledge(self.dim)
        lookup = load_knowledge(self.store, as_of)
        self.check_partition(lookup, candidate_lookups)
        log.info("LUM knowledge as of %s: %r", as_of, lookup)
        return lookup

    def check_partition(self, lookup: KnowledgeLookup, candidate_lookups: bool = True) -> None:
        """Every configured condition must be in the partition (an absent value would silently read as missing)."""
        where = f"{self.store} as_of_ds={lookup.as_of_ds}"
        if lookup.dim != self.dim:
            raise ValueError(f"{self.key}.store: {where} has dim {lookup.dim}, other partitions {self.dim}")
        absent = [str(c) for c in self.conditions if str(c) not in lookup.conditions]
        if absent:
            raise ValueError(f"{self.key}.conditions: {absent} not in the knowledge of {where}; it has {lookup.conditions[:12]}...")
        feature = self.candidate_feature
        if feature is not None and candidate_lookups and feature not in lookup.features:
            raise ValueError(
                f"{self.key}.candidate_condition_feature: {feature!r} is not a condition feature of {where}; it has {lookup.features}"
            )

    def sample_partitions(self, samples: RankingSamples) -> list[str | None]:
        """The distinct partitions `samples` read (None: no knowledge yet), in order of their days."""
        return list(dict.fromkeys(self.as_of(int(day)) for day in np.unique(samples.day).tolist()))

    def check_fixed_store(self, samples: RankingSamples) -> None:
        """With one store for all samples: each sample is after the store's day or after its user's knowledge history."""
        as_of = self.as_of_ds
        early = np.flatnonzero(samples.ts < day_bounds(as_of)[1])  # samples on or before the store's day
        if early.size == 0:
            return
        if self.history_data is None:
            i = int(early[0])
            raise ValueError(
                f"{self.key}.as_of_ds={as_of}: {early.size} sample(s) are on or before that day (e.g. sample {i}, user "
                f"{int(samples.user_id[i])}, ds {samples.ds[i]}); the point-in-time rule needs a store before each sample's "
                f"day, or {self.key}.history_data naming the knowledge view the store was queried from"
            )
        seqs = sequences_from_dataset(Dataset(self.history_data), None, as_of)
        users = samples.user_id[early]
        never = np.iinfo(np.int64).min
        user_last = np.full(len(users), never, np.int64)  # ts of each sample's user's last knowledge event
        if len(seqs):
            lengths = seqs.lengths()
            last_ts = np.where(lengths > 0, seqs.ts[np.maximum(seqs.offsets[1:] - 1, 0)], never)
            pos = np.minimum(np.searchsorted(seqs.user_ids, users), len(seqs) - 1)
            user_last = np.where(seqs.user_ids[pos] == users, last_ts[pos], never)
        late = np.flatnonzero(user_last >= samples.ts[early])
        if late.size:
            i = int(early[late[0]])
            raise ValueError(
                f"{self.key}.history_data={self.history_data}: {late.size} sample(s) are not after their user's knowledge "
                f"history (e.g. sample {i}: user {int(samples.user_id[i])} at ts {int(samples.ts[i])}, history up to "
                f"ts {int(user_last[late[0]])}); the knowledge would see the sample's own events"
            )
        log.info("%s.as_of_ds=%s: %d sample(s) on or before it are each after their user's knowledge history", self.key, as_of, early.size)
