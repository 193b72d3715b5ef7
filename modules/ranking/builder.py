"""The ranking job's model: `RankModelConfig` (shared sizes, options per backbone) and `build_ranker`.

`build_ranker` sizes every table from the dataset manifest's vocabularies, gathers what all
backbones share into ``RankerParts`` and hands it, with the backbone's own options, to the builder
registered under the model's name (``lumrec.modules.ranking.registry``).

Example::

    >>> vocab = {"user_id": 10, "item_id": 20, "category_id": 4, "scenario": 3}
    >>> sizes = RankModelConfig(embedding_dim=4, mlp=[8], backbones={"sim": {"short_len": 3}})
    >>> model, train = build_ranker("sim", sizes, vocab, dense_dim=2)
    >>> type(model).__name__, model.config.short_len, model.config.max_search_len
    ('SIM', 3, 50)
    >>> build_ranker("xgb", sizes, vocab)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: model: unknown ranking model 'xgb'; choose from [...'din', 'hstu', 'mlp', 'sim'...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from torch import nn

from lumrec.config import ConfigError
from lumrec.data.ranking.features import context_keys, list_columns, vocab_size
from lumrec.data.ranking.samples import HISTORY_BAG_PREFIX
from lumrec.modules.ranking.base import ItemFeature, RankerParts, RankingTrain, TableConfig
from lumrec.modules.ranking.registry import ranker_names, ranker_options, ranker_spec

__all__ = ["HISTORY_CHOICES", "RankModelConfig", "build_ranker", "list_tables", "ranker_parts"]

# The behaviour keys a ranker may use, each sharing its candidate id's table (hist_item_id is required).
HISTORY_CHOICES = {"hist_item_id": ("t_item", "item_id"), "hist_category_id": ("t_category", "category_id")}


@dataclass
class RankModelConfig:
    """Sizes of the ranking model: what every backbone shares, and each backbone's own options by name.

    `backbones` maps a registered backbone's name to its options (the dataclass it registered),
    e.g. ``{sim: {max_search_len: 50, short_len: 10}, hstu: {num_layers: 2, hstu: {num_heads: 2}}}``;
    a backbone absent from it uses its defaults. One config can so hold options for several models
    (``model=din`` vs ``model=sim`` on the same file). Unknown names and keys are errors naming them.
    """

    embedding_dim: int = 16
    mlp: list[int] = field(default_factory=lambda: [64, 32])
    # Target attention (din, sim): shared, so comparisons of the two need it once.
    attention_mlp: list[int] = field(default_factory=lambda: [32])
    attention_normalize: Literal["none", "softmax"] = "none"  # "none" (DIN) or "softmax"
    # Pooled per-sample id features; None: user_id, scenario, query_id where the manifest has a vocabulary.
    context_keys: list[str] | None = None
    history_keys: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category_id"])
    # Multi-hot item features, mean-pooled: X = the candidate's ids of the items table's list column X
    # (e.g. category_ids: all of an item's attributes), hist_X = the bag of X over the kept behaviours.
    list_keys: list[str] = field(default_factory=list)
    item_stats: list[str] = field(default_factory=list)  # dense: columns of `item_stats` of the sample's day (point-in-time)
    backbones: dict[str, Any] = field(default_factory=dict)  # {model name: its options}

    def __post_init__(self) -> None:
        # An unknown name or key fails here, when the config is read, not after the samples are built.
        unknown = sorted(set(self.backbones) - set(ranker_names())) if self.backbones else []
        if unknown:
            raise ConfigError(f"sizes.backbones: unknown ranking model(s) {unknown}; registered: {ranker_names()}")
        for name, values in self.backbones.items():
            ranker_options(name, values)

    def options(self, model: str) -> Any:
        """Backbone `model`'s options: its entry in `backbones` over its defaults."""
        return ranker_options(model, self.backbones.get(model))


def list_tables(list_keys: Sequence[str], vocab: dict[str, int], dim: int) -> list[TableConfig]:
    """One mean-pooled table per item list column, shared by its candidate key X and its bag key hist_X."""
    if len(set(list_keys)) != len(list_keys):
        raise ValueError(f"sizes.list_keys repeat: {list(list_keys)}")
    tables = []
    for column in list_columns(list_keys):
        keys = [k for k in list_keys if k in (column, HISTORY_BAG_PREFIX + column)]
        tables.append(TableConfig(f"t_list_{column}", vocab_size(vocab, column), dim, keys, pooling="mean"))
    return tables


def ranker_parts(sizes: RankModelConfig, vocab: dict[str, int], dense_dim: int = 0, lum_dim: int = 0) -> RankerParts:
    """What every backbone is built from: tables sized from the manifest vocabularies `vocab`, widths, shared sizes."""
    hist = list(sizes.history_keys)
    for key in hist:
        if key not in HISTORY_CHOICES:
            raise ValueError(f"sizes.history_keys: {key!r} is not supported; choose from {list(HISTORY_CHOICES)}")
    if "hist_item_id" not in hist:
        raise ValueError("sizes.history_keys must include 'hist_item_id'")
    d = sizes.embedding_dim
    context = [TableConfig(f"t_{k}", vocab_size(vocab, k), d, [k]) for k in context_keys(sizes.context_keys, vocab)]
    context += list_tables(sizes.list_keys, vocab, d)
    items = [ItemFeature(table, vocab_size(vocab, key), key, h if h in hist else None) for h, (table, key) in HISTORY_CHOICES.items()]
    return RankerParts(d, context, items, dense_dim=dense_dim, lum_dim=lum_dim, mlp=list(sizes.mlp),
                       attention_mlp=list(sizes.attention_mlp), attention_normalize=sizes.attention_normalize)


def build_ranker(model: str, sizes: RankModelConfig, vocab: dict[str, int], dense_dim: int = 0,
                 lum_dim: int = 0) -> tuple[nn.Module, RankingTrain]:
    """(model, its RankingTrain) of the registered backbone `model` with tables sized from the manifest vocabularies `vocab`.

    For `sizes.list_keys`, `vocab` must also size each item list column (see `lumrec.data.ranking.features.list_vocab`).
    """
    spec = ranker_spec(model)
    m = spec.builder(ranker_parts(sizes, vocab, dense_dim, lum_dim), sizes.options(model))
    return m, RankingTrain(m)
