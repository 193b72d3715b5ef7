"""LUM knowledge joined into ranking and retrieval batches under the point-in-time rule.

A sample of day D reads the knowledge partition as of the newest day strictly before D (or one
fixed partition, checked against a knowledge view); see ``lumrec.pipelines.rank`` for the rule.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

    from lumrec.data.ranking_samples import RankingSampleBatch, RankingSamples
    from lumrec.modules.lum_features import LUMFeatureModule

log = logging.getLogger("lumrec.rank")

__all__ = ["CANDIDATE_FEATURES", "LUMJoin", "RankLUMConfig"]

# Sample columns a candidate condition can be read from (RankingSampleBatch fields).
CANDIDATE_FEATURES = ("category_id", "scenario", "query_id")


@dataclass
class RankLUMConfig:
    """Where LUM knowledge comes from and which features of it the model gets (``LUMFeatureConfig`` fields)."""

    store: str = "out/knowledge"  # a knowledge store (step 2: `lumrec query`)
    conditions: list[str] = field(default_factory=list)  # fixed conditions asked for every user, "feature=value"
    candidate_condition_feature: str | None = None  # also ask under the candidate's own value of this feature
    features: list[str] = field(default_factory=lambda: ["oq", "item", "sim", "missing"])  # subset of FEATURE_GROUPS
    as_of_ds: str | None = None  # None: per sample day D, latest_as_of(store, D); a day: that one partition (see module doc)
    history_data: str | None = None  # the knowledge view the store was queried from (needed when as_of_ds >= a sample's day)
    normalize: bool = False  # L2-normalise the direct features o_q and e_i (LUMFeatureConfig.normalize)



class _NoKnowledge:
    """A KnowledgeSource that knows nothing (samples with no knowledge before their day): zeros, all missing."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def user_vectors(self, user_ids: "torch.Tensor", feature: str, values: "torch.Tensor"):
        import torch

        return torch.zeros(*values.shape, self.dim), torch.ones(values.shape, dtype=torch.bool)

    def item_vectors(self, item_ids: "torch.Tensor"):
        import torch

        return torch.zeros(*item_ids.shape, self.dim), torch.ones(item_ids.shape, dtype=torch.bool)


def _ds(day: int) -> str:
    """YYYY-MM-DD of a day number (days since 1970-01-01)."""
    import numpy as np

    return str(np.datetime64(int(day), "D"))


class LUMJoin:
    """Looks up LUM features for batches of samples under the point-in-time rule (see the module doc).

    `__call__(batch)` -> float [B, output_dim] for ranking (one candidate per sample);
    `user_features(user_ids, days)` / `item_features(item_ids, as_of)` for two towers.
    """

    def __init__(self, cfg: RankLUMConfig, samples: "RankingSamples | None" = None) -> None:
        import numpy as np

        from lumrec.data.knowledge import KNOWLEDGE_MANIFEST, knowledge_days, parse_condition, partition_dir
        from lumrec.modules.lum_features import LUMFeatureConfig

        self.cfg = cfg
        self.days = knowledge_days(cfg.store)
        if not self.days:
            raise FileNotFoundError(f"lum.store: {cfg.store} holds no complete knowledge partition (run `lumrec query` first)")
        try:
            self.conditions = [parse_condition(text) for text in cfg.conditions]
        except ValueError as err:
            raise ValueError(f"lum.conditions: {err}") from None
        if cfg.candidate_condition_feature is not None and cfg.candidate_condition_feature not in CANDIDATE_FEATURES:
            raise ValueError(
                f"lum.candidate_condition_feature: {cfg.candidate_condition_feature!r} is not a sample column; "
                f"choose from {list(CANDIDATE_FEATURES)}"
            )
        if cfg.as_of_ds is not None and cfg.as_of_ds not in self.days:
            raise ValueError(f"lum.as_of_ds: {cfg.store} has no complete partition as_of_ds={cfg.as_of_ds}; it has {self.days}")
        try:
            self.feature_config = LUMFeatureConfig(
                conditions=[tuple(c) for c in self.conditions],
                candidate_condition_feature=cfg.candidate_condition_feature,
                features=list(cfg.features),
                normalize=cfg.normalize,
            )
        except ValueError as err:
            raise ValueError(f"lum: {err}") from None
        manifest = json.loads((partition_dir(cfg.store, self.days[-1]) / KNOWLEDGE_MANIFEST).read_text())
        self.dim = int(manifest["dim"])
        self._as_of: dict[int, str | None] = {}
        self._modules: dict[str | None, "LUMFeatureModule"] = {}
        self.output_dim = self._module(None).output_dim
        if samples is not None:
            if cfg.as_of_ds is not None:
                self.check_fixed_store(samples)
            # Load and check every partition the samples will read now, not at the first batch that needs it.
            for day in np.unique(samples.day).tolist():
                self._module(self.as_of(int(day)))

    # -- which partition a day uses ---------------------------------------------------------
    def as_of(self, day: int) -> str | None:
        """The partition a sample of `day` (days since epoch) may use, or None (no knowledge yet)."""
        if day not in self._as_of:
            from lumrec.data.knowledge import latest_as_of

            ds = _ds(day)
            self._as_of[day] = self.cfg.as_of_ds if self.cfg.as_of_ds is not None else latest_as_of(self.cfg.store, ds)
        return self._as_of[day]

    def _module(self, as_of: str | None) -> "LUMFeatureModule":
        if as_of not in self._modules:
            from lumrec.data.knowledge import load_knowledge
            from lumrec.modules.lum_features import LUMFeatureModule

            source = _NoKnowledge(self.dim) if as_of is None else load_knowledge(self.cfg.store, as_of)
            if as_of is not None:
                self._check_partition(source)
                log.info("LUM knowledge as of %s: %r", as_of, source)
            self._modules[as_of] = LUMFeatureModule(self.feature_config, source)
        return self._modules[as_of]

    def _check_partition(self, lookup) -> None:
        """Every configured condition must be in the partition (an absent value would silently read as missing)."""
        where = f"{self.cfg.store} as_of_ds={lookup.as_of_ds}"
        if lookup.dim != self.dim:
            raise ValueError(f"lum.store: {where} has dim {lookup.dim}, other partitions {self.dim}")
        absent = [str(c) for c in self.conditions if str(c) not in lookup.conditions]
        if absent:
            raise ValueError(f"lum.conditions: {absent} not in the knowledge of {where}; it has {lookup.conditions[:12]}...")
        feature = self.cfg.candidate_condition_feature
        if feature is not None and self.feature_config.needs_queries and feature not in lookup.features:
            raise ValueError(f"lum.candidate_condition_feature: {feature!r} is not a condition feature of {where}; it has {lookup.features}")

    def check_fixed_store(self, samples: "RankingSamples") -> None:
        """With one store for all samples: each sample is after the store's day or after its user's knowledge history."""
        import numpy as np

        from lumrec.data.dataset import Dataset, day_bounds
        from lumrec.data.sequences import sequences_from_dataset

        as_of = self.cfg.as_of_ds
        early = np.flatnonzero(samples.ts < day_bounds(as_of)[1])  # samples on or before the store's day
        if early.size == 0:
            return
        if self.cfg.history_data is None:
            i = int(early[0])
            raise ValueError(
                f"lum.as_of_ds={as_of}: {early.size} sample(s) are on or before that day (e.g. sample {i}, user "
                f"{int(samples.user_id[i])}, ds {samples.ds[i]}); the point-in-time rule needs a store before each sample's "
                "day, or lum.history_data naming the knowledge view the store was queried from"
            )
        seqs = sequences_from_dataset(Dataset(self.cfg.history_data), None, as_of)
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
                f"lum.history_data={self.cfg.history_data}: {late.size} sample(s) are not after their user's knowledge "
                f"history (e.g. sample {i}: user {int(samples.user_id[i])} at ts {int(samples.ts[i])}, history up to "
                f"ts {int(user_last[late[0]])}); the knowledge would see the sample's own events"
            )
        log.info("lum.as_of_ds=%s: %d sample(s) on or before it are each after their user's knowledge history", as_of, early.size)

    # -- features ---------------------------------------------------------------------------
    def _groups(self, day: "torch.Tensor") -> Iterable[tuple[str | None, "torch.Tensor"]]:
        """(partition, row indices) for the distinct partitions a batch's days use."""
        import torch

        groups: dict[str | None, list[torch.Tensor]] = {}
        for d in torch.unique(day).tolist():
            groups.setdefault(self.as_of(int(d)), []).append(torch.nonzero(day == d).view(-1))
        return [(k, torch.cat(v)) for k, v in groups.items()]

    def __call__(self, batch: "RankingSampleBatch") -> "torch.Tensor":
        """LUM features [B, output_dim] of a batch: one candidate per sample, knowledge as of the sample's day - 1."""
        import torch

        from lumrec.modules.lum_features import candidates_kjt

        out = torch.zeros(len(batch), self.output_dim)
        feature = self.feature_config.candidate_condition_feature
        for as_of, rows in self._groups(batch.day):
            cond = None if feature is None else getattr(batch, feature)[rows]
            kjt = candidates_kjt(
                batch.item_id[rows], condition_values=cond, condition_key=self.feature_config.candidate_condition_key or "category_id"
            )
            out[rows] = self._module(as_of)(batch.user_id[rows], kjt).values()
        return out

    def user_width(self) -> int:
        """Width of `user_features` (fixed conditions' o_q and their missing flags)."""
        n = len(self.feature_config.conditions)
        return n * self.dim + n

    def user_features(self, user_ids: "torch.Tensor", day: "torch.Tensor") -> "torch.Tensor":
        """Per-user LUM features [B, user_width] (o_q under the fixed conditions), knowledge as of each day - 1."""
        import torch

        out = torch.zeros(user_ids.numel(), self.user_width())
        for as_of, rows in self._groups(day):
            out[rows] = self._module(as_of).user_features(user_ids[rows]).values()
        return out

    def item_features(self, item_ids: "torch.Tensor", as_of: str | None) -> "torch.Tensor":
        """Per-item LUM features [N, dim + 1] (e_i and its missing flag) of partition `as_of`."""
        return self._module(as_of).item_features(item_ids).values()
