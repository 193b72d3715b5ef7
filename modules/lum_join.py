"""LUM knowledge joined into ranking and retrieval batches under the point-in-time rule.

A sample of day D reads the knowledge partition as of the newest day strictly before D (or one
fixed partition, checked against a knowledge view): ``lumrec.knowledge.join.PointInTimeKnowledge``
decides which; here each partition's knowledge becomes features through ``LUMFeatureModule``.

    >>> import tempfile, numpy as np
    >>> from lumrec.knowledge import write_knowledge
    >>> store = tempfile.mkdtemp()  # user 7's o_q under scenario=1 as of 2026-01-02
    >>> _ = write_knowledge(store, "2026-01-02", "v1", [7], ["scenario=1"], np.ones((1, 1, 2), np.float32), [3], np.ones((1, 2)))
    >>> join = LUMJoin(RankLUMConfig(store=store, conditions=["scenario=1"], features=["oq", "missing"]))
    >>> jan3 = int(np.datetime64("2026-01-03", "D").astype(np.int64))
    >>> join.user_features(torch.tensor([7, 8, 7]), torch.tensor([jan3, jan3, jan3 - 1])).tolist()  # o_q, missing
    [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lumrec.data.ranking_samples import RankingSampleBatch, RankingSamples
from lumrec.knowledge.join import CANDIDATE_FEATURES, PointInTimeKnowledge
from lumrec.modules.lum_features import LUMFeatureConfig, LUMFeatureModule, candidates_kjt

__all__ = ["CANDIDATE_FEATURES", "LUMJoin", "RankLUMConfig"]


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


class LUMJoin:
    """Looks up LUM features for batches of samples under the point-in-time rule (see the module doc).

    `__call__(batch)` -> float [B, output_dim] for ranking (one candidate per sample);
    `user_features(user_ids, days)` / `item_features(item_ids, as_of)` for two towers.
    """

    def __init__(self, cfg: RankLUMConfig, samples: RankingSamples | None = None) -> None:
        self.cfg = cfg
        self.knowledge = PointInTimeKnowledge(
            cfg.store, cfg.conditions, cfg.candidate_condition_feature, cfg.as_of_ds, cfg.history_data, key="lum"
        )
        self.days, self.conditions, self.dim = self.knowledge.days, self.knowledge.conditions, self.knowledge.dim
        try:
            self.feature_config = LUMFeatureConfig(
                conditions=[tuple(c) for c in self.conditions],
                candidate_condition_feature=cfg.candidate_condition_feature,
                features=list(cfg.features),
                normalize=cfg.normalize,
            )
        except ValueError as err:
            raise ValueError(f"lum: {err}") from None
        self._modules: dict[str | None, LUMFeatureModule] = {}
        self.output_dim = self._module(None).output_dim
        if samples is not None:
            if cfg.as_of_ds is not None:
                self.knowledge.check_fixed_store(samples)
            # Load and check every partition the samples will read now, not at the first batch that needs it.
            for as_of in self.knowledge.sample_partitions(samples):
                self._module(as_of)

    def as_of(self, day: int) -> str | None:
        """The partition a sample of `day` (days since epoch) may use, or None (no knowledge yet)."""
        return self.knowledge.as_of(day)

    def groups(self, day: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
        """(partition, row indices) for the distinct partitions a batch's days use."""
        return self.knowledge.groups(day)


    def _module(self, as_of: str | None) -> LUMFeatureModule:
        if as_of not in self._modules:
            source = self.knowledge.source(as_of, candidate_lookups=self.feature_config.needs_queries)
            self._modules[as_of] = LUMFeatureModule(self.feature_config, source)
        return self._modules[as_of]

    def __call__(self, batch: RankingSampleBatch) -> torch.Tensor:
        """LUM features [B, output_dim] of a batch: one candidate per sample, knowledge as of the sample's day - 1."""
        out = torch.zeros(len(batch), self.output_dim)
        feature = self.feature_config.candidate_condition_feature
        for as_of, rows in self.groups(batch.day):
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

    def user_features(self, user_ids: torch.Tensor, day: torch.Tensor) -> torch.Tensor:
        """Per-user LUM features [B, user_width] (o_q under the fixed conditions), knowledge as of each day - 1."""
        out = torch.zeros(user_ids.numel(), self.user_width())
        for as_of, rows in self.groups(day):
            out[rows] = self._module(as_of).user_features(user_ids[rows]).values()
        return out

    def item_features(self, item_ids: torch.Tensor, as_of: str | None) -> torch.Tensor:
        """Per-item LUM features [N, dim + 1] (e_i and its missing flag) of partition `as_of`."""
        return self._module(as_of).item_features(item_ids).values()
