"""SIM (Search-based Interest Model, Pi et al., CIKM'20) with hard search, on jagged behaviour sequences.

    long branch:  keep the behaviours whose search key (e.g. category) equals the candidate's,
                  the `max_search_len` most recent of them -> DIN target attention
    short branch: the `short_len` most recent behaviours, whatever their category -> target attention
    logit = MLP([pooled context, candidate, long interest, short interest, dense, LUM features])

Hard search is a mask over the jagged history computed with prefix sums (no Python loop, no
padding); ``hard_search_mask`` is the whole of it and is tested against a per-sequence reference.

Registered as ranking backbone ``sim`` (``lumrec.modules.ranking.registry``) with ``SIMOptions``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.ranking.din import BehaviourModelConfig, SequenceArch, TargetAttentionArch, compact, context_arch, keep_most_recent
from lumrec.modules.ops import offsets_to_ids
from lumrec.modules.ranking.base import Dense, LogitArch, RankerParts, RankingTrain, dense_part, select_keys
from lumrec.modules.ranking.base import TableConfig  # noqa: F401  (the docstring example uses it)
from lumrec.modules.ranking.registry import register_ranker

__all__ = ["SIMOptions", "SIMConfig", "SIM", "SIMTrain", "build_sim", "hard_search_mask"]


@dataclass
class SIMOptions:
    """The ranking job's SIM keys (`sizes.backbones.sim`): SIMConfig's branch lengths."""

    max_search_len: int = 50  # most recent same-category behaviours (hard search)
    short_len: int = 10  # most recent behaviours of the short branch


@dataclass
class SIMConfig(BehaviourModelConfig):
    """SIM: `BehaviourModelConfig` plus the hard-search keys (raw ids compared for equality) and branch lengths."""

    search_candidate_key: str = "category_id"  # one id per sample
    search_history_key: str = "hist_category_id"  # one id per behaviour, same lengths as history_keys
    max_search_len: int = 50
    short_len: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_search_len", "short_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SIMConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.search_candidate_key == self.search_history_key:
            raise ValueError(f"SIMConfig: search_candidate_key and search_history_key are both {self.search_history_key!r}")


def hard_search_mask(candidate_values: torch.Tensor, history_values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bool [T]: behaviours whose value equals their sequence's candidate value, the `max_len` most recent per sequence.

    `candidate_values [B]`, `history_values [T]` jagged by `offsets [B+1]`, each sequence oldest first.

    Example::

        >>> hard_search_mask(torch.tensor([3, 5]), torch.tensor([3, 1, 3, 3, 5]), torch.tensor([0, 4, 5]), 2).tolist()
        [False, False, True, True, True]
    """
    total = history_values.numel()
    seq = offsets_to_ids(offsets, total)
    match = history_values == candidate_values[seq]
    # matches_before[k] = number of matches at flat positions < k; the matches at or after t in t's
    # sequence are matches_before[end of sequence] - matches_before[t].
    matches_before = torch.zeros(total + 1, dtype=torch.int64, device=history_values.device)
    matches_before[1:] = torch.cumsum(match.to(torch.int64), 0)
    from_end = matches_before[offsets[1:]][seq] - matches_before[:-1]
    return match & (from_end <= max_len)


class SIM(nn.Module):
    """SIM ranker with hard search (long branch) plus a recent-behaviour branch, both DIN target attention.

    Example::

        >>> cfg = SIMConfig(
        ...     sequence_tables=[TableConfig("t_item", 10, 4, ["item_id", "hist_item_id"]),
        ...                      TableConfig("t_cat", 4, 4, ["category_id", "hist_category_id"])],
        ...     candidate_keys=["item_id", "category_id"], history_keys=["hist_item_id", "hist_category_id"],
        ...     max_search_len=2, short_len=1, mlp=[8])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     ["item_id", "category_id", "hist_item_id", "hist_category_id"],
        ...     torch.tensor([1, 2, 1, 3, 5, 6, 7, 1, 3, 1]), torch.tensor([1, 1, 1, 1, 3, 0, 3, 0]))
        >>> SIM(cfg)(kjt).shape
        torch.Size([2])
    """

    def __init__(self, config: SIMConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.context_arch = context_arch(config, device)
        self.sequence_arch = SequenceArch(config, device=device)
        dim = config.item_dim
        self.long_attention = TargetAttentionArch(dim, config.attention_mlp, config.attention_normalize, device=device)
        self.short_attention = TargetAttentionArch(dim, config.attention_mlp, config.attention_normalize, device=device)
        in_features = config.context_dim + 3 * dim + config.dense_dim + config.lum_dim
        self.over_arch = LogitArch(in_features, config.mlp, device=device)

    @property
    def in_features(self) -> int:
        """Width of the MLP input."""
        return self.over_arch.in_features

    def search_keys(self, sparse_features: KeyedJaggedTensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw search ids: (candidate [B], history [T]) after checking their lengths."""
        cfg = self.config
        kjt = select_keys(sparse_features, [cfg.search_candidate_key, cfg.search_history_key], "SIM")
        cand, hist = kjt[cfg.search_candidate_key], kjt[cfg.search_history_key]
        checking = not torch.compiler.is_compiling()  # torch.export cannot branch on data (din.SequenceArch)
        if checking and bool((cand.lengths() != 1).any()):
            raise ValueError(f"SIM: search key {cfg.search_candidate_key!r} must have exactly one id per sample")
        if checking and not torch.equal(hist.offsets().to(offsets.dtype), offsets):
            raise ValueError(f"SIM: search key {cfg.search_history_key!r} must have the same lengths as {cfg.history_keys[0]!r}")
        return cand.values(), hist.values()

    def forward(self, sparse_features: KeyedJaggedTensor, dense_features: Dense = None, lum_features: Dense = None) -> torch.Tensor:
        """Logits [B]."""
        cfg, batch = self.config, sparse_features.stride()
        with record_function("sim"):
            candidate, history, offsets = self.sequence_arch(sparse_features)
            cand_key, hist_key = self.search_keys(sparse_features, offsets)
            with record_function("sim_hard_search"):
                long_h, long_off = compact(history, offsets, hard_search_mask(cand_key, hist_key, offsets, cfg.max_search_len))
                short_h, short_off = compact(history, offsets, keep_most_recent(offsets, cfg.short_len, history.shape[0]))
            parts = [] if self.context_arch is None else [self.context_arch(sparse_features)]
            parts += [
                candidate,
                self.long_attention(candidate, long_h, long_off),
                self.short_attention(candidate, short_h, short_off),
            ]
            for x, width, name in ((dense_features, cfg.dense_dim, "dense features"), (lum_features, cfg.lum_dim, "LUM features")):
                part = dense_part(x, width, name, batch, "SIM")
                if part is not None:
                    parts.append(part)
            return self.over_arch(torch.cat(parts, dim=1))


class SIMTrain(RankingTrain):
    """`RankingTrain` of a `SIM`: batch -> (BCE loss, logits)."""

    def __init__(self, model: SIM) -> None:
        super().__init__(model)


@register_ranker("sim", options=SIMOptions)
def build_sim(parts: RankerParts, options: SIMOptions) -> SIM:
    """The ranking job's SIM: hard search on the category of the candidate and of each behaviour."""
    if "hist_category_id" not in parts.history_keys:
        raise ValueError("model sim: hard search needs 'hist_category_id' in sizes.history_keys")
    return SIM(SIMConfig.from_parts(parts, **asdict(options)))
