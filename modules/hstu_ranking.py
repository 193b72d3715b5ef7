"""HSTU trained end to end for ranking (the generative baseline of the LUM paper's tables).

Per sample the jagged sequence is [history item tokens (oldest first), then the candidate token]:

    token_j    = W_in concat(item, category, ... embeddings of behaviour j)   tables shared with the candidate
    token_cand = W_in concat(the candidate's embeddings)
    states     = HSTUStack(tokens)      causal, relative bias over positions and time gaps (hist_ts, sample ts)
    logit      = MLP([pooled context, LayerNorm(state at the candidate), dense, LUM features])

The batch stays jagged (T + B tokens): the HSTU layers cut it into length buckets
(``lumrec.modules.attention.build_attention_layout``), so skewed histories never pad to B x Lmax x Lmax.
Causality makes the candidate the only token that sees the candidate; a history token sees only
earlier history. LUM / dense columns come last in the MLP input, so ``warm_start`` can widen it.

Timestamps travel in the sparse KJT under two extra keys (``with_timestamps``): `sample_ts` (one
per sample, the candidate's time) and `hist_ts` (aligned with the history keys). No embedding table
looks them up; they are only read when `use_time_bias` is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.din import BehaviourModelConfig, SequenceArch, compact, context_arch, keep_most_recent
from lumrec.modules.hstu import HSTUConfig, HSTUStack
from lumrec.modules.ops import lengths_to_offsets, offsets_to_ids, offsets_to_lengths
from lumrec.modules.ranking import Dense, LogitArch, RankingTrain, dense_part, select_keys
from lumrec.modules.ranking import TableConfig  # noqa: F401  (the docstring example uses it)

__all__ = [
    "HIST_TS_KEY",
    "SAMPLE_TS_KEY",
    "HSTURankerConfig",
    "HSTURanker",
    "HSTURankerTrain",
    "append_candidates",
    "timestamps_kjt",
    "with_timestamps",
]

HIST_TS_KEY = "hist_ts"  # KJT key: each behaviour's unix time, same lengths as the history keys
SAMPLE_TS_KEY = "sample_ts"  # KJT key: the sample's (candidate's) unix time, one per sample


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
    """`sparse_features` with the `sample_ts` / `hist_ts` keys appended (what `HSTURanker` reads for its time bias)."""
    return KeyedJaggedTensor.concat([sparse_features, timestamps_kjt(sample_ts, hist_ts, hist_lengths)])


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
class HSTURankerConfig(BehaviourModelConfig):
    """HSTU ranker: `BehaviourModelConfig` tables/keys (its `attention_mlp` / `attention_normalize` are unused) plus the stack.

    `d_model` None: the concatenated item vector's width (`item_dim`); `dqk` / `dv` None: `d_model // num_heads`.
    `max_len`: span of the relative position bias (positions further apart share its last entry) and,
    with `normaliser` None, HSTU's `n`. `max_history`: most recent behaviours kept (None: all).
    """

    num_layers: int = 2
    num_heads: int = 2
    d_model: int | None = None
    dqk: int | None = None
    dv: int | None = None
    dropout: float = 0.0
    max_len: int = 256
    use_position_bias: bool = True
    use_time_bias: bool = True
    num_time_buckets: int = 64
    time_bucket_base: float = 2.0
    normaliser: float | str | None = None
    max_history: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"HSTURankerConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_history is not None and self.max_history < 1:
            raise ValueError(f"HSTURankerConfig: max_history must be >= 1 or None, got {self.max_history}")
        self.layer_config()  # validates d_model, dqk, dv, dropout, max_len, buckets, normaliser

    @property
    def model_dim(self) -> int:
        """Width of the HSTU tokens."""
        return self.d_model if self.d_model is not None else self.item_dim

    def layer_config(self) -> HSTUConfig:
        """The per-layer `HSTUConfig` of the stack."""
        head_dim = max(self.model_dim // self.num_heads, 1)
        return HSTUConfig(
            d_model=self.model_dim,
            num_heads=self.num_heads,
            dqk=self.dqk if self.dqk is not None else head_dim,
            dv=self.dv if self.dv is not None else head_dim,
            dropout=self.dropout,
            max_len=self.max_len,
            num_time_buckets=self.num_time_buckets,
            use_time_bias=self.use_time_bias,
            use_position_bias=self.use_position_bias,
            normaliser=self.normaliser,
            time_bucket_base=self.time_bucket_base,
        )


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
        self.input_dropout = nn.Dropout(config.dropout)
        self.stack = HSTUStack(config.layer_config(), config.num_layers)
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
        if not self.config.use_time_bias:
            return None
        if SAMPLE_TS_KEY not in sparse_features.keys() or HIST_TS_KEY not in sparse_features.keys():
            raise ValueError(
                f"HSTURanker: use_time_bias needs KJT keys {SAMPLE_TS_KEY!r} and {HIST_TS_KEY!r} "
                f"(add them with lumrec.modules.hstu_ranking.with_timestamps); keys: {sparse_features.keys()}"
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
