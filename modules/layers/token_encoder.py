"""TokenEncoder: condition and item tokens -> `d_model` vectors through torchrec embedding tables.

Every token's sparse features arrive as one ``KeyedJaggedTensor`` whose stride is the number of
tokens (``lumrec.data.tokens``: condition keys ``cond_<feature>`` / ``cond_const``, item keys
``item_id``, ``category_id``, ...). One ``EmbeddingBagCollection`` SUM-pools every key per token;
then, per token type, one Linear maps the concatenated pooled features (plus the item's dense
row on item tokens) to ``d_model``:

    e_c = proj_condition(concat(pooled condition features))
    e_i = proj_item(concat(pooled item features, dense))

Tables are declared with ``EmbeddingBagConfig`` so the collection can be created on ``meta``
and sharded by ``DistributedModelParallel``; a table may serve several keys (``category_id`` and
``cond_category_id`` share one), which is how an existing DLRM's tables are reused as they are.
``embed_items`` embeds arbitrary candidate ids exactly as in-sequence item tokens are embedded,
using an ``ItemFeatureLookup`` (item_id -> its other id features and dense row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.data.tokens import (
    CONDITION,
    CONSTANT_CONDITION_KEY,
    ITEM,
    JaggedIds,
    TokenSequences,
    item_dense_matrix,
    item_lists_from_table,
)
from lumrec.data.schema import vocabulary_column
from lumrec.data.validate import DataValidationError
from lumrec.modules.layers.equal_lookups import equal_stride_lookup

__all__ = [
    "FeatureTableConfig",
    "TokenEncoderConfig",
    "TokenEncoder",
    "ItemFeatureLookup",
    "token_encoder_config_from_dataset",
    "token_encoder_config_from_tokens",
    "vocabulary_source",
]

ITEM_ID_KEY = "item_id"
# `cond_const` is one constant id (1) on every condition token: a 2-row table suffices.
CONSTANT_SOURCE = "const"
CONSTANT_VOCAB = 2


@dataclass
class FeatureTableConfig:
    """One SUM-pooled embedding table and the KJT keys (`feature_names`) that look it up."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.feature_names = list(self.feature_names)
        if self.num_embeddings < 1:
            raise ValueError(f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")
        # fbgemm's fused table kernels (CPU and CUDA) need dims divisible by 4; fail here, not at sharding time.
        if self.embedding_dim < 4 or self.embedding_dim % 4:
            raise ValueError(f"table {self.name!r}: embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.feature_names:
            raise ValueError(f"table {self.name!r}: feature_names is empty (no KJT key looks it up)")

    def to_torchrec(self) -> EmbeddingBagConfig:
        """The torchrec `EmbeddingBagConfig` of this table (SUM pooling)."""
        return EmbeddingBagConfig(
            name=self.name,
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            feature_names=list(self.feature_names),
            pooling=PoolingType.SUM,
        )

    @classmethod
    def from_torchrec(cls, config: EmbeddingBagConfig) -> "FeatureTableConfig":
        """Reuse an existing DLRM's table declaration (name, size, dim, feature names); pooling must be SUM."""
        if config.pooling != PoolingType.SUM:
            raise ValueError(f"table {config.name!r}: TokenEncoder needs SUM pooling, got {config.pooling}")
        return cls(config.name, config.num_embeddings, config.embedding_dim, list(config.feature_names))


@dataclass
class TokenEncoderConfig:
    """Tables, which KJT keys describe condition vs item tokens, item dense width and output width."""

    tables: list[FeatureTableConfig]
    condition_keys: list[str]
    item_keys: list[str]
    dense_dim: int = 0  # width of the per-item dense row appended on item tokens (0: none)
    d_model: int = 64
    check_ids: bool = True  # raise a named error on out-of-range ids (one max() per key; off for speed)

    def __post_init__(self) -> None:
        # YAML gives tables as mappings.
        self.tables = [t if isinstance(t, FeatureTableConfig) else FeatureTableConfig(**t) for t in self.tables]
        self.condition_keys, self.item_keys = list(self.condition_keys), list(self.item_keys)
        if self.d_model < 1 or self.dense_dim < 0:
            raise ValueError(f"TokenEncoderConfig: need d_model >= 1 and dense_dim >= 0, got {self.d_model}, {self.dense_dim}")
        if not self.condition_keys or not self.item_keys:
            raise ValueError("TokenEncoderConfig: condition_keys and item_keys must both be non-empty")
        keys = self.condition_keys + self.item_keys
        dups = sorted({k for k in keys if keys.count(k) > 1})
        if dups:
            raise ValueError(f"TokenEncoderConfig: key(s) {dups} listed more than once across condition_keys/item_keys")
        names = [t.name for t in self.tables]
        dup_tables = sorted({n for n in names if names.count(n) > 1})
        if dup_tables:
            raise ValueError(f"TokenEncoderConfig: table name(s) {dup_tables} used more than once")
        owner: dict[str, str] = {}
        for table in self.tables:
            for feat in table.feature_names:
                if feat in owner:
                    raise ValueError(f"TokenEncoderConfig: key {feat!r} is looked up by tables {owner[feat]!r} and {table.name!r}")
                if feat not in keys:
                    raise ValueError(f"TokenEncoderConfig: table {table.name!r} names key {feat!r}, which is not a condition or item key {keys}")
                owner[feat] = table.name
        missing = [k for k in keys if k not in owner]
        if missing:
            raise ValueError(f"TokenEncoderConfig: no table looks up key(s) {missing}; tables: {names}")

    @property
    def keys(self) -> list[str]:
        """All KJT keys, condition keys first (the order `lumrec.data.tokens` uses)."""
        return self.condition_keys + self.item_keys

    def table_of(self, key: str) -> FeatureTableConfig:
        """The table that key `key` looks up."""
        for table in self.tables:
            if key in table.feature_names:
                return table
        raise KeyError(f"no table looks up key {key!r}")

    def feature_dim(self, keys: Sequence[str]) -> int:
        """Sum of the pooled widths of `keys`."""
        return sum(self.table_of(k).embedding_dim for k in keys)


def vocabulary_source(source: str, vocab_sizes: Mapping[str, int]) -> str:
    """The vocabulary a source feature uses: itself, or `x_id` for a list feature `x_ids` (as validation does)."""
    if source == CONSTANT_SOURCE:
        return source
    return vocabulary_column(source, vocab_sizes) or source


def token_encoder_config_from_dataset(
    vocab_sizes: Mapping[str, int],
    condition_keys: Sequence[str],
    item_keys: Sequence[str],
    key_sources: Mapping[str, str],
    dim: int | Mapping[str, int],
    d_model: int,
    dense_dim: int = 0,
) -> TokenEncoderConfig:
    """One table per source feature (sized by the dataset's `vocab_sizes`), shared by every key of that source.

    `key_sources` maps KJT keys to source features (`TokenSequences.key_sources`), so
    `category_id` and `cond_category_id` (and a list feature `category_ids`) share table
    `t_category_id`. `dim` is one width for all tables or a width per source feature.
    """
    by_source: dict[str, list[str]] = {}
    for key in list(condition_keys) + list(item_keys):
        if key not in key_sources:
            raise ValueError(f"key {key!r} has no entry in key_sources {dict(key_sources)}")
        by_source.setdefault(vocabulary_source(key_sources[key], vocab_sizes), []).append(key)
    tables = []
    for source, keys in by_source.items():
        if source == CONSTANT_SOURCE:
            size = CONSTANT_VOCAB
        elif source in vocab_sizes:
            size = int(vocab_sizes[source])
        else:
            raise ValueError(
                f"no vocabulary size for source feature {source!r} (of key(s) {keys}); "
                f"vocab_sizes has {sorted(vocab_sizes)}"
            )
        if isinstance(dim, Mapping):
            if source not in dim:
                raise ValueError(f"no embedding dim for source feature {source!r}; dims given for {sorted(dim)}")
            width = int(dim[source])
        else:
            width = int(dim)
        tables.append(FeatureTableConfig(f"t_{source}", size, width, keys))
    return TokenEncoderConfig(tables, list(condition_keys), list(item_keys), dense_dim=dense_dim, d_model=d_model)


def token_encoder_config_from_tokens(
    tokens: TokenSequences, vocab_sizes: Mapping[str, int], dim: int | Mapping[str, int], d_model: int, dense_dim: int = 0
) -> TokenEncoderConfig:
    """`token_encoder_config_from_dataset` with the keys and key sources of built token sequences."""
    return token_encoder_config_from_dataset(
        vocab_sizes, tokens.condition_keys, tokens.item_keys, tokens.key_sources, dim, d_model, dense_dim
    )


def _as_jagged(values: Any, num_items: int, key: str) -> JaggedIds:
    """Per-item ids of one feature as JaggedIds: JaggedIds as is, a 1-D array = one id per item."""
    if isinstance(values, JaggedIds):
        ids = values
    else:
        arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        if arr.ndim != 1:
            raise ValueError(f"item feature {key!r}: expected one id per item (1-D), got shape {arr.shape}")
        ids = JaggedIds(np.ones(len(arr), dtype=np.int32), arr.astype(np.int64))
    if len(ids) != num_items:
        raise ValueError(f"item feature {key!r} has {len(ids)} rows, expected num_items={num_items} (indexed by item_id)")
    return ids


class ItemFeatureLookup(nn.Module):
    """Registered buffers mapping item_id -> its item-token id features (e.g. category_id) and dense row.

    Buffers are not persistent: the lookup is data, rebuilt from the day's items/tokens, so a
    checkpoint does not pin the item vocabulary.

    Example::

        >>> lookup = ItemFeatureLookup(4, {"category_id": np.array([0, 7, 7, 9])})
        >>> lengths, values = lookup.ids("category_id", torch.tensor([3, 1]))
        >>> lengths.tolist(), values.tolist()
        ([1, 1], [9, 7])
    """

    def __init__(
        self,
        num_items: int,
        features: Mapping[str, JaggedIds | np.ndarray | torch.Tensor] | None = None,
        dense: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"ItemFeatureLookup: num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.feature_keys: list[str] = []
        for key, values in (features or {}).items():
            if key == ITEM_ID_KEY:
                raise ValueError("ItemFeatureLookup: 'item_id' is the item itself; do not give it as a feature")
            if "." in key:
                raise ValueError(f"ItemFeatureLookup: feature key {key!r} may not contain '.'")
            ids = _as_jagged(values, self.num_items, key)
            self.register_buffer(f"{key}_offsets", torch.from_numpy(ids.offsets().astype(np.int64)), persistent=False)
            self.register_buffer(f"{key}_values", torch.from_numpy(ids.values.copy()), persistent=False)
            self.feature_keys.append(key)
        dense_t = None
        if dense is not None:
            dense_t = torch.as_tensor(np.asarray(dense, dtype=np.float32) if not isinstance(dense, torch.Tensor) else dense).float()
            if dense_t.dim() == 1:
                dense_t = dense_t[:, None]
            if dense_t.shape[0] != self.num_items:
                raise ValueError(f"ItemFeatureLookup: dense table has {dense_t.shape[0]} rows, expected num_items={self.num_items}")
        self.register_buffer("dense", dense_t, persistent=False)

    @property
    def dense_dim(self) -> int:
        """Width of the dense rows (0 when there are none)."""
        return 0 if self.dense is None else int(self.dense.shape[1])

    def check_ids(self, item_ids: torch.Tensor) -> None:
        """Raise ValueError unless every id lies in [0, num_items)."""
        if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= self.num_items):
            raise ValueError(
                f"item_id: ids must be in [0, {self.num_items}), got range [{int(item_ids.min())}, {int(item_ids.max())}]"
            )

    def ids(self, key: str, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lengths int32 [n], values int64) of feature `key` for items `item_ids` [n], as KJT pieces."""
        if key == ITEM_ID_KEY:
            return torch.ones_like(item_ids, dtype=torch.int32), item_ids.to(torch.int64)
        if key not in self.feature_keys:
            raise ValueError(f"ItemFeatureLookup has no feature {key!r}; it has {['item_id'] + self.feature_keys}")
        offsets, values = getattr(self, f"{key}_offsets"), getattr(self, f"{key}_values")
        starts, ends = offsets[item_ids], offsets[item_ids + 1]
        lengths = ends - starts
        # Ragged gather: arange(start, end) for every item, concatenated.
        run_start = torch.cumsum(lengths, 0) - lengths
        flat = torch.arange(int(lengths.sum()), device=item_ids.device)
        idx = flat - torch.repeat_interleave(run_start - starts, lengths)
        return lengths.to(torch.int32), values[idx]

    def dense_rows(self, item_ids: torch.Tensor) -> torch.Tensor | None:
        """Dense rows `[n, dense_dim]` of `item_ids`, or None when the lookup has none."""
        return None if self.dense is None else self.dense[item_ids]

    @classmethod
    def from_tokens(
        cls, tokens: TokenSequences, num_items: int, dense: np.ndarray | torch.Tensor | None = None
    ) -> "ItemFeatureLookup":
        """Each item's features as seen on its latest item token (items never seen get no ids)."""
        is_item = np.flatnonzero(tokens.token_type == ITEM)
        item_of = tokens.item_id[is_item]
        if len(item_of) and int(item_of.max()) >= num_items:
            raise ValueError(f"item_id: tokens have item id {int(item_of.max())} >= num_items={num_items}")
        # Last occurrence of every item: unique over the reversed order.
        uniq, first_rev = np.unique(item_of[::-1], return_index=True)
        rows = is_item[len(is_item) - 1 - first_rev]
        features = {}
        for key in tokens.item_keys:
            if key == ITEM_ID_KEY:
                continue
            seen = tokens.features[key].take(rows)
            lengths = np.zeros(num_items, dtype=np.int32)
            lengths[uniq] = seen.lengths
            # Values must follow item-id order; `uniq` is ascending, so `seen` already is.
            features[key] = JaggedIds(lengths, seen.values)
        return cls(num_items, features, dense)

    @classmethod
    def from_items_table(
        cls,
        table: pa.Table,
        item_keys: Sequence[str],
        num_items: int,
        dense_columns: Sequence[str] | None = None,
        source: str = "items",
    ) -> "ItemFeatureLookup":
        """From an items table: list columns (`category_ids`) stay jagged, scalar id columns give one id per item (0 if absent).

        `dense_columns`: float/list-of-float columns for the dense row (None: no dense row; [] is also none).
        """
        features: dict[str, JaggedIds | np.ndarray] = {}
        item_ids = table.column("item_id").to_numpy() if "item_id" in table.column_names else None
        if item_ids is None:
            raise DataValidationError(source, f"missing column 'item_id'; has {table.column_names}", column="item_id")
        for key in item_keys:
            if key == ITEM_ID_KEY:
                continue
            if key not in table.column_names:
                raise DataValidationError(source, f"item feature {key!r} is not a column; has {table.column_names}", column=key)
            col_type = table.schema.field(key).type
            if pa.types.is_list(col_type) or pa.types.is_large_list(col_type):
                features[key] = item_lists_from_table(table, key, num_items, source)
            else:
                arr = np.zeros(num_items, dtype=np.int64)
                arr[item_ids] = table.column(key).fill_null(0).to_numpy(zero_copy_only=False)
                features[key] = arr
        dense = None
        if dense_columns:
            dense, _ = item_dense_matrix(table, list(dense_columns), num_items, source)
        return cls(num_items, features, dense)


class TokenEncoder(nn.Module):
    """Sparse (+ dense) features of every token -> one `d_model` vector per token, one projection per token type.

    `lookup_group`: None (one process) or the process group whose ranks pad every table lookup to
    one stride (`lumrec.modules.layers.equal_lookups.set_lookup_group`, for row-wise sharded tables).

    Example::

        >>> cfg = TokenEncoderConfig(
        ...     tables=[FeatureTableConfig("t_cat", 10, 4, ["cond_category_id", "category_id"]),
        ...             FeatureTableConfig("t_item", 20, 4, ["item_id"])],
        ...     condition_keys=["cond_category_id"], item_keys=["item_id", "category_id"], d_model=8)
        >>> enc = TokenEncoder(cfg)
        >>> kjt = KeyedJaggedTensor(keys=cfg.keys, values=torch.tensor([3, 5, 3]),
        ...                         lengths=torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.int32), stride=2)
        >>> enc(kjt, token_type=torch.tensor([0, 1])).shape       # tokens [c(cat 3), i(item 5, cat 3)]
        torch.Size([2, 8])
    """

    lookup_group: Any = None

    def __init__(
        self,
        config: TokenEncoderConfig,
        device: torch.device | str | None = None,
        table_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        table_device = device if table_device is None else table_device
        self.embedding_bag_collection = EmbeddingBagCollection(
            tables=[t.to_torchrec() for t in config.tables],
            device=torch.device(table_device) if table_device is not None else None,
        )
        self.condition_proj = nn.Linear(config.feature_dim(config.condition_keys), config.d_model, device=device)
        self.item_proj = nn.Linear(config.feature_dim(config.item_keys) + config.dense_dim, config.d_model, device=device)
        self._zero_projection_biases()

    @property
    def keys(self) -> list[str]:
        """KJT keys the encoder reads, condition keys first."""
        return self.config.keys

    def reset_parameters(self) -> None:
        """(Re-)initialise tables (torchrec's per-table init) and projections, e.g. after `to_empty` from meta."""
        with torch.no_grad():
            for table in self.embedding_bag_collection.embedding_bag_configs():
                weight = self.embedding_bag_collection.embedding_bags[table.name].weight
                # torchrec's own reset_parameters is a no-op once built on meta, so apply init_fn here.
                if weight.device.type != "meta":
                    table.init_fn(weight)
        self.condition_proj.reset_parameters()
        self.item_proj.reset_parameters()
        self._zero_projection_biases()

    def _zero_projection_biases(self) -> None:
        """Start the projections without bias.

        torchrec's table init is tiny (U(+-1/sqrt(rows))), so a random bias would dominate every
        projected token and make all items start as nearly the same unit vector, which stalled
        full-softmax LUM training at the popularity solution on ML-1M.
        """
        with torch.no_grad():
            self.condition_proj.bias.zero_()
            self.item_proj.bias.zero_()

    # -- KJT plumbing ---------------------------------------------------------------------------

    def _select_keys(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT restricted to (and ordered as) the encoder's keys; a sharded collection wants exactly those."""
        have = kjt.keys()
        if have == self.keys:
            return kjt
        missing = [k for k in self.keys if k not in have]
        if missing:
            raise ValueError(f"TokenEncoder: KJT lacks key(s) {missing}; it has {have}, the encoder reads {self.keys}")
        return kjt.permute([have.index(k) for k in self.keys])

    def _check_ids(self, kjt: KeyedJaggedTensor) -> None:
        """Named error for ids outside their table (nn.EmbeddingBag would fail with a bare index error)."""
        per_key = kjt.to_dict()
        for key in self.keys:
            values = per_key[key].values()
            if values.numel() == 0:
                continue
            lo, hi = int(values.min()), int(values.max())
            size = self.config.table_of(key).num_embeddings
            if lo < 0 or hi >= size:
                raise ValueError(
                    f"TokenEncoder: key {key!r} has ids in [{lo}, {hi}] but table "
                    f"{self.config.table_of(key).name!r} has {size} rows"
                )

    def pooled(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """SUM-pooled embedding `[stride, dim]` of every key (zeros where a token has no id for it)."""
        kjt = self._select_keys(kjt)
        if self.config.check_ids:
            self._check_ids(kjt)
        if self.lookup_group is not None:  # N ranks: one stride everywhere (lumrec.modules.layers.equal_lookups)
            return equal_stride_lookup(self.embedding_bag_collection, kjt, self.lookup_group)
        return self.embedding_bag_collection(kjt).to_dict()

    def _project(self, pooled: dict[str, torch.Tensor], rows: torch.Tensor | None, token_type: int, dense: torch.Tensor | None) -> torch.Tensor:
        """Projection of one token type for the rows `rows` of the pooled features (all rows when None)."""
        keys = self.config.condition_keys if token_type == CONDITION else self.config.item_keys
        parts = [pooled[k] if rows is None else pooled[k][rows] for k in keys]
        if token_type == ITEM and self.config.dense_dim:
            parts.append(dense if rows is None else dense[rows])
        proj = self.condition_proj if token_type == CONDITION else self.item_proj
        # torchrec pools in float32 whatever the module dtype; match the projection's dtype.
        return proj(torch.cat(parts, dim=1).to(proj.weight.dtype))

    def _check_dense(self, dense: torch.Tensor | None, n: int, where: str) -> None:
        """The dense rows must match `dense_dim` exactly (silently dropping them would hide a config slip)."""
        want = self.config.dense_dim
        if want == 0:
            if dense is not None and dense.numel() and dense.shape[-1] != 0:
                raise ValueError(f"TokenEncoder: {where} has dense features of width {dense.shape[-1]} but dense_dim=0")
            return
        if dense is None:
            raise ValueError(f"TokenEncoder: dense_dim={want} but {where} has no dense features")
        if dense.shape != (n, want):
            raise ValueError(f"TokenEncoder: {where} dense features have shape {tuple(dense.shape)}, expected ({n}, {want})")

    # -- public entry points ----------------------------------------------------------------------

    def forward(self, kjt: KeyedJaggedTensor, token_type: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Embed `T` tokens: KJT of stride T, `token_type [T]` (0 condition / 1 item), item dense rows `[T, dense_dim]`."""
        n = int(token_type.numel())
        if kjt.stride() != n:
            raise ValueError(f"TokenEncoder: KJT stride {kjt.stride()} != number of tokens {n}")
        bad = (token_type != CONDITION) & (token_type != ITEM)
        if bool(bad.any()):
            raise ValueError(f"TokenEncoder: token_type must be 0 (condition) or 1 (item); {int(bad.sum())} token(s) are not")
        self._check_dense(dense, n, "the batch")
        pooled = self.pooled(kjt)
        cond_rows = torch.nonzero(token_type == CONDITION).flatten()
        item_rows = torch.nonzero(token_type == ITEM).flatten()
        dtype = self.item_proj.weight.dtype
        out = torch.zeros(n, self.config.d_model, dtype=dtype, device=self.item_proj.weight.device)
        # index_copy keeps autograd to both projections; each type only pays for its own rows.
        out = out.index_copy(0, cond_rows, self._project(pooled, cond_rows, CONDITION, dense))
        out = out.index_copy(0, item_rows, self._project(pooled, item_rows, ITEM, dense))
        return out

    def item_kjt(self, item_ids: torch.Tensor, lookup: ItemFeatureLookup) -> KeyedJaggedTensor:
        """The KJT of item tokens for `item_ids` [n]: item keys from the lookup, condition keys empty."""
        n = int(item_ids.numel())
        lengths, values = [], []
        for key in self.keys:
            if key in self.config.condition_keys:
                lengths.append(torch.zeros(n, dtype=torch.int32, device=item_ids.device))
                values.append(torch.zeros(0, dtype=torch.int64, device=item_ids.device))
            else:
                key_lengths, key_values = lookup.ids(key, item_ids)
                lengths.append(key_lengths)
                values.append(key_values)
        return KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=n)

    def embed_items(self, item_ids: torch.Tensor, item_feature_lookup: ItemFeatureLookup) -> torch.Tensor:
        """Item-token embeddings `[n, d_model]` of arbitrary ids, identical to those of in-sequence item tokens."""
        item_ids = item_ids.reshape(-1).to(torch.int64)
        item_feature_lookup.check_ids(item_ids)
        dense = item_feature_lookup.dense_rows(item_ids) if self.config.dense_dim else None
        self._check_dense(dense, int(item_ids.numel()), "the item lookup")
        pooled = self.pooled(self.item_kjt(item_ids, item_feature_lookup))
        return self._project(pooled, None, ITEM, dense)

    def condition_kjt(
        self, conditions: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]], num_tokens: int | None = None
    ) -> KeyedJaggedTensor:
        """The KJT of condition tokens: `conditions[key]` = ids `[n]` (one per token) or `(lengths [n], values)`.

        `cond_const` is filled in (id 1) when not given; `num_tokens` is needed only when nothing else is given.
        """
        n = num_tokens
        pieces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in self.config.condition_keys:
            if key not in conditions:
                if key == CONSTANT_CONDITION_KEY:
                    continue
                raise ValueError(f"TokenEncoder: condition key {key!r} missing; give all of {self.config.condition_keys}")
            given = conditions[key]
            if isinstance(given, tuple):
                lengths, values = given
            else:
                values = given.reshape(-1).to(torch.int64)
                lengths = torch.ones_like(values, dtype=torch.int32)
            if n is not None and lengths.numel() != n:
                raise ValueError(f"TokenEncoder: condition key {key!r} describes {lengths.numel()} tokens, others {n}")
            n = int(lengths.numel())
            pieces[key] = (lengths.to(torch.int32), values.to(torch.int64))
        unknown = [k for k in conditions if k not in self.config.condition_keys]
        if unknown:
            raise ValueError(f"TokenEncoder: {unknown} are not condition keys {self.config.condition_keys}")
        if n is None:
            raise ValueError("TokenEncoder: no condition ids given (the number of tokens is unknown)")
        device = next(iter(pieces.values()))[1].device if pieces else self.item_proj.weight.device
        if CONSTANT_CONDITION_KEY in self.config.condition_keys and CONSTANT_CONDITION_KEY not in pieces:
            # The constant condition is id 1 on every condition token, as lumrec.data.tokens builds it.
            pieces[CONSTANT_CONDITION_KEY] = (torch.ones(n, dtype=torch.int32, device=device), torch.ones(n, dtype=torch.int64, device=device))
        lengths, values = [], []
        for key in self.keys:
            if key in pieces:
                lengths.append(pieces[key][0])
                values.append(pieces[key][1])
            else:
                lengths.append(torch.zeros(n, dtype=torch.int32, device=device))
                values.append(torch.zeros(0, dtype=torch.int64, device=device))
        return KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=n)

    def embed_conditions(
        self, conditions: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]], num_tokens: int | None = None
    ) -> torch.Tensor:
        """Condition-token embeddings `[n, d_model]` for query conditions (e.g. `{"cond_category_id": genres}`)."""
        pooled = self.pooled(self.condition_kjt(conditions, num_tokens))
        return self._project(pooled, None, CONDITION, None)
