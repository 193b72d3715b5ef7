"""DIN (Deep Interest Network, Zhou et al., KDD'18): target attention of the candidate over the behaviour sequence.

    e_t      = concat of the candidate's embeddings (item_id, category_id, ...)       [B, D]
    h_j      = the same embeddings of behaviour j, from the same tables               [T, D] (jagged)
    a_j      = ActivationUnit([h_j, e_t, h_j - e_t, h_j * e_t])                        scalar
    interest = sum_j a_j h_j      (DIN's weights are not softmax-normalised; "softmax" is an option)
    logit    = MLP([pooled context, e_t, interest, dense, LUM features])

The behaviour sequence stays jagged (`(values, offsets)`): scores and the weighted sum run on the
T real behaviours with segment ops, no padding. ``target_attention_padded_reference`` is the same
computation on a padded batch, for tests. Candidate and behaviour keys share tables
(``EmbeddingCollection``, one vector per id), so `h_j - e_t` compares like with like.

Registered as ranking backbone ``din`` (``lumrec.modules.ranking.registry``; no options of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Self, Sequence

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.ops import jagged_positions, jagged_to_padded_dense, lengths_to_offsets, offsets_to_ids, offsets_to_lengths
from lumrec.modules.ranking.base import (
    Dense,
    LogitArch,
    PooledSparseArch,
    RankerParts,
    RankingTrain,
    TableConfig,
    check_sizes,
    dense_part,
    select_keys,
    tables_from,
)
from lumrec.modules.ranking.registry import NoOptions, register_ranker

__all__ = [
    "BehaviourModelConfig",
    "DINConfig",
    "SequenceArch",
    "ActivationUnit",
    "TargetAttentionArch",
    "target_attention_padded_reference",
    "keep_most_recent",
    "compact",
    "DIN",
    "DINTrain",
    "build_din",
]

Normalize = Literal["none", "softmax"]


@dataclass
class BehaviourModelConfig:
    """Tables and keys shared by behaviour-sequence rankers (DIN, SIM).

    `sequence_tables` are looked up per id (``EmbeddingCollection``; torchrec needs one dim for all
    of them); `candidate_keys[i]` (one id per sample) and `history_keys[i]` (the behaviour
    sequence, oldest first, same lengths for every history key) must share a table.
    `context_tables` are pooled per sample (user_id, scenario, ...; may be empty).
    """

    sequence_tables: list[TableConfig]
    candidate_keys: list[str]
    history_keys: list[str]
    context_tables: list[TableConfig] = field(default_factory=list)
    dense_dim: int = 0
    lum_dim: int = 0  # width of the LUM features (0: the model takes none)
    attention_mlp: list[int] = field(default_factory=lambda: [32])
    attention_normalize: Normalize = "none"
    mlp: list[int] = field(default_factory=lambda: [64, 32])

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.sequence_tables = tables_from(owner, self.sequence_tables)
        self.context_tables = tables_from(owner, self.context_tables)
        self.candidate_keys, self.history_keys = list(self.candidate_keys), list(self.history_keys)
        self.attention_mlp, self.mlp = list(self.attention_mlp), list(self.mlp)
        check_sizes(owner, dense_dim=self.dense_dim, lum_dim=self.lum_dim, attention_mlp=self.attention_mlp, mlp=self.mlp)
        if not self.sequence_tables:
            raise ValueError(f"{owner}: sequence_tables is empty")
        dims = {t.name: t.embedding_dim for t in self.sequence_tables}
        if len(set(dims.values())) > 1:
            raise ValueError(f"{owner}: sequence_tables must share one embedding_dim (torchrec EmbeddingCollection), got {dims}")
        if not self.candidate_keys or len(self.candidate_keys) != len(self.history_keys):
            raise ValueError(
                f"{owner}: candidate_keys {self.candidate_keys} and history_keys {self.history_keys} must be non-empty and pair up"
            )
        table_of = {k: t.name for t in self.sequence_tables for k in t.feature_names}
        for cand, hist in zip(self.candidate_keys, self.history_keys):
            for key in (cand, hist):
                if key not in table_of:
                    raise ValueError(f"{owner}: no sequence table looks up key {key!r}; tables: {sorted(dims)}")
            if table_of[cand] != table_of[hist]:
                raise ValueError(
                    f"{owner}: candidate key {cand!r} (table {table_of[cand]!r}) and history key {hist!r} "
                    f"(table {table_of[hist]!r}) must share a table to live in one space"
                )
        unused = sorted(set(table_of) - set(self.candidate_keys) - set(self.history_keys))
        if unused:
            raise ValueError(f"{owner}: sequence table key(s) {unused} are neither candidate nor history keys")
        context_keys = {k for t in self.context_tables for k in t.feature_names}
        overlap = sorted(context_keys & set(table_of))
        if overlap:
            raise ValueError(f"{owner}: key(s) {overlap} are in both context_tables and sequence_tables")
        if self.attention_normalize not in ("none", "softmax"):
            raise ValueError(f"{owner}: attention_normalize must be 'none' or 'softmax', got {self.attention_normalize!r}")

    @classmethod
    def from_parts(cls, parts: RankerParts, **own: Any) -> Self:
        """The config of a ranking job's backbone: `parts`' tables, widths and sizes, plus the subclass's own fields `own`.

        Each candidate id the history has gets a per-id table shared with its behaviour key; one
        it lacks is pooled with the context tables.
        """
        d, seq = parts.embedding_dim, [f for f in parts.item_features if f.history_key]
        pooled = [TableConfig(f.table, f.num_embeddings, d, [f.candidate_key]) for f in parts.item_features if not f.history_key]
        return cls(
            sequence_tables=[TableConfig(f.table, f.num_embeddings, d, [f.candidate_key, f.history_key]) for f in seq],
            candidate_keys=[f.candidate_key for f in seq],
            history_keys=[f.history_key for f in seq],
            context_tables=list(parts.context_tables) + pooled,
            dense_dim=parts.dense_dim,
            lum_dim=parts.lum_dim,
            attention_mlp=list(parts.attention_mlp),
            attention_normalize=parts.attention_normalize,
            mlp=list(parts.mlp),
            **own,
        )

    @property
    def item_dim(self) -> int:
        """Width D of a candidate / behaviour vector (sequence dim x number of paired keys)."""
        return self.sequence_tables[0].embedding_dim * len(self.candidate_keys)

    @property
    def context_dim(self) -> int:
        """Width of the pooled context features."""
        return sum(t.embedding_dim * len(t.feature_names) for t in self.context_tables)


@dataclass
class DINConfig(BehaviourModelConfig):
    """DIN: `BehaviourModelConfig` plus how many of the most recent behaviours to attend to (None: all)."""

    max_history: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_history is not None and self.max_history < 1:
            raise ValueError(f"DINConfig: max_history must be >= 1 or None, got {self.max_history}")


class SequenceArch(nn.Module):
    """Candidate and behaviour vectors from shared tables: KJT -> (candidate [B, D], history [T, D], offsets [B+1]).

    Example::

        >>> cfg = DINConfig([TableConfig("t_item", 10, 4, ["item_id", "hist_item_id"])], ["item_id"], ["hist_item_id"])
        >>> arch = SequenceArch(cfg)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     ["item_id", "hist_item_id"], torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 1, 3, 0]))
        >>> cand, hist, offsets = arch(kjt)
        >>> cand.shape, hist.shape, offsets.tolist()
        (torch.Size([2, 4]), torch.Size([3, 4]), [0, 3, 3])
    """

    def __init__(self, config: BehaviourModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.candidate_keys, self.history_keys = list(config.candidate_keys), list(config.history_keys)
        self.embedding_collection = EmbeddingCollection(tables=[t.to_torchrec_unpooled() for t in config.sequence_tables], device=device)
        self.keys = [k for t in config.sequence_tables for k in t.feature_names]
        self.out_features = config.item_dim

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate [B, D], history values [T, D], history offsets [B+1]) after checking lengths."""
        kjt = select_keys(features, self.keys, "SequenceArch")
        batch = kjt.stride()
        lengths = kjt.lengths().view(len(self.keys), batch)
        row = {k: i for i, k in enumerate(self.keys)}
        # The checks read the data, which torch.export cannot branch on; a serving wrapper builds valid lengths.
        checking = not torch.compiler.is_compiling()
        for key in self.candidate_keys:
            if checking and bool((lengths[row[key]] != 1).any()):
                raise ValueError(f"SequenceArch: candidate key {key!r} must have exactly one id per sample")
        hist_lengths = lengths[row[self.history_keys[0]]]
        for key in self.history_keys[1:]:
            if checking and not torch.equal(lengths[row[key]], hist_lengths):
                raise ValueError(f"SequenceArch: history key {key!r} has different lengths from {self.history_keys[0]!r}")
        embedded = self.embedding_collection(kjt)
        candidate = torch.cat([embedded[k].values() for k in self.candidate_keys], dim=1)
        history = torch.cat([embedded[k].values() for k in self.history_keys], dim=1)
        return candidate, history, lengths_to_offsets(hist_lengths)


def keep_most_recent(offsets: torch.Tensor, max_len: int, total: int | None = None) -> torch.Tensor:
    """Bool [T]: the last `max_len` behaviours of each sequence (sequences are oldest first).

    `total`: T when the caller knows it (the values' length: torch.export keeps it symbolic); None reads `offsets[-1]`.
    """
    lengths = offsets_to_lengths(offsets)
    total = int(offsets[-1]) if total is None else total
    seq = offsets_to_ids(offsets, total)
    return jagged_positions(offsets, total) >= (lengths[seq] - max_len)


def compact(values: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the behaviours where `keep` is False: (values [T', ...], offsets [B+1]); order is kept."""
    seq = offsets_to_ids(offsets, keep.shape[0])  # keep has one entry per behaviour: T = offsets[-1]
    # Kept behaviours per sequence (a bincount of seq[keep], whose output size torch.export cannot know).
    new_lengths = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=offsets.device).index_add(0, seq, keep.to(torch.int64))
    return values[keep], lengths_to_offsets(new_lengths)


class ActivationUnit(nn.Module):
    """DIN's activation unit: MLP (PReLU) over [h, t, h - t, h * t] -> one score per (behaviour, target) pair.

    Example::

        >>> ActivationUnit(4, [8])(torch.rand(5, 4), torch.rand(5, 4)).shape
        torch.Size([5])
    """

    def __init__(self, dim: int, hidden: Sequence[int], device: torch.device | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 4 * dim
        for size in hidden:
            layers += [nn.Linear(width, size, device=device), nn.PReLU(size, device=device)]
            width = size
        layers.append(nn.Linear(width, 1, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scores [...] of behaviours `history [..., D]` against their targets `target [..., D]`."""
        x = torch.cat([history, target, history - target, history * target], dim=-1)
        # PReLU treats dim 1 as channels: run the MLP on a 2-D [N, 4D] view.
        return self.mlp(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


class TargetAttentionArch(nn.Module):
    """Target attention pooling on jagged behaviours: (target [B, D], history [T, D], offsets [B+1]) -> [B, D].

    An empty sequence pools to zeros.

    Example::

        >>> arch = TargetAttentionArch(4, [8])
        >>> arch(torch.rand(2, 4), torch.rand(3, 4), torch.tensor([0, 3, 3])).shape
        torch.Size([2, 4])
    """

    def __init__(self, dim: int, hidden: Sequence[int], normalize: Normalize = "none", device: torch.device | None = None) -> None:
        super().__init__()
        if normalize not in ("none", "softmax"):
            raise ValueError(f"TargetAttentionArch: normalize must be 'none' or 'softmax', got {normalize!r}")
        self.normalize = normalize
        self.unit = ActivationUnit(dim, hidden, device=device)

    def forward(self, target: torch.Tensor, history: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The attention-weighted sum of each sequence's behaviours [B, D]."""
        batch, total = target.shape[0], history.shape[0]
        seq = offsets_to_ids(offsets, total)
        scores = self.unit(history, target[seq])
        if self.normalize == "softmax":
            # Segment softmax; the max is only a shift for stability, so it carries no gradient.
            seg_max = torch.full((batch,), float("-inf"), dtype=scores.dtype, device=scores.device)
            seg_max = seg_max.scatter_reduce(0, seq, scores.detach(), reduce="amax", include_self=True)
            exp = (scores - seg_max[seq]).exp()
            denom = torch.zeros(batch, dtype=scores.dtype, device=scores.device).index_add(0, seq, exp)
            scores = exp / denom[seq]
        out = torch.zeros(batch, history.shape[1], dtype=history.dtype, device=history.device)
        return out.index_add(0, seq, scores.unsqueeze(-1) * history)


def target_attention_padded_reference(
    arch: TargetAttentionArch, target: torch.Tensor, history: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """`arch`'s pooling computed on a padded [B, L, D] batch with a mask: the plain reference for tests."""
    lengths = offsets_to_lengths(offsets)
    max_len = max(int(lengths.max()) if lengths.numel() else 0, 1)
    padded = jagged_to_padded_dense(history, offsets, max_len)  # [B, L, D]
    valid = torch.arange(max_len)[None, :] < lengths[:, None]  # [B, L]
    scores = arch.unit(padded, target[:, None, :].expand_as(padded))  # [B, L]
    if arch.normalize == "softmax":
        scores = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=1)
        scores = torch.nan_to_num(scores, nan=0.0)  # empty sequences: all -inf
    scores = scores.masked_fill(~valid, 0.0)
    return (scores.unsqueeze(-1) * padded).sum(dim=1)


def context_arch(config: "BehaviourModelConfig", device: torch.device | None = None) -> PooledSparseArch | None:
    """Pooled lookups of the non-sequence (user, candidate, context) tables; None if there are none."""
    if not config.context_tables:
        return None
    return PooledSparseArch(EmbeddingBagCollection(tables=[t.to_torchrec() for t in config.context_tables], device=device))


class DIN(nn.Module):
    """DIN ranker: [pooled context, candidate, target-attention interest, dense, LUM] -> MLP -> logit.

    Example::

        >>> cfg = DINConfig(
        ...     sequence_tables=[TableConfig("t_item", 10, 4, ["item_id", "hist_item_id"])],
        ...     candidate_keys=["item_id"], history_keys=["hist_item_id"],
        ...     context_tables=[TableConfig("t_user", 5, 4, ["user_id"])], lum_dim=3, mlp=[8])
        >>> model = DIN(cfg)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     ["user_id", "item_id", "hist_item_id"], torch.tensor([1, 2, 7, 8, 3, 4, 5]), torch.tensor([1, 1, 1, 1, 3, 0]))
        >>> model(kjt, lum_features=torch.rand(2, 3)).shape
        torch.Size([2])
    """

    def __init__(self, config: DINConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.context_arch = context_arch(config, device)
        self.sequence_arch = SequenceArch(config, device=device)
        self.attention_arch = TargetAttentionArch(config.item_dim, config.attention_mlp, config.attention_normalize, device=device)
        in_features = config.context_dim + 2 * config.item_dim + config.dense_dim + config.lum_dim
        self.over_arch = LogitArch(in_features, config.mlp, device=device)

    @property
    def in_features(self) -> int:
        """Width of the MLP input."""
        return self.over_arch.in_features

    def forward(self, sparse_features: KeyedJaggedTensor, dense_features: Dense = None, lum_features: Dense = None) -> torch.Tensor:
        """Logits [B]."""
        cfg, batch = self.config, sparse_features.stride()
        with record_function("din"):
            candidate, history, offsets = self.sequence_arch(sparse_features)
            if cfg.max_history is not None:
                history, offsets = compact(history, offsets, keep_most_recent(offsets, cfg.max_history, history.shape[0]))
            parts = [] if self.context_arch is None else [self.context_arch(sparse_features)]
            parts += [candidate, self.attention_arch(candidate, history, offsets)]
            for x, width, name in ((dense_features, cfg.dense_dim, "dense features"), (lum_features, cfg.lum_dim, "LUM features")):
                part = dense_part(x, width, name, batch, "DIN")
                if part is not None:
                    parts.append(part)
            return self.over_arch(torch.cat(parts, dim=1))


class DINTrain(RankingTrain):
    """`RankingTrain` of a `DIN`: batch -> (BCE loss, logits)."""

    def __init__(self, model: DIN) -> None:
        super().__init__(model)


@register_ranker("din")
def build_din(parts: RankerParts, options: NoOptions) -> DIN:
    """The ranking job's DIN."""
    return DIN(DINConfig.from_parts(parts))
