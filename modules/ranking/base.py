"""Ranking backbones' shared arches and the Embedding+MLP model (LUM step 3 consumers).

Every ranking model here has the same interface, so the pipelines and the LUM-vs-no-LUM
comparisons treat them alike:

    logits [B] = model(sparse_features: KJT, dense_features=None, lum_features=None)

- `sparse_features`: one ``KeyedJaggedTensor`` of stride B with every id feature: pooled context
  (user_id, scenario, ...), the candidate (item_id, category_id, one id each) and, for sequence
  models, the behaviour sequence (hist_item_id, hist_category_id, oldest first).
- `dense_features`, `lum_features`: float `[B, width]` tensors or torchrec ``KeyedTensor`` s (the
  output of ``LUMFeatureModule``); a model takes LUM features iff its config has `lum_dim > 0`.

Arches (imitating torchrec's DLRM): ``PooledSparseArch`` (EmbeddingBagCollection -> [B, sum
dims]), ``LogitArch`` (MLP -> one logit), ``dense_part`` (width-checked dense / LUM input). A
``RankingTrain`` wrapper owns the BCE-with-logits loss so the model stays usable for inference.

Every backbone registers itself by name (``lumrec.modules.ranking.registry``; this file: ``mlp``,
``din.py``: ``din``, ``sim.py``: ``sim``, ``hstu_ranking.py``: ``hstu``) and is built from
``RankerParts``, the tables and sizes the ranking job derives from the data set. A backbone that
reads times (HSTU's time bias) gets them in the KJT under two extra keys (``with_timestamps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lumrec.modules.ranking.registry import NoOptions, register_ranker
from lumrec.modules.layers.token_encoder import FeatureTableConfig

__all__ = [
    "HIST_TS_KEY",
    "SAMPLE_TS_KEY",
    "TableConfig",
    "ItemFeature",
    "RankerParts",
    "RankingBatch",
    "select_keys",
    "dense_part",
    "PooledSparseArch",
    "LogitArch",
    "EmbeddingMLPConfig",
    "EmbeddingMLP",
    "RankingTrain",
    "EmbeddingMLPTrain",
    "build_embedding_mlp",
    "timestamps_kjt",
    "with_timestamps",
]

Dense = torch.Tensor | KeyedTensor | None
_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
HIST_TS_KEY = "hist_ts"  # KJT key: each behaviour's unix time, same lengths as the history keys
SAMPLE_TS_KEY = "sample_ts"  # KJT key: the sample's (candidate's) unix time, one per sample


@dataclass
class TableConfig(FeatureTableConfig):
    """An embedding table and the KJT keys that look it up; `pooling` ("sum"/"mean") applies where it is pooled."""

    pooling: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in _POOLING:
            raise ValueError(f"table {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}")

    def to_torchrec(self) -> EmbeddingBagConfig:
        """The pooled torchrec table (for an `EmbeddingBagCollection`)."""
        return EmbeddingBagConfig(
            name=self.name,
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            feature_names=list(self.feature_names),
            pooling=_POOLING[self.pooling],
        )

    def to_torchrec_unpooled(self) -> EmbeddingConfig:
        """The unpooled torchrec table (for an `EmbeddingCollection`: one vector per id)."""
        return EmbeddingConfig(
            name=self.name, num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim, feature_names=list(self.feature_names)
        )


def tables_from(owner: str, tables: Sequence[TableConfig | FeatureTableConfig | dict]) -> list[TableConfig]:
    """Tables as `TableConfig` (YAML gives mappings); duplicate table names or keys are errors naming them."""
    out = []
    for t in tables:
        if isinstance(t, TableConfig):
            out.append(t)
        elif isinstance(t, FeatureTableConfig):
            out.append(TableConfig(t.name, t.num_embeddings, t.embedding_dim, list(t.feature_names)))
        elif isinstance(t, dict):
            out.append(TableConfig(**t))
        else:
            raise TypeError(f"{owner}: a table must be a TableConfig or a mapping, got {type(t).__name__}")
    names = [t.name for t in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{owner}: table name(s) {dups} used more than once")
    keys = [k for t in out for k in t.feature_names]
    dup_keys = sorted({k for k in keys if keys.count(k) > 1})
    if dup_keys:
        raise ValueError(f"{owner}: key(s) {dup_keys} looked up by more than one table")
    return out


def check_sizes(owner: str, **sizes: int | Sequence[int]) -> None:
    """Raise a ValueError naming `owner.name` unless the width(s) are >= 0 (lists: >= 1 each)."""
    for name, value in sizes.items():
        values = [value] if isinstance(value, int) else list(value)
        floor = 0 if isinstance(value, int) else 1
        if any(int(v) < floor for v in values):
            raise ValueError(f"{owner}: {name} must be >= {floor}, got {value}")


@dataclass(frozen=True)
class ItemFeature:
    """One id of the candidate (item_id, category_id) and its table; `history_key` (hist_X) shares the table when the history has it."""

    table: str
    num_embeddings: int
    candidate_key: str
    history_key: str | None = None


@dataclass
class RankerParts:
    """What every ranking backbone is built from (``lumrec.modules.ranking.registry``): tables sized from the data set.

    `context_tables` are pooled per sample (user_id, scenario, ...; mean-pooled item list keys);
    `item_features` are the candidate's ids, item_id first, each with the behaviour key that
    shares its table. The widths and sizes are ``RankModelConfig``'s shared ones.

    Example::

        >>> parts = RankerParts(4, [TableConfig("t_user", 10, 4, ["user_id"])],
        ...                     [ItemFeature("t_item", 20, "item_id", "hist_item_id"), ItemFeature("t_category", 5, "category_id")])
        >>> parts.history_keys, [t.feature_names for t in parts.pooled_item_tables()]
        (['hist_item_id'], [['item_id', 'hist_item_id'], ['category_id']])
    """

    embedding_dim: int
    context_tables: list[TableConfig]
    item_features: list[ItemFeature]
    dense_dim: int = 0
    lum_dim: int = 0  # width of the LUM features (0: the model takes none)
    mlp: list[int] = field(default_factory=lambda: [64, 32])
    attention_mlp: list[int] = field(default_factory=lambda: [32])  # target attention (DIN, SIM)
    attention_normalize: Literal["none", "softmax"] = "none"

    @property
    def history_keys(self) -> list[str]:
        """The behaviour keys in use, in item feature order."""
        return [f.history_key for f in self.item_features if f.history_key]

    def pooled_item_tables(self, pooling: Literal["sum", "mean"] = "mean") -> list[TableConfig]:
        """One pooled table per candidate id, also looked up by its behaviour key (mean pooling of one id is the id's vector)."""
        return [TableConfig(f.table, f.num_embeddings, self.embedding_dim, [f.candidate_key] + ([f.history_key] if f.history_key else []),
                            pooling=pooling) for f in self.item_features]


@dataclass
class RankingBatch:
    """One ranking batch: all ids as a KJT, float labels [B], optional dense and LUM features."""

    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    dense_features: Dense = None
    lum_features: Dense = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankingBatch":
        """The batch on `device`."""
        move = lambda x: None if x is None else x.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return RankingBatch(move(self.sparse_features), move(self.labels), move(self.dense_features), move(self.lum_features))


def select_keys(kjt: KeyedJaggedTensor, keys: Sequence[str], owner: str) -> KeyedJaggedTensor:
    """The KJT restricted to `keys` (in that order); a missing key is an error naming it and `owner`."""
    have = kjt.keys()
    if list(keys) == list(have):
        return kjt
    index = {k: i for i, k in enumerate(have)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise ValueError(f"{owner}: sparse features have no key(s) {missing}; keys: {have}")
    return kjt.permute([index[k] for k in keys])


def timestamps_kjt(sample_ts: torch.Tensor, hist_ts: torch.Tensor, hist_lengths: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT of stride B with keys `sample_ts` (one per sample) and `hist_ts` (`hist_lengths[b]` each)."""
    batch = sample_ts.numel()
    if hist_lengths.numel() != batch or int(hist_lengths.sum()) != hist_ts.numel():
        raise ValueError(
            f"timestamps_kjt: {batch} sample times, {hist_lengths.numel()} history lengths summing to "
            f"{int(hist_lengths.sum())}, {hist_ts.numel()} history times"
        )
    lengths = torch.cat([torch.ones_like(hist_lengths), hist_lengths]).to(torch.int32)
    values = torch.cat([sample_ts.reshape(-1), hist_ts.reshape(-1)]).to(torch.int64)
    return KeyedJaggedTensor(keys=[SAMPLE_TS_KEY, HIST_TS_KEY], values=values, lengths=lengths, stride=batch)


def with_timestamps(
    sparse_features: KeyedJaggedTensor, sample_ts: torch.Tensor, hist_ts: torch.Tensor, hist_lengths: torch.Tensor
) -> KeyedJaggedTensor:
    """`sparse_features` with the `sample_ts` / `hist_ts` keys appended (what a backbone registered with `timestamps=True` reads)."""
    return KeyedJaggedTensor.concat([sparse_features, timestamps_kjt(sample_ts, hist_ts, hist_lengths)])


def dense_part(x: Dense, width: int, name: str, batch_size: int, owner: str) -> torch.Tensor | None:
    """`x` as a float [B, width] tensor (KeyedTensor -> its values), or None when `width` is 0; checks shape."""
    if width == 0:
        if x is not None and (x.values() if isinstance(x, KeyedTensor) else x).numel() > 0:
            raise ValueError(f"{owner}: got {name} but the model was built without them ({name} width 0 in its config)")
        return None
    if x is None:
        raise ValueError(f"{owner}: {name} of width {width} are required by the config but none were given")
    values = x.values() if isinstance(x, KeyedTensor) else x
    if values.dim() != 2 or tuple(values.shape) != (batch_size, width):
        raise ValueError(f"{owner}: {name} must be [{batch_size}, {width}], got {tuple(values.shape)}")
    return values.float()


class PooledSparseArch(nn.Module):
    """Pooled embeddings of every key of an EmbeddingBagCollection, concatenated: KJT -> [B, sum of dims].

    Example::

        >>> ebc = EmbeddingBagCollection(tables=[TableConfig("t_user", 10, 4, ["user_id"]).to_torchrec()])
        >>> arch = PooledSparseArch(ebc)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user_id"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> arch(kjt).shape
        torch.Size([2, 4])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        configs = embedding_bag_collection.embedding_bag_configs()
        self.feature_names: list[str] = [k for c in configs for k in c.feature_names]
        self.out_features: int = sum(c.embedding_dim * len(c.feature_names) for c in configs)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings [B, out_features] of the KJT's keys this collection looks up."""
        pooled: KeyedTensor = self.embedding_bag_collection(select_keys(features, self.feature_names, "PooledSparseArch"))
        # By key, not position: a sharded collection returns its keys in shard order.
        per_key = pooled.to_dict()
        return torch.cat([per_key[k] for k in self.feature_names], dim=1)


class LogitArch(nn.Module):
    """MLP (ReLU) over the concatenated features, then one linear logit: [B, in_features] -> [B].

    Example::

        >>> LogitArch(10, [8, 4])(torch.rand(3, 10)).shape
        torch.Size([3])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], device: torch.device | None = None) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"LogitArch: in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        layer_sizes = list(layer_sizes)
        self.mlp: nn.Module = MLP(in_features, layer_sizes, bias=True, activation="relu", device=device) if layer_sizes else nn.Identity()
        self.logit = nn.Linear(layer_sizes[-1] if layer_sizes else in_features, 1, device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [B]."""
        return self.logit(self.mlp(features)).squeeze(-1)


@dataclass
class EmbeddingMLPConfig:
    """Pooled tables for every sparse key (behaviour keys pooled too, e.g. `pooling="mean"`), dense/LUM widths, MLP."""

    tables: list[TableConfig]
    dense_dim: int = 0
    lum_dim: int = 0  # width of the LUM features (0: the model takes none)
    mlp: list[int] = field(default_factory=lambda: [64, 32])

    def __post_init__(self) -> None:
        self.tables = tables_from("EmbeddingMLPConfig", self.tables)
        if not self.tables:
            raise ValueError("EmbeddingMLPConfig: tables is empty")
        self.mlp = list(self.mlp)
        check_sizes("EmbeddingMLPConfig", dense_dim=self.dense_dim, lum_dim=self.lum_dim, mlp=self.mlp)


class EmbeddingMLP(nn.Module):
    """Embedding+MLP ranker: pooled embeddings ++ dense ++ LUM features -> MLP -> logit.

    Example::

        >>> cfg = EmbeddingMLPConfig([TableConfig("t_user", 10, 4, ["user_id"]), TableConfig("t_item", 20, 4, ["item_id"])],
        ...                          dense_dim=3, lum_dim=2, mlp=[8])
        >>> model = EmbeddingMLP(cfg)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.tensor([1, 2, 5, 6]), torch.ones(4, dtype=torch.int32))
        >>> model(kjt, torch.rand(2, 3), torch.rand(2, 2)).shape
        torch.Size([2])
    """

    def __init__(self, config: EmbeddingMLPConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        ebc = EmbeddingBagCollection(tables=[t.to_torchrec() for t in config.tables], device=device)
        self.sparse_arch = PooledSparseArch(ebc)
        self.over_arch = LogitArch(self.sparse_arch.out_features + config.dense_dim + config.lum_dim, config.mlp, device=device)

    @property
    def in_features(self) -> int:
        """Width of the MLP input (pooled embeddings + dense + LUM)."""
        return self.over_arch.in_features

    def forward(self, sparse_features: KeyedJaggedTensor, dense_features: Dense = None, lum_features: Dense = None) -> torch.Tensor:
        """Logits [B]."""
        batch = sparse_features.stride()
        with record_function("embedding_mlp"):
            parts = [self.sparse_arch(sparse_features)]
            cfg = self.config
            for x, width, name in ((dense_features, cfg.dense_dim, "dense features"), (lum_features, cfg.lum_dim, "LUM features")):
                part = dense_part(x, width, name, batch, "EmbeddingMLP")
                if part is not None:
                    parts.append(part)
            return self.over_arch(torch.cat(parts, dim=1))


class RankingTrain(nn.Module):
    """Wraps a ranking model and owns its BCE-with-logits loss: batch -> (loss, logits [B] detached).

    Example::

        >>> cfg = EmbeddingMLPConfig([TableConfig("t_item", 20, 4, ["item_id"])], mlp=[8])
        >>> train = RankingTrain(EmbeddingMLP(cfg))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([1, 2]), torch.ones(2, dtype=torch.int32))
        >>> loss, logits = train(RankingBatch(kjt, torch.tensor([1.0, 0.0])))
        >>> loss.dim(), logits.shape
        (0, torch.Size([2]))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean BCE loss, logits [B]) of one batch."""
        logits = self.model(batch.sparse_features, batch.dense_features, batch.lum_features)
        labels = batch.labels.reshape(-1).to(logits.dtype)
        if labels.numel() != logits.numel():
            raise ValueError(f"{type(self).__name__}: {labels.numel()} labels for {logits.numel()} samples")
        return self.loss_fn(logits, labels), logits.detach()


class EmbeddingMLPTrain(RankingTrain):
    """`RankingTrain` of an `EmbeddingMLP`."""

    def __init__(self, model: EmbeddingMLP) -> None:
        super().__init__(model)


@register_ranker("mlp")
def build_embedding_mlp(parts: RankerParts, options: NoOptions) -> EmbeddingMLP:
    """The ranking job's Embedding+MLP: context tables and one mean-pooled table per candidate id, shared with its behaviour key."""
    return EmbeddingMLP(EmbeddingMLPConfig(parts.context_tables + parts.pooled_item_tables(), dense_dim=parts.dense_dim,
                                           lum_dim=parts.lum_dim, mlp=list(parts.mlp)))
