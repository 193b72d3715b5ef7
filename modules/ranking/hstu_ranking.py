"""HSTU trained end to end for ranking (the generative baseline of the LUM paper's tables).

Per sample the jagged sequence is [history item tokens (oldest first), then the candidate token]:

    token_j    = W_in concat(item, category, ... embeddings of behaviour j)   tables shared with the candidate
    token_cand = W_in concat(the candidate's embeddings)
    states     = HSTUStack(tokens)      causal, relative bias over positions and time gaps (hist_ts, sample ts)
    logit      = MLP([pooled context, LayerNorm(state at the candidate), dense, LUM features])

The batch stays jagged (T + B tokens): the HSTU layers cut it into length buckets
(``lumrec.modules.ops.build_attention_layout``), so skewed histories never pad to B x Lmax x Lmax.
Causality makes the candidate the only token that sees the candidate; a history token sees only
earlier history. LUM / dense columns come last in the MLP input, so ``warm_start`` can widen it.

Timestamps travel in the sparse KJT under two extra keys (``lumrec.modules.ranking.base.with_timestamps``):
`sample_ts` (one per sample, the candidate's time) and `hist_ts` (aligned with the history keys). No
embedding table looks them up; they are only read when the layers' `use_time_bias` is on.

Registered as ranking backbone ``hstu`` (``lumrec.modules.ranking.registry``) with
``HSTURankerOptions``: `sizes.backbones.hstu: {num_layers: 2, hstu: {num_heads: 2, max_len: 256}}`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.config import check_at_least
from lumrec.modules.ranking.din import BehaviourModelConfig, SequenceArch, compact, context_arch, keep_most_recent
from lumrec.modules.layers.hstu import HSTUConfig, HSTUStack
from lumrec.modules.ops import lengths_to_offsets, offsets_to_ids, offsets_to_lengths
from lumrec.modules.ranking.base import (
    HIST_TS_KEY,
    SAMPLE_TS_KEY,
    Dense,
    LogitArch,
    RankerParts,
    RankingTrain,
    dense_part,
    select_keys,
    with_timestamps,
)
from lumrec.modules.ranking.base import TableConfig  # noqa: F401  (the docstring example uses it)
from lumrec.modules.ranking.registry import register_ranker

__all__ = [
    "HSTURankerOptions",
    "HSTURankerConfig",
    "HSTURanker",
    "HSTURankerTrain",
    "append_candidates",
    "build_hstu_ranker",
    "ranker_layer_config",
]

_LAYER_KEYS = [f.name for f in fields(HSTUConfig)]


def _check_layer_keys(keys: Any) -> None:
    unknown = sorted(set(keys) - set(_LAYER_KEYS))
    if unknown:
        raise ValueError(f"hstu: unknown HSTUConfig key(s) {unknown}; valid keys: {_LAYER_KEYS}")


def ranker_layer_config(item_dim: int, given: HSTUConfig | Mapping[str, Any] | None = None) -> HSTUConfig:
    """The ranker's per-layer `HSTUConfig`: `given` as is, or its keys (a mapping, None: none) over derived defaults.

    Derived: `d_model` the concatenated item vector's width `item_dim`, `dqk` = `dv` = `d_model // num_heads`;
    the other keys default to `HSTUConfig`'s. An unknown key is an error naming it.

    Example::

        >>> cfg = ranker_layer_config(8, {"num_heads": 4, "max_len": 21})
        >>> cfg.d_model, cfg.dqk, cfg.dv, cfg.max_len
        (8, 2, 2, 21)
    """
    if isinstance(given, HSTUConfig):
        return given
    values = dict(given or {})
    _check_layer_keys(values)
    d_model = values.setdefault("d_model", item_dim)
    heads = values.get("num_heads", HSTUConfig.num_heads)
    head_dim = max(d_model // heads, 1) if heads >= 1 else 1  # heads < 1: HSTUConfig names the key
    values.setdefault("dqk", head_dim)
    values.setdefault("dv", head_dim)
    return HSTUConfig(**values)

def append_candidates(
    history: torch.Tensor, candidates: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jagged [history_b, candidate_b] per sample: (values [T+B, ...], offsets [B+1], candidate index [B]).

    Example::

        >>> values, offsets, cand = append_candidates(torch.tensor([1, 2, 3]), torch.tensor([10, 20]), torch.tensor([0, 0, 3]))
        >>> values.tolist(), offsets.tolist(), cand.tolist()
        ([10, 1, 2, 3, 20], [0, 1, 5], [0, 4])
    """
    total, batch = history.shape[0], candidates.shape[0]
    if offsets.numel() != batch + 1 or int(offsets[-1]) != total:
        raise ValueError(f"append_candidates: offsets {tuple(offsets.shape)} do not describe {total} behaviours of {batch} samples")
    new_offsets = lengths_to_offsets(offsets_to_lengths(offsets) + 1)
    cand_index = new_offsets[1:] - 1
    # Behaviour t of sample b moves right by b: every earlier sample gained one (candidate) token.
    hist_index = torch.arange(total, device=offsets.device) + offsets_to_ids(offsets, total)
    source = torch.empty(total + batch, dtype=torch.int64, device=offsets.device)
    source[hist_index] = torch.arange(total, device=offsets.device)
    source[cand_index] = total + torch.arange(batch, device=offsets.device)
    return torch.cat([history, candidates])[source], new_offsets, cand_index


@dataclass
class HSTURankerOptions:
    """The ranking job's HSTU keys (`sizes.backbones.hstu`): the stack's depth and its layers' `HSTUConfig` keys.

    `hstu`: some of `HSTUConfig`'s keys; the rest are derived as in `ranker_layer_config`.
    """

    num_layers: int = 2
    hstu: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_layers")
        _check_layer_keys(self.hstu)  # when the config is read, not when the model is built


@dataclass
class HSTURankerConfig(BehaviourModelConfig):
    """HSTU ranker: `BehaviourModelConfig` tables/keys (its `attention_mlp` / `attention_normalize` are unused) plus the stack.

    `hstu`: the per-layer `HSTUConfig`, or some of its keys (a mapping, or None for none) over
    derived defaults (`ranker_layer_config`: `d_model` the item vector's width, `dqk` / `dv`
    `d_model // num_heads`); after construction it is an `HSTUConfig`. Its `max_len` is the span
    of the relative position bias (positions further apart share its last entry) and, with
    `normaliser` None, HSTU's `n`. `max_history`: most recent behaviours kept (None: all).
    """

    num_layers: int = 2
    hstu: HSTUConfig | Mapping[str, Any] | None = None
    max_history: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_layers < 1:
            raise ValueError(f"HSTURankerConfig: num_layers must be >= 1, got {self.num_layers}")
        if self.max_history is not None and self.max_history < 1:
            raise ValueError(f"HSTURankerConfig: max_history must be >= 1 or None, got {self.max_history}")
        self.hstu = ranker_layer_config(self.item_dim, self.hstu)  # validates d_model, dqk, dv, dropout, max_len, ...

    @property
    def model_dim(self) -> int:
        """Width of the HSTU tokens."""
        return self.hstu.d_model


class HSTURanker(nn.Module):
    """HSTU ranker: causal HSTU over [history, candidate]; the candidate's state ++ context ++ dense ++ LUM -> MLP -> logit.

    Example::

        >>> cfg = HSTURankerConfig(
        ...     sequence_tables=[TableConfig("t_item", 10, 4, ["item_id", "hist_item_id"])],
        ...     candidate_keys=["item_id"], history_keys=["hist_item_id"],
        ...     context_tables=[TableConfig("t_user", 5, 4, ["user_id"])], lum_dim=3, mlp=[8])
        >>> model = HSTURanker(cfg)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     ["user_id", "item_id", "hist_item_id"], torch.tensor([1, 2, 7, 8, 3, 4, 5]), torch.tensor([1, 1, 1, 1, 3, 0]))
        >>> kjt = with_timestamps(kjt, torch.tensor([100, 50]), torch.tensor([10, 20, 30]), torch.tensor([3, 0]))
        >>> model(kjt, lum_features=torch.rand(2, 3)).shape
        torch.Size([2])
    """

    def __init__(self, config: HSTURankerConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.model_dim
        self.context_arch = context_arch(config, device)
        self.sequence_arch = SequenceArch(config, device=device)
        self.input_proj = nn.Linear(config.item_dim, d, device=device)
        self.input_dropout = nn.Dropout(config.hstu.dropout)
        self.stack = HSTUStack(config.hstu, config.num_layers)
        if device is not None:
            self.stack.to(device)
        self.output_norm = nn.LayerNorm(d, device=device)
        in_features = config.context_dim + d + config.dense_dim + config.lum_dim
        self.over_arch = LogitArch(in_features, config.mlp, device=device)

    @property
    def in_features(self) -> int:
        """Width of the MLP input."""
        return self.over_arch.in_features

    def _timestamps(self, sparse_features: KeyedJaggedTensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sample times [B], behaviour times [T]) from the KJT, or None when the time bias is off."""
        if not self.config.hstu.use_time_bias:
            return None
        if SAMPLE_TS_KEY not in sparse_features.keys() or HIST_TS_KEY not in sparse_features.keys():
            raise ValueError(
                f"HSTURanker: use_time_bias needs KJT keys {SAMPLE_TS_KEY!r} and {HIST_TS_KEY!r} "
                f"(add them with lumrec.modules.ranking.hstu_ranking.with_timestamps); keys: {sparse_features.keys()}"
            )
        kjt = select_keys(sparse_features, [SAMPLE_TS_KEY, HIST_TS_KEY], "HSTURanker")
        sample, hist = kjt[SAMPLE_TS_KEY], kjt[HIST_TS_KEY]
        if bool((sample.lengths() != 1).any()):
            raise ValueError(f"HSTURanker: key {SAMPLE_TS_KEY!r} must have exactly one time per sample")
        if not torch.equal(hist.offsets().to(offsets.dtype), offsets):
            raise ValueError(f"HSTURanker: key {HIST_TS_KEY!r} must have the same lengths as {self.config.history_keys[0]!r}")
        return sample.values(), hist.values()

    def encode(self, sparse_features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HSTU states of every token: (states [T+B, d_model], offsets [B+1], candidate index [B])."""
        cfg = self.config
        candidate, history, offsets = self.sequence_arch(sparse_features)
        times = self._timestamps(sparse_features, offsets)
        if cfg.max_history is not None:
            keep = keep_most_recent(offsets, cfg.max_history)
            history, new_offsets = compact(history, offsets, keep)
            times = None if times is None else (times[0], times[1][keep])
            offsets = new_offsets
        tokens = self.input_dropout(self.input_proj(torch.cat([history, candidate])))
        total = history.shape[0]
        x, seq_offsets, cand_index = append_candidates(tokens[:total], tokens[total:], offsets)
        timestamps = None if times is None else append_candidates(times[1], times[0], offsets)[0]
        return self.stack(x, seq_offsets, timestamps=timestamps), seq_offsets, cand_index

    def forward(self, sparse_features: KeyedJaggedTensor, dense_features: Dense = None, lum_features: Dense = None) -> torch.Tensor:
        """Logits [B]."""
        cfg, batch = self.config, sparse_features.stride()
        with record_function("hstu_ranker"):
            states, _, cand_index = self.encode(sparse_features)
            parts = [] if self.context_arch is None else [self.context_arch(sparse_features)]
            parts.append(self.output_norm(states[cand_index]))
            for x, width, name in ((dense_features, cfg.dense_dim, "dense features"), (lum_features, cfg.lum_dim, "LUM features")):
                part = dense_part(x, width, name, batch, "HSTURanker")
                if part is not None:
                    parts.append(part)
            return self.over_arch(torch.cat(parts, dim=1))


class HSTURankerTrain(RankingTrain):
    """`RankingTrain` of an `HSTURanker`: batch -> (BCE loss, logits)."""

    def __init__(self, model: HSTURanker) -> None:
        super().__init__(model)


@register_ranker("hstu", options=HSTURankerOptions, timestamps=True)
def build_hstu_ranker(parts: RankerParts, options: HSTURankerOptions) -> HSTURanker:
    """The ranking job's HSTU ranker (its time bias reads the times `with_timestamps` adds)."""
    return HSTURanker(HSTURankerConfig.from_parts(parts, **asdict(options)))
