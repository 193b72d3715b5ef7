"""Token sequences: events -> interleaved condition/item tokens (LUM) or plain item tokens (HSTU, SASRec).

Every token carries sparse id features, kept jagged per token so that one feature can hold
several ids (e.g. an item's ``category_ids``); ``to_kjt`` turns them into a torchrec
``KeyedJaggedTensor`` whose stride is the number of tokens.

KJT keys: condition features are named ``cond_<feature>`` (``cond_const`` when the
condition list is empty: one constant id 1 on every condition token); item features keep
their own name (``item_id``, ``category_id``, ...). ``TokenSequences.key_sources`` maps each
key back to its source feature, so an encoder can share one table between ``category_id``
and ``cond_category_id``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from lumrec.data.sequences import UserSequences, offsets_from_lengths, ragged_arange
from lumrec.data.validate import DataValidationError

CONDITION = 0
ITEM = 1
# Event columns that may describe a condition (the context an item was consumed in).
CONDITION_FEATURES = ("scenario", "query_id", "category_id")
# Event columns that may describe an item token; item-level list features come in via `item_lists`.
EVENT_ITEM_FEATURES = ("item_id", "category_id", "action")
CONSTANT_CONDITION_KEY = "cond_const"


def condition_key(feature: str) -> str:
    """The KJT key of condition feature `feature`."""
    return f"cond_{feature}"


@dataclass
class JaggedIds:
    """Ids of one feature for a run of rows: row r holds `values[offsets[r]:offsets[r+1]]`."""

    lengths: np.ndarray  # int32 (R,)
    values: np.ndarray  # int64 (sum(lengths),)

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int32)
        self.values = np.asarray(self.values, dtype=np.int64)
        self._offsets: np.ndarray | None = None
        if int(self.lengths.sum(dtype=np.int64)) != len(self.values):
            raise ValueError(f"JaggedIds: lengths sum to {int(self.lengths.sum())} but there are {len(self.values)} values")

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.lengths)

    def offsets(self) -> np.ndarray:
        """int64 offsets (R+1,), computed once (batches gather from the same table many times)."""
        if self._offsets is None:
            self._offsets = offsets_from_lengths(self.lengths)
        return self._offsets

    def take(self, rows: np.ndarray) -> "JaggedIds":
        """Rows `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        return JaggedIds(lengths, self.values[ragged_arange(self.offsets()[rows], lengths)])

    def first_or_zero(self) -> np.ndarray:
        """One id per row: the row's first id, 0 where the row is empty (dense view of single-id features)."""
        out = np.zeros(len(self), dtype=np.int64)
        has = self.lengths > 0
        out[has] = self.values[self.offsets()[:-1][has]]
        return out


@dataclass
class TokenConfig:
    """How events become tokens: which features describe conditions and items, and how much history to keep."""

    # Any of CONDITION_FEATURES; several = multi-condition (embeddings summed by the encoder);
    # an empty list = one constant condition token per event (key `cond_const`, id 1).
    condition_features: list[str] = field(default_factory=lambda: ["scenario"])
    # Event features (item_id, category_id, action) and/or item-level list features given as `item_lists`.
    item_features: list[str] = field(default_factory=lambda: ["item_id", "category_id"])
    # Keep only each user's most recent max_events events (None: all).
    max_events: int | None = None
    include_actions: bool = False  # keep the per-token action codes (HSTU's action-aware inputs)
    include_timestamps: bool = True  # keep per-token timestamps (HSTU's time bias)


@dataclass
class TokenSequences:
    """Per-user token sequences, jagged: user u's tokens are `[offsets[u], offsets[u+1])`."""

    user_ids: np.ndarray  # int64 (U,)
    offsets: np.ndarray  # int64 (U+1,)
    token_type: np.ndarray  # int8 (T,): CONDITION or ITEM
    position: np.ndarray  # int64 (T,): index of the token within its user's sequence
    item_id: np.ndarray  # int64 (T,): the item of item tokens (the prediction target), 0 on condition tokens
    features: dict[str, JaggedIds]  # KJT key -> per-token ids
    condition_keys: tuple[str, ...]
    item_keys: tuple[str, ...]
    key_sources: dict[str, str]  # KJT key -> source feature name
    ts: np.ndarray | None = None  # int64 (T,): the event's timestamp (both tokens of a LUM event)
    action: np.ndarray | None = None  # int32 (T,): the event's action on item tokens, 0 on condition tokens

    def __len__(self) -> int:
        """Number of users (sequences)."""
        return len(self.user_ids)

    @property
    def num_tokens(self) -> int:
        """Total number of tokens."""
        return int(self.offsets[-1])

    @property
    def keys(self) -> list[str]:
        """KJT keys, condition keys first."""
        return list(self.condition_keys) + list(self.item_keys)

    def lengths(self) -> np.ndarray:
        """Tokens per user, int64 (U,)."""
        return np.diff(self.offsets)

    def token_index(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Flat token indices of the sequences `rows` (all when None), in row order."""
        if rows is None:
            return np.arange(self.num_tokens, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        return ragged_arange(self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows])

    def dense_ids(self, key: str, token_index: np.ndarray | None = None) -> np.ndarray:
        """Feature `key` as one id per token (first id; 0 where the token has none)."""
        feat = self._feature(key)
        return feat.first_or_zero() if token_index is None else feat.take(token_index).first_or_zero()

    def take(self, rows: Sequence[int] | np.ndarray) -> "TokenSequences":
        """The sequences at row indices `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.take_spans(rows, self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows])

    def take_spans(self, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> "TokenSequences":
        """One sequence per span: tokens `[starts[k], starts[k] + lengths[k])` of row `rows[k]` (a row may repeat)."""
        rows, starts, lengths = (np.asarray(a, dtype=np.int64) for a in (rows, starts, lengths))
        inside = (starts >= self.offsets[rows]) & (starts + lengths <= self.offsets[rows + 1]) & (lengths >= 0)
        if not inside.all():
            k = int(np.flatnonzero(~inside)[0])
            raise ValueError(f"span {k} [{int(starts[k])}, {int(starts[k] + lengths[k])}) lies outside row {int(rows[k])}'s tokens "
                             f"[{int(self.offsets[rows[k]])}, {int(self.offsets[rows[k] + 1])})")
        idx = ragged_arange(starts, lengths)
        return TokenSequences(
            user_ids=self.user_ids[rows],
            offsets=offsets_from_lengths(lengths),
            token_type=self.token_type[idx],
            position=self.position[idx],
            item_id=self.item_id[idx],
            features={k: f.take(idx) for k, f in self.features.items()},
            condition_keys=self.condition_keys,
            item_keys=self.item_keys,
            key_sources=dict(self.key_sources),
            ts=None if self.ts is None else self.ts[idx],
            action=None if self.action is None else self.action[idx],
        )

    def _feature(self, key: str) -> JaggedIds:
        """The feature under KJT key `key`, with an error listing the keys there are."""
        try:
            return self.features[key]
        except KeyError:
            raise KeyError(f"unknown token feature {key!r}; available: {self.keys}") from None


def _check_names(kind: str, names: Sequence[str], available: Sequence[str]) -> None:
    """Raise a ValueError naming any unknown or repeated feature and listing the available ones."""
    for name in names:
        if name not in available:
            raise ValueError(f"unknown {kind} feature {name!r}; available {kind} features: {sorted(available)}")
    dups = sorted({n for n in names if list(names).count(n) > 1})
    if dups:
        raise ValueError(f"{kind} feature(s) {dups} listed more than once")


def _item_feature_ids(
    name: str, item_ids: np.ndarray, seqs: UserSequences, event_idx: np.ndarray, item_lists: Mapping[str, JaggedIds]
) -> JaggedIds:
    """Ids of item feature `name` for the events `event_idx` (one row per event)."""
    if name in item_lists:
        table = item_lists[name]
        if len(item_ids) and int(item_ids.max()) >= len(table):
            raise ValueError(
                f"item list feature {name!r} covers item ids [0, {len(table)}) but the events have item id {int(item_ids.max())}"
            )
        return table.take(item_ids)
    values = getattr(seqs, name)[event_idx]
    return JaggedIds(np.ones(len(values), dtype=np.int32), values)


def _spread(per_event: JaggedIds, is_owner: np.ndarray, owner_rows: np.ndarray) -> JaggedIds:
    """Place per-event ids on the owner tokens (`is_owner`), length 0 on all other tokens."""
    lengths = np.zeros(len(is_owner), dtype=np.int32)
    lengths[owner_rows] = per_event.lengths
    # Owner tokens appear in event order, so the values keep their order unchanged.
    return JaggedIds(lengths, per_event.values)


def _validate_config(cfg: TokenConfig, item_lists: Mapping[str, JaggedIds]) -> None:
    """Check the config's feature names against what the events and item lists provide."""
    _check_names("condition", cfg.condition_features, CONDITION_FEATURES)
    _check_item_config(cfg, item_lists)


def _check_item_config(cfg: TokenConfig, item_lists: Mapping[str, JaggedIds]) -> None:
    """Check the item features and max_events of a config."""
    bad = [name for name in item_lists if name.startswith("cond_")]
    if bad:
        raise ValueError(f"item list feature name(s) {bad} start with 'cond_', which is reserved for condition keys")
    _check_names("item", cfg.item_features, list(EVENT_ITEM_FEATURES) + list(item_lists))
    if cfg.max_events is not None and cfg.max_events < 0:
        raise ValueError(f"max_events must be >= 0 or None, got {cfg.max_events}")


def build_lum_tokens(seqs: UserSequences, cfg: TokenConfig, item_lists: Mapping[str, JaggedIds] | None = None) -> TokenSequences:
    """Interleave each user's events as `[c1, i1, c2, i2, ...]` (condition k = the context item k was consumed in)."""
    item_lists = dict(item_lists or {})
    _validate_config(cfg, item_lists)
    seqs = seqs.truncate(cfg.max_events)
    n_events = seqs.num_events
    event_idx = np.arange(n_events, dtype=np.int64)
    token_type = np.tile(np.array([CONDITION, ITEM], dtype=np.int8), n_events)
    event_pos = event_idx - np.repeat(seqs.offsets[:-1], seqs.lengths())
    position = (2 * event_pos[:, None] + np.arange(2, dtype=np.int64)).reshape(-1)
    item_id = np.zeros(2 * n_events, dtype=np.int64)
    item_id[1::2] = seqs.item_id
    cond_rows, item_rows = np.arange(0, 2 * n_events, 2), np.arange(1, 2 * n_events, 2)

    features: dict[str, JaggedIds] = {}
    key_sources: dict[str, str] = {}
    if cfg.condition_features:
        cond_keys = tuple(condition_key(f) for f in cfg.condition_features)
        for name, key in zip(cfg.condition_features, cond_keys):
            per_event = JaggedIds(np.ones(n_events, dtype=np.int32), getattr(seqs, name))
            features[key] = _spread(per_event, token_type == CONDITION, cond_rows)
            key_sources[key] = name
    else:
        cond_keys = (CONSTANT_CONDITION_KEY,)
        features[CONSTANT_CONDITION_KEY] = _spread(
            JaggedIds(np.ones(n_events, dtype=np.int32), np.ones(n_events, dtype=np.int64)), token_type == CONDITION, cond_rows
        )
        key_sources[CONSTANT_CONDITION_KEY] = "const"
    for name in cfg.item_features:
        features[name] = _spread(_item_feature_ids(name, seqs.item_id, seqs, event_idx, item_lists), token_type == ITEM, item_rows)
        key_sources[name] = name

    action = None
    if cfg.include_actions:
        action = np.zeros(2 * n_events, dtype=np.int32)
        action[1::2] = seqs.action
    return TokenSequences(
        user_ids=seqs.user_ids.copy(),
        offsets=2 * seqs.offsets,
        token_type=token_type,
        position=position,
        item_id=item_id,
        features=features,
        condition_keys=cond_keys,
        item_keys=tuple(cfg.item_features),
        key_sources=key_sources,
        ts=np.repeat(seqs.ts, 2) if cfg.include_timestamps else None,
        action=action,
    )


def drop_condition_ids(tokens: TokenSequences, rate: float, seed: int) -> TokenSequences:
    """Empty each condition feature of each condition token with probability `rate` (seeded; the constant key is kept).

    Condition dropout for pre-training: a token whose features are all emptied pools to zero, the
    unconditioned token that a `none=0` query asks with, so one LUM learns to answer both "what
    next under condition c" and "what next at all". Keys are drawn independently, so a
    multi-condition LUM also sees every subset of its conditions.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"condition_dropout must be in [0, 1), got {rate}")
    if rate == 0.0:
        return tokens
    rng = np.random.default_rng(seed)
    is_condition = tokens.token_type == CONDITION
    features = dict(tokens.features)
    for key in tokens.condition_keys:
        if key == CONSTANT_CONDITION_KEY:
            continue  # a constant LUM has nothing to drop
        feat = features[key]
        drop = is_condition & (rng.random(len(is_condition)) < rate)
        keep_values = np.repeat(~drop, feat.lengths)
        lengths = np.where(drop, 0, feat.lengths).astype(feat.lengths.dtype)
        features[key] = JaggedIds(lengths, feat.values[keep_values])
    return dataclasses.replace(tokens, features=features)


def build_item_sequences(seqs: UserSequences, cfg: TokenConfig, item_lists: Mapping[str, JaggedIds] | None = None) -> TokenSequences:
    """The plain item sequence `[i1, i2, ...]` per user (HSTU, SASRec): no condition tokens, one token per event."""
    item_lists = dict(item_lists or {})
    _check_item_config(cfg, item_lists)
    seqs = seqs.truncate(cfg.max_events)
    n_events = seqs.num_events
    event_idx = np.arange(n_events, dtype=np.int64)
    features = {name: _item_feature_ids(name, seqs.item_id, seqs, event_idx, item_lists) for name in cfg.item_features}
    return TokenSequences(
        user_ids=seqs.user_ids.copy(),
        offsets=seqs.offsets.copy(),
        token_type=np.full(n_events, ITEM, dtype=np.int8),
        position=event_idx - np.repeat(seqs.offsets[:-1], seqs.lengths()),
        item_id=seqs.item_id.copy(),
        features=features,
        condition_keys=(),
        item_keys=tuple(cfg.item_features),
        key_sources={name: name for name in cfg.item_features},
        ts=seqs.ts.copy() if cfg.include_timestamps else None,
        action=seqs.action.copy() if cfg.include_actions else None,
    )


def kjt_at(tokens: TokenSequences, token_index: np.ndarray | None = None):
    """A KeyedJaggedTensor over the tokens `token_index` (all when None), stride = number of those tokens."""
    # torch and torchrec load here only: importing, validating and describing data (`lumrec import`,
    # `stats`, `validate`) never builds a tensor and starts without them.
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = tokens.keys
    parts = [tokens.features[k] if token_index is None else tokens.features[k].take(token_index) for k in keys]
    stride = tokens.num_tokens if token_index is None else len(token_index)
    lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int32)
    values = np.concatenate([p.values for p in parts]) if parts else np.zeros(0, np.int64)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32)),
        stride=stride,
    )


def to_kjt(tokens: TokenSequences, rows: Sequence[int] | np.ndarray | None = None):
    """A KeyedJaggedTensor over the flattened tokens of sequences `rows` (all when None), one key per feature."""
    return kjt_at(tokens, None if rows is None else tokens.token_index(rows))


# -- dense per-token features ---------------------------------------------------------------


def item_dense_matrix(
    table: pa.Table, columns: Sequence[str] | None = None, num_items: int | None = None, source: str = "items"
) -> tuple[np.ndarray, list[str]]:
    """Item-level float features as a `(num_items, d)` float32 matrix indexed by item_id, plus the column name of each dimension.

    `columns`: float columns (`f_*`) and/or fixed-length list columns (`content`); default all
    of them. Items absent from the table and null values get zeros.
    """
    if "item_id" not in table.column_names:
        raise DataValidationError(source, f"missing column 'item_id'; has {table.column_names}", column="item_id")
    available = [
        n
        for n in table.column_names
        if pa.types.is_floating(table.schema.field(n).type)
        or (
            (pa.types.is_list(table.schema.field(n).type) or pa.types.is_fixed_size_list(table.schema.field(n).type) or pa.types.is_large_list(table.schema.field(n).type))
            and pa.types.is_floating(table.schema.field(n).type.value_type)
        )
    ]
    if columns is None:
        columns = available
    for name in columns:
        if name not in available:
            raise DataValidationError(source, f"unknown dense item feature {name!r}; available: {available}", column=name)
    item_ids = table.column("item_id").to_numpy()
    n = int(num_items) if num_items is not None else (int(item_ids.max()) + 1 if len(item_ids) else 1)
    if len(item_ids) and int(item_ids.max()) >= n:
        raise DataValidationError(source, f"item ids up to {int(item_ids.max())} do not fit num_items={n}", column="item_id")
    blocks, names = [], []
    for name in columns:
        col = table.column(name).combine_chunks()
        if pa.types.is_floating(col.type):
            block = col.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
            names.append(name)
        else:
            lens = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
            width = int(lens.max()) if len(lens) else 0
            bad = int(np.count_nonzero((lens != width) & col.is_valid().to_numpy(zero_copy_only=False)))
            if bad:
                raise DataValidationError(source, f"list feature must have one fixed length ({width})", column=name, rows=bad)
            block = np.zeros((len(col), width), dtype=np.float32)
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            flat = col.drop_null().flatten().fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float32)
            block[valid] = flat.reshape(-1, width)
            names.extend(f"{name}[{j}]" for j in range(width))
        blocks.append(block)
    matrix = np.zeros((n, sum(b.shape[1] for b in blocks)), dtype=np.float32)
    if blocks:
        matrix[item_ids] = np.concatenate(blocks, axis=1)
    return matrix, names


def item_lists_from_table(table: pa.Table, column: str = "category_ids", num_items: int | None = None, source: str = "items") -> JaggedIds:
    """A list-valued item column (e.g. `category_ids`) as JaggedIds indexed by item_id (absent items: empty)."""
    for name in ("item_id", column):
        if name not in table.column_names:
            raise DataValidationError(source, f"missing column {name!r}; has {table.column_names}", column=name)
    item_ids = table.column("item_id").to_numpy()
    n = int(num_items) if num_items is not None else (int(item_ids.max()) + 1 if len(item_ids) else 1)
    if len(item_ids) and int(item_ids.max()) >= n:
        raise DataValidationError(source, f"item ids up to {int(item_ids.max())} do not fit num_items={n}", column="item_id")
    col = table.column(column).combine_chunks()
    lens = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
    values = col.drop_null().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    row_lengths = np.zeros(n, dtype=np.int32)
    row_lengths[item_ids] = lens
    # Re-order the values from table order into item-id order.
    src_offsets = offsets_from_lengths(lens)
    order = np.zeros(n, dtype=np.int64)
    present = np.zeros(n, dtype=bool)
    order[item_ids] = np.arange(len(item_ids))
    present[item_ids] = True
    rows = order[present]
    ordered = values[ragged_arange(src_offsets[rows], lens[rows])]
    return JaggedIds(row_lengths, ordered)


def attach_dense(tokens: TokenSequences, item_table: np.ndarray | Mapping[str, np.ndarray], token_index: np.ndarray | None = None) -> np.ndarray:
    """Per-token dense features `(num_tokens, d)` float32: the item's row on item tokens, zeros on condition tokens.

    `item_table`: a `(num_items, d)` matrix indexed by item_id, or several named ones
    (each `(num_items,)` or `(num_items, d_k)`), concatenated in the given order.
    """
    if isinstance(item_table, Mapping):
        mats = [np.asarray(m, dtype=np.float32).reshape(len(m), -1) for m in item_table.values()]
        sizes = {len(m) for m in mats}
        if len(sizes) > 1:
            raise ValueError(f"dense item tables have different row counts {dict(zip(item_table, map(len, mats)))}")
        matrix = np.concatenate(mats, axis=1) if mats else np.zeros((0, 0), np.float32)
    else:
        matrix = np.asarray(item_table, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[:, None]
    item_id = tokens.item_id if token_index is None else tokens.item_id[token_index]
    token_type = tokens.token_type if token_index is None else tokens.token_type[token_index]
    if len(item_id) and int(item_id.max()) >= len(matrix):
        raise ValueError(f"dense item table has {len(matrix)} rows but the tokens have item id {int(item_id.max())}")
    out = matrix[item_id]
    out[token_type != ITEM] = 0.0
    return out


__all__ = [
    "CONDITION",
    "CONDITION_FEATURES",
    "CONSTANT_CONDITION_KEY",
    "EVENT_ITEM_FEATURES",
    "ITEM",
    "JaggedIds",
    "TokenConfig",
    "TokenSequences",
    "attach_dense",
    "build_item_sequences",
    "build_lum_tokens",
    "condition_key",
    "drop_condition_ids",
    "item_dense_matrix",
    "item_lists_from_table",
    "kjt_at",
    "to_kjt",
]
