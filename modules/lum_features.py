"""LUMFeatureModule: LUM step 3, stored knowledge -> dense features for any DLRM.

Step 2 stores, per user, the LUM outputs `o_q` under query conditions (`category_id=3`,
`scenario=2`, ...) and, per item, its LUM item embedding `e_i`. This module looks them up for a
batch of (user, candidate) pairs and emits, one row per candidate:

    lum_oq_<feature>=<value>   o_q under a fixed condition                [dim]
    lum_oq_candidate           o_q under the candidate's own condition    [dim]  (e.g. its category)
    lum_item                   e_i of the candidate                       [dim]
    lum_sim_<feature>=<value>  cos(o_q, e_i), interest matching           [1]
    lum_sim_candidate          cos(o_q under the candidate's condition, e_i)  [1]
    lum_missing                1.0 where a looked-up vector was missing   [one per condition (+1 for the item)]

as a torchrec ``KeyedTensor``, so ``torch.cat([dense, kt.values()], 1)`` is a DLRM's dense input.
Missing users, conditions or items give zero vectors, zero similarity and flag 1, never an error:
knowledge is a day old and new users/items are normal. The module has no parameters; the
knowledge is a lookup behind the ``KnowledgeSource`` protocol (an in-memory table, a store on
disk, a service), and its outputs carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lumrec.knowledge.conditions import parse_conditions
from lumrec.modules.ops import jagged_positions, lengths_to_offsets

__all__ = [
    "FEATURE_GROUPS",
    "KnowledgeSource",
    "LUMFeatureConfig",
    "LUMFeatureModule",
    "candidates_kjt",
    "lum_dense_input",
]

# What the module can emit; `LUMFeatureConfig.features` picks a subset.
FEATURE_GROUPS = ("oq", "item", "sim", "missing")
CANDIDATE = "candidate"


@runtime_checkable
class KnowledgeSource(Protocol):
    """Where LUM knowledge is looked up: per-user query outputs and per-item embeddings, both `dim` wide."""

    dim: int

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user_ids [B] int64; values [B, N] int64 condition values of `feature` -> (vectors [B, N, dim] float32, missing [B, N] bool)."""
        ...

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """item_ids [...] int64 -> (vectors [..., dim], missing [...] bool)."""
        ...


@dataclass
class LUMFeatureConfig:
    """Which conditions to query and which feature groups to emit.

    `conditions`: fixed `(feature, value)` conditions asked for every user (e.g. `("scenario", 2)`).
    `candidate_condition_feature`: also ask under the candidate's own value of this feature
    (e.g. `"category_id"`: "what does this user want in the candidate's category"); the value is
    read from KJT key `candidate_condition_key` (default: the feature's name).
    `features`: a subset of `FEATURE_GROUPS`.
    """

    conditions: list[tuple[str, int]] = field(default_factory=list)
    candidate_condition_feature: str | None = None
    features: list[str] = field(default_factory=lambda: list(FEATURE_GROUPS))
    item_key: str = "item_id"
    candidate_condition_key: str | None = None
    key_prefix: str = "lum"
    # L2-normalise the direct features (o_q, e_i). LUM learns them through a normalised similarity, so
    # only their direction carries meaning; unnormalised, their scale (|o_q| ~ 5) dwarfs a DLRM's
    # freshly initialised embeddings and the MLP fits the per-user vector first.
    normalize: bool = False

    def __post_init__(self) -> None:
        # Plain (feature, value) tuples: what the config holds and its messages show.
        self.conditions = [tuple(c) for c in parse_conditions(self.conditions, source="LUMFeatureConfig.conditions")]
        self.features = list(self.features)
        for group in self.features:
            if group not in FEATURE_GROUPS:
                raise ValueError(f"LUMFeatureConfig.features: unknown feature group {group!r}; known: {list(FEATURE_GROUPS)}")
        if not self.features:
            raise ValueError(f"LUMFeatureConfig.features is empty; choose from {list(FEATURE_GROUPS)}")
        dup_groups = sorted({g for g in self.features if self.features.count(g) > 1})
        if dup_groups:
            raise ValueError(f"LUMFeatureConfig.features: {dup_groups} listed more than once")
        dups = sorted({c for c in self.conditions if self.conditions.count(c) > 1})
        if dups:
            raise ValueError(f"LUMFeatureConfig.conditions: {dups} listed more than once")
        if self.candidate_condition_feature is not None and not self.candidate_condition_feature:
            raise ValueError("LUMFeatureConfig.candidate_condition_feature is an empty string (use None for none)")
        if self.candidate_condition_key is not None and self.candidate_condition_feature is None:
            raise ValueError("LUMFeatureConfig.candidate_condition_key is set but candidate_condition_feature is None")
        if self.candidate_condition_feature is not None and self.candidate_condition_key is None:
            self.candidate_condition_key = self.candidate_condition_feature
        if self.candidate_condition_key == self.item_key:
            raise ValueError(f"LUMFeatureConfig: candidate_condition_key and item_key are both {self.item_key!r}")
        if self.needs_queries and not self.condition_names:
            raise ValueError(
                "LUMFeatureConfig: features 'oq'/'sim' need at least one condition "
                "(conditions or candidate_condition_feature)"
            )
        if self.features == ["missing"]:
            raise ValueError("LUMFeatureConfig.features: 'missing' alone describes nothing; add 'oq', 'item' or 'sim'")

    @property
    def condition_names(self) -> list[str]:
        """One name per queried condition, in output order: `feature=value` ..., then `candidate`."""
        names = [f"{f}={v}" for f, v in self.conditions]
        return names + ([CANDIDATE] if self.candidate_condition_feature is not None else [])

    @property
    def needs_queries(self) -> bool:
        """Whether user query outputs are looked up."""
        return "oq" in self.features or "sim" in self.features

    @property
    def needs_items(self) -> bool:
        """Whether candidate item vectors are looked up."""
        return "item" in self.features or "sim" in self.features


def candidates_kjt(
    item_ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    condition_values: torch.Tensor | None = None,
    item_key: str = "item_id",
    condition_key: str = "category_id",
) -> KeyedJaggedTensor:
    """The candidates KJT: `item_ids` [T] grouped per user by `lengths` [B] (default: one each), plus condition values [T]."""
    item_ids = item_ids.reshape(-1).to(torch.int64)
    if lengths is None:
        lengths = torch.ones_like(item_ids, dtype=torch.int32)
    lengths = lengths.to(torch.int32)
    if int(lengths.sum()) != item_ids.numel():
        raise ValueError(f"candidates_kjt: lengths sum to {int(lengths.sum())} but there are {item_ids.numel()} item ids")
    keys, values, all_lengths = [item_key], [item_ids], [lengths]
    if condition_values is not None:
        condition_values = condition_values.reshape(-1).to(torch.int64)
        if condition_values.numel() != item_ids.numel():
            raise ValueError(
                f"candidates_kjt: {condition_values.numel()} {condition_key!r} values for {item_ids.numel()} candidates"
            )
        keys.append(condition_key)
        values.append(condition_values)
        all_lengths.append(lengths)
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(all_lengths), stride=int(lengths.numel()))


class LUMFeatureModule(nn.Module):
    """Frozen LUM step-3 features for (user, candidate) pairs, looked up from a `KnowledgeSource`.

    Example::

        >>> class Table:  # a KnowledgeSource: every user's o_q is (value, 0), every item's e_i is (1, 0)
        ...     dim = 2
        ...     def user_vectors(self, user_ids, feature, values):
        ...         vec = torch.stack([values.float(), torch.zeros_like(values).float()], -1)
        ...         return vec, torch.zeros_like(values, dtype=torch.bool)
        ...     def item_vectors(self, item_ids):
        ...         return torch.ones(*item_ids.shape, 2) * torch.tensor([1.0, 0.0]), item_ids == 0
        >>> module = LUMFeatureModule(LUMFeatureConfig(conditions=[("scenario", 2)], candidate_condition_feature="category_id"), Table())
        >>> # user 7 has candidates 3 and 0 (0: unknown item), user 8 has candidate 5
        >>> kjt = candidates_kjt(torch.tensor([3, 0, 5]), torch.tensor([2, 1]), torch.tensor([4, 4, 6]))
        >>> kt = module(torch.tensor([7, 8]), kjt)
        >>> kt.keys()
        ['lum_oq_scenario=2', 'lum_oq_candidate', 'lum_item', 'lum_sim_scenario=2', 'lum_sim_candidate', 'lum_missing']
        >>> kt.values().shape, kt["lum_oq_candidate"][:, 0].tolist(), kt["lum_missing"].tolist()
        (torch.Size([3, 11]), [4.0, 4.0, 6.0], [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    """

    def __init__(self, config: LUMFeatureConfig, knowledge: KnowledgeSource) -> None:
        super().__init__()
        self.config = config
        self.knowledge = knowledge
        absent = [attr for attr in ("dim", "user_vectors", "item_vectors") if not hasattr(knowledge, attr)]
        if absent:
            raise TypeError(
                f"LUMFeatureModule: knowledge source {type(knowledge).__name__} has no {', '.join(map(repr, absent))} "
                "(see KnowledgeSource)"
            )
        self.dim = int(knowledge.dim)
        if self.dim < 1:
            raise ValueError(f"LUMFeatureModule: knowledge dim must be >= 1, got {self.dim}")
        # Fixed conditions grouped by feature: one knowledge call per feature, all its values at once.
        self._fixed: dict[str, list[tuple[int, int]]] = {}
        for index, (feature, value) in enumerate(config.conditions):
            self._fixed.setdefault(feature, []).append((index, value))

    # -- the output layout ----------------------------------------------------------------

    def key_dims(self) -> dict[str, int]:
        """Output keys and their widths, in output order."""
        cfg, prefix = self.config, self.config.key_prefix
        dims: dict[str, int] = {}
        if "oq" in cfg.features:
            dims.update({f"{prefix}_oq_{name}": self.dim for name in cfg.condition_names})
        if "item" in cfg.features:
            dims[f"{prefix}_item"] = self.dim
        if "sim" in cfg.features:
            dims.update({f"{prefix}_sim_{name}": 1 for name in cfg.condition_names})
        if "missing" in cfg.features:
            dims[f"{prefix}_missing"] = len(self.missing_columns)
        return dims

    @property
    def missing_columns(self) -> list[str]:
        """What each `lum_missing` column flags: `user:<condition>` per queried condition, then `item`."""
        cols = [f"user:{name}" for name in self.config.condition_names] if self.config.needs_queries else []
        return cols + (["item"] if self.config.needs_items else [])

    @property
    def output_dim(self) -> int:
        """Total width of the output row (what to add to a DLRM's `dense_in_features`)."""
        return sum(self.key_dims().values())

    # -- lookups ----------------------------------------------------------------------------

    def _user_lookup(
        self, user_ids: torch.Tensor, feature: str, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked knowledge call: float32 vectors [B, N, dim] with missing rows zeroed, missing [B, N] bool."""
        vectors, missing = self.knowledge.user_vectors(user_ids, feature, values)
        shape = (*values.shape, self.dim)
        if tuple(vectors.shape) != shape or tuple(missing.shape) != tuple(values.shape):
            raise ValueError(
                f"knowledge.user_vectors(feature={feature!r}) returned vectors {tuple(vectors.shape)} and missing "
                f"{tuple(missing.shape)}; expected {shape} and {tuple(values.shape)}"
            )
        return self._clean(vectors, missing, user_ids.device)

    def _item_lookup(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, missing = self.knowledge.item_vectors(item_ids)
        if tuple(vectors.shape) != (*item_ids.shape, self.dim) or tuple(missing.shape) != tuple(item_ids.shape):
            raise ValueError(
                f"knowledge.item_vectors returned vectors {tuple(vectors.shape)} and missing {tuple(missing.shape)}; "
                f"expected {(*item_ids.shape, self.dim)} and {tuple(item_ids.shape)}"
            )
        return self._clean(vectors, missing, item_ids.device)

    @staticmethod
    def _clean(vectors: torch.Tensor, missing: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = vectors.to(device=device, dtype=torch.float32)
        missing = missing.to(device=device, dtype=torch.bool)
        # A source may leave garbage (or NaN) in missing rows; the contract downstream is zeros.
        vectors = torch.where(missing.unsqueeze(-1), torch.zeros((), device=device), vectors)
        return vectors, missing

    def _query_outputs(
        self, user_ids: torch.Tensor, cand_user: torch.Tensor, cand_pos: torch.Tensor, cond_values: torch.Tensor | None, max_per_user: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o_q per candidate [T, C, dim] and missing [T, C]: the fixed conditions, then (if `cond_values`) the candidate's."""
        num_users, total = user_ids.numel(), cand_user.numel()
        num_cond = len(self.config.conditions) + (cond_values is not None)
        oq = torch.zeros(total, num_cond, self.dim, device=user_ids.device)
        miss = torch.ones(total, num_cond, dtype=torch.bool, device=user_ids.device)
        for feature, entries in self._fixed.items():
            # Per user, not per candidate: a user's fixed-condition outputs are shared by all its candidates.
            columns = torch.tensor([i for i, _ in entries], device=user_ids.device)
            values = torch.tensor([v for _, v in entries], dtype=torch.int64, device=user_ids.device)
            vec, m = self._user_lookup(user_ids, feature, values.expand(num_users, -1).contiguous())
            oq[:, columns] = vec[cand_user]
            miss[:, columns] = m[cand_user]
        if cond_values is not None:
            # Candidate-conditioned: a [B, max candidates] request (padding value 0 = the "missing" id).
            padded = torch.zeros(num_users, max_per_user, dtype=torch.int64, device=user_ids.device)
            padded[cand_user, cand_pos] = cond_values
            vec, m = self._user_lookup(user_ids, self.config.candidate_condition_feature, padded)
            oq[:, num_cond - 1] = vec[cand_user, cand_pos]
            miss[:, num_cond - 1] = m[cand_user, cand_pos]
        return oq, miss

    # -- forward ----------------------------------------------------------------------------

    def _candidates(self, user_ids: torch.Tensor, candidates: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(item ids [T], lengths [B], condition values [T] or None) after checking the KJT against `user_ids`."""
        cfg = self.config
        if user_ids.dim() != 1:
            raise ValueError(f"LUMFeatureModule: user_ids must be 1-D [B], got shape {tuple(user_ids.shape)}")
        if candidates.stride() != user_ids.numel():
            raise ValueError(
                f"LUMFeatureModule: candidates KJT has stride {candidates.stride()} but there are {user_ids.numel()} user ids"
            )
        keys = candidates.keys()
        if cfg.item_key not in keys:
            raise ValueError(f"LUMFeatureModule: candidates KJT has no key {cfg.item_key!r} (item ids); keys: {keys}")
        items = candidates[cfg.item_key]
        lengths = items.lengths()
        cond_values = None
        if cfg.candidate_condition_key is not None and cfg.needs_queries:
            if cfg.candidate_condition_key not in keys:
                raise ValueError(
                    f"LUMFeatureModule: candidates KJT has no key {cfg.candidate_condition_key!r} "
                    f"(the candidate's {cfg.candidate_condition_feature!r}); keys: {keys}"
                )
            cond = candidates[cfg.candidate_condition_key]
            if not torch.equal(cond.lengths().to(lengths.dtype), lengths):
                raise ValueError(
                    f"LUMFeatureModule: key {cfg.candidate_condition_key!r} must hold exactly one value per candidate "
                    f"(same lengths as {cfg.item_key!r})"
                )
            cond_values = cond.values().to(torch.int64)
        return items.values().to(torch.int64), lengths, cond_values

    def forward(self, user_ids: torch.Tensor, candidates: KeyedJaggedTensor) -> KeyedTensor:
        """user_ids [B] and candidates (KJT of stride B, jagged per user) -> KeyedTensor, one row per candidate."""
        cfg, prefix = self.config, self.config.key_prefix
        user_ids = user_ids.to(torch.int64)
        item_ids, lengths, cond_values = self._candidates(user_ids, candidates)
        device = user_ids.device
        item_ids, lengths = item_ids.to(device), lengths.to(device)
        offsets = lengths_to_offsets(lengths)
        total = int(item_ids.numel())
        cand_user = torch.repeat_interleave(torch.arange(user_ids.numel(), device=device), lengths.to(torch.int64), output_size=total)
        cand_pos = jagged_positions(offsets)
        max_per_user = int(lengths.max()) if lengths.numel() else 0

        tensors: dict[str, torch.Tensor] = {}
        missing_cols: list[torch.Tensor] = []
        with torch.no_grad(), record_function("lum_features"):
            if cfg.needs_queries:
                oq, oq_missing = self._query_outputs(
                    user_ids, cand_user, cand_pos, None if cond_values is None else cond_values.to(device), max_per_user
                )
                missing_cols.append(oq_missing)
            if cfg.needs_items:
                item_vec, item_missing = self._item_lookup(item_ids)
                missing_cols.append(item_missing.unsqueeze(1))
            if "oq" in cfg.features:
                direct = F.normalize(oq, dim=-1) if cfg.normalize else oq  # zero (missing) rows stay zero
                for c, name in enumerate(cfg.condition_names):
                    tensors[f"{prefix}_oq_{name}"] = direct[:, c]
            if "item" in cfg.features:
                tensors[f"{prefix}_item"] = F.normalize(item_vec, dim=-1) if cfg.normalize else item_vec
            if "sim" in cfg.features:
                # Zero vectors (missing) give cosine 0 through the eps clamp; the where makes it explicit.
                sim = F.cosine_similarity(oq, item_vec.unsqueeze(1), dim=-1, eps=1e-8)
                sim = torch.where(oq_missing | item_missing.unsqueeze(1), torch.zeros((), device=device), sim)
                for c, name in enumerate(cfg.condition_names):
                    tensors[f"{prefix}_sim_{name}"] = sim[:, c : c + 1]
            if "missing" in cfg.features:
                tensors[f"{prefix}_missing"] = torch.cat(missing_cols, dim=1).float()
        keys = list(self.key_dims())
        return KeyedTensor.from_tensor_list(keys, [tensors[k] for k in keys])

    def user_features(self, user_ids: torch.Tensor) -> KeyedTensor:
        """Per-user features [B, ...] for a user tower: `lum_oq_<condition>` of the fixed conditions and their missing flags."""
        if not self.config.conditions:
            raise ValueError("LUMFeatureModule.user_features: no fixed conditions configured (candidate conditions need a candidate)")
        user_ids = user_ids.reshape(-1).to(torch.int64)
        n = user_ids.numel()
        positions = torch.zeros(n, dtype=torch.int64, device=user_ids.device)
        with torch.no_grad():
            oq, miss = self._query_outputs(user_ids, torch.arange(n, device=user_ids.device), positions, None, 1)
        num_fixed = len(self.config.conditions)
        prefix = self.config.key_prefix
        names = [f"{prefix}_oq_{f}={v}" for f, v in self.config.conditions]
        if self.config.normalize:
            oq = F.normalize(oq, dim=-1)
        tensors = [oq[:, c] for c in range(num_fixed)] + [miss[:, :num_fixed].float()]
        return KeyedTensor.from_tensor_list(names + [f"{prefix}_missing"], tensors)

    def item_features(self, item_ids: torch.Tensor) -> KeyedTensor:
        """Per-item features [N, dim + 1] for an item tower: `lum_item` and its missing flag."""
        item_ids = item_ids.reshape(-1).to(torch.int64)
        with torch.no_grad():
            vec, miss = self._item_lookup(item_ids)
        if self.config.normalize:
            vec = F.normalize(vec, dim=-1)
        prefix = self.config.key_prefix
        return KeyedTensor.from_tensor_list([f"{prefix}_item", f"{prefix}_missing"], [vec, miss.unsqueeze(1).float()])


def lum_dense_input(dense: torch.Tensor | None, lum: KeyedTensor | torch.Tensor | None) -> torch.Tensor:
    """`cat([dense, lum], 1)` for a DLRM's dense input; either part may be None."""
    parts = [p.values() if isinstance(p, KeyedTensor) else p for p in (dense, lum) if p is not None]
    if not parts:
        raise ValueError("lum_dense_input: both dense and lum are None")
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

