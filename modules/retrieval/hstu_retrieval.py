"""HSTU as a retrieval model (the HSTU paper's public-data setting): jagged item sequences in, one state per token out.

    x_0 = dropout(sqrt(d) * E[item] + P[position])      E shared with the candidates (torchrec EBC)
    x_L = HSTUStack(x_0)                                  relative bias over positions and time gaps
    out = L2-normalise(x_L)                               (or LayerNorm / nothing)

Defaults and the two presets are the ML-1M settings of Meta's generative-recommenders
(configs/ml-1m/hstu-sampled-softmax-n128-final.gin and ...-large-final.gin, "frozen config,
validated on 04/11/2024", the runs behind the paper's ML-1M table):

    ========================  ======  ===========
    setting                   hstu    hstu-large
    ========================  ======  ===========
    item embedding dim         50      50
    layers (num_blocks)        2       8
    heads                      1       2
    dqk = dv (per head)        50      25
    linear dropout             0.2     0.2
    input dropout              0.2     0.2
    attention dropout          0       0
    max sequence length        200     200
    ========================  ======  ===========

and for both: sampled softmax over 128 uniformly sampled negatives (no in-batch negatives:
`sampling_strategy = "local"`), temperature 0.05, L2-normalised user and item embeddings
(eps 1e-6), AdamW lr 1e-3, betas (0.9, 0.98), weight decay 0, batch 128, 101 epochs; relative
attention bias on positions plus time gaps bucketed as floor(ln|dt| / 0.301) into 128 buckets
(i.e. log base e^0.301 = 1.351); absolute learned position embeddings at the input, as for SASRec.
The reference measures a token's time gaps from the *next* event's timestamp (the request time of
the prediction it makes; at evaluation the held-out target's), not from its own: that is
`time_gap_from="request"` here. The default "event" uses the token's own time, which needs no
knowledge of when the next request comes; with timestamps synthesised from event order (ML-1M as
shipped in ../shared/data has none) both reduce to a second position bias.
``ML1M_LOSS`` holds that loss setting.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.data.batches import JaggedBatch
from lumrec.data.tokens import ITEM
from lumrec.modules.layers.hstu import HSTUConfig, HSTUStack, stochastic_length_subsample
from lumrec.modules.ops import offsets_to_lengths, ranges_to_indices
from lumrec.modules.layers.losses import InfoNCEConfig
from lumrec.modules.retrieval.sasrec import ItemInputArch, OutputNorm, check_dropout, apply_output_norm
from lumrec.modules.retrieval.sequence_model import SequentialRecommender

__all__ = [
    "HSTU_PRESETS",
    "HSTURetrieval",
    "HSTURetrievalConfig",
    "ML1M_LOSS",
    "NormalInitLinear",
    "XavierUniformLinear",
    "hstu_preset",
    "next_event_timestamps",
    "reference_layer",
    "stochastic_length_batch",
    "subsample_batch",
]

# Time gaps are bucketed as floor(ln(1 + |dt|) / ln(base)); the reference uses ln|dt| / 0.301.
REFERENCE_TIME_BUCKET_BASE = math.exp(0.301)

# Where a query token's time gaps are measured from: its own event, or the next event (request time).
TIME_GAP_FROM = ("event", "request")

# The reference loss: 128 uniform negatives, no in-batch negatives, temperature 0.05, L2-normalised.
ML1M_LOSS = InfoNCEConfig(temperature=0.05, num_sampled_negatives=128, in_batch_negatives=False, l2_normalize=True)


def next_event_timestamps(timestamps: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each token's next token's timestamp within its segment; a segment's last token keeps its own.

    Example::

        >>> next_event_timestamps(torch.tensor([5, 7, 9, 1, 4]), torch.tensor([0, 3, 3, 5])).tolist()
        [7, 9, 9, 4, 4]
    """
    following = timestamps.clone()
    following[:-1] = timestamps[1:]
    ends = offsets[1:][offsets[1:] > offsets[:-1]] - 1
    following[ends] = timestamps[ends]
    return following


def reference_layer(**overrides) -> HSTUConfig:
    """The ML-1M `hstu` preset's layer: d 50, 1 head of 50, dropout 0.2, length 200, 128 time buckets of base e^0.301."""
    values = dict(
        d_model=50, num_heads=1, dqk=50, dv=50, dropout=0.2, max_len=200, num_time_buckets=128,
        time_bucket_base=REFERENCE_TIME_BUCKET_BASE,
    )
    values.update(overrides)
    return HSTUConfig(**values)


@dataclass
class HSTURetrievalConfig:
    """HSTU retrieval model: `num_layers` layers of `hstu` plus the input and output around them.

    Defaults = the ML-1M `hstu` preset (see the module docstring for sources). `hstu` is the
    layer config (``HSTUConfig``): its `d_model` is also the item-embedding width, its `max_len`
    the position-table size, its `dropout` the reference's linear dropout.
    `stochastic_length_alpha`: when set, `prepare_batch` subsamples long training sequences
    (Stochastic Length, keep ~max_len**(alpha/2) events); None = off (the ML-1M runs had it off).
    `time_gap_from`: "event" = a token's time gaps run from its own timestamp; "request" = from
    the next event's in its sequence (the reference's choice; the last token keeps its own).
    """

    hstu: HSTUConfig = field(default_factory=reference_layer)
    num_layers: int = 2
    input_dropout: float = 0.2
    use_position_embedding: bool = True
    scale_embeddings: bool = True
    output_norm: OutputNorm = "l2"
    stochastic_length_alpha: float | None = None
    time_gap_from: str = "event"

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"HSTURetrievalConfig: num_layers must be >= 1, got {self.num_layers}")
        if self.time_gap_from not in TIME_GAP_FROM:
            raise ValueError(
                f"HSTURetrievalConfig: time_gap_from must be one of {list(TIME_GAP_FROM)}, got {self.time_gap_from!r}"
            )
        check_dropout("HSTURetrievalConfig", "input_dropout", self.input_dropout)
        if self.stochastic_length_alpha is not None and not 0.0 < self.stochastic_length_alpha <= 2.0:
            raise ValueError(
                f"HSTURetrievalConfig: stochastic_length_alpha must be in (0, 2] or null, got {self.stochastic_length_alpha}"
            )


HSTU_PRESETS: dict[str, HSTURetrievalConfig] = {
    "hstu": HSTURetrievalConfig(),
    "hstu-large": HSTURetrievalConfig(hstu=reference_layer(num_heads=2, dqk=25, dv=25), num_layers=8),
}


def hstu_preset(name: str, hstu: Mapping[str, Any] | None = None, **overrides: Any) -> HSTURetrievalConfig:
    """The preset `name` ("hstu" or "hstu-large"), its layer fields replaced by `hstu`, its own by `overrides`.

    Example::

        >>> cfg = hstu_preset("hstu-large", hstu=dict(d_model=8, dqk=4, dv=4), num_layers=1)
        >>> cfg.hstu.num_heads, cfg.hstu.dqk, cfg.num_layers
        (2, 4, 1)
    """
    if name not in HSTU_PRESETS:
        raise KeyError(f"unknown HSTU preset {name!r}; known presets: {sorted(HSTU_PRESETS)}")
    preset = HSTU_PRESETS[name]
    return replace(preset, hstu=replace(preset.hstu, **(hstu or {})), **overrides)


def _take_kjt(kjt: KeyedJaggedTensor, token_index: torch.Tensor) -> KeyedJaggedTensor:
    """The KJT restricted to the tokens `token_index` (in that order), every key kept."""
    keys, values, weights = [], [], []
    lengths = []
    for key, jt in kjt.to_dict().items():
        offsets = jt.offsets()
        lens = offsets_to_lengths(offsets)[token_index]
        idx = ranges_to_indices(offsets[:-1][token_index], lens)
        keys.append(key)
        lengths.append(lens.to(torch.int32))
        values.append(jt.values()[idx])
        if jt.weights_or_none() is not None:
            weights.append(jt.weights()[idx])
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values) if values else kjt.values()[:0],
        lengths=torch.cat(lengths) if lengths else kjt.lengths()[:0],
        weights=torch.cat(weights) if weights else None,
        stride=int(token_index.numel()),
    )


def subsample_batch(batch: JaggedBatch, token_index: torch.Tensor, offsets: torch.Tensor) -> JaggedBatch:
    """The batch keeping only tokens `token_index` (ascending), with new segment `offsets` (no segment may vanish).

    Segments stay in their packed rows; positions restart at 0 in each shortened segment, so a
    subsampled history is seen as a shorter sequence (its timestamps keep the real gaps).
    """
    if offsets.numel() != batch.offsets.numel():
        raise ValueError(f"subsample_batch: {offsets.numel() - 1} segments given, the batch has {batch.num_segments}")
    lengths = offsets_to_lengths(offsets)
    if lengths.numel() and int(lengths.min()) < 1:
        raise ValueError("subsample_batch: every segment must keep at least one token")
    seg_start = torch.repeat_interleave(offsets[:-1], lengths, output_size=int(token_index.numel()))
    position = torch.arange(token_index.numel(), device=offsets.device) - seg_start

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[token_index]

    return JaggedBatch(
        offsets=offsets,
        row_offsets=offsets[batch.segment_offsets],
        segment_offsets=batch.segment_offsets,
        segment_ids=batch.segment_ids[token_index],
        token_type=batch.token_type[token_index],
        position=position,
        item_id=batch.item_id[token_index],
        kjt=_take_kjt(batch.kjt, token_index),
        user_ids=batch.user_ids,
        seq_index=batch.seq_index,
        token_index=batch.token_index[token_index],
        max_len=batch.max_len,
        ts=take(batch.ts),
        action=take(batch.action),
        dense=take(batch.dense),
    )


def stochastic_length_batch(
    batch: JaggedBatch, alpha: float, max_len: int, generator: torch.Generator | None = None
) -> JaggedBatch:
    """Stochastic Length (HSTU paper, Sec. 3.3) applied to a whole training batch, targets included."""
    index, offsets = stochastic_length_subsample(batch.offsets, batch.ts, alpha, max_len, generator)
    if index.numel() == batch.num_tokens:
        return batch
    return subsample_batch(batch, index, offsets)


class NormalInitLinear(nn.Linear):
    """nn.Linear with weight ~ N(0, 0.02) and zero bias: the reference init of HSTU's fused U/V/Q/K projection."""

    def reset_parameters(self) -> None:
        """N(0, 0.02) weight, zero bias."""
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class XavierUniformLinear(nn.Linear):
    """nn.Linear with a Xavier-uniform weight and zero bias: the reference init of HSTU's output projection."""

    def reset_parameters(self) -> None:
        """Xavier-uniform weight, zero bias."""
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _with_init(old: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    """A `cls` linear of `old`'s shape, bias and device (the init lives in the module, where DMP looks for it)."""
    return cls(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device)


class HSTURetrieval(SequentialRecommender):
    """HSTU retrieval model on jagged item sequences: `forward(batch) -> [T, d]`, `item_embeddings(ids) -> [n, d]`.

    Time bias from `batch.ts` when present; without timestamps every pair falls in time bucket 0,
    so the time bias reduces to one learned constant. Create on `device="meta"` and materialise
    with `to_empty` + `reset_parameters()`.

    Example::

        >>> import numpy as np, torch
        >>> from lumrec.data.batches import iter_packed_batches
        >>> from lumrec.data.sequences import UserSequences
        >>> from lumrec.data.tokens import TokenConfig, build_item_sequences
        >>> z = np.zeros(5, dtype=np.int64)
        >>> seqs = UserSequences(np.array([7, 8]), np.array([0, 3, 5]), np.array([1, 2, 3, 4, 5]),
        ...                      np.array([10, 20, 90, 5, 6]), z.astype(np.int32), z.astype(np.int32), z, z)
        >>> tokens = build_item_sequences(seqs, TokenConfig(item_features=["item_id"]))
        >>> batch = next(iter_packed_batches(tokens, max_len=8, rows_per_batch=4))
        >>> model = HSTURetrieval(hstu_preset("hstu", hstu=dict(d_model=8, dqk=4, dv=4, max_len=8)), num_items=6)
        >>> model(batch).shape
        torch.Size([5, 8])
    """

    predicts_from = ITEM

    def __init__(self, config: HSTURetrievalConfig, num_items: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self._num_items = num_items
        layer = config.hstu
        self.input = ItemInputArch(
            num_items,
            layer.d_model,
            layer.max_len,
            config.input_dropout,
            use_position_embedding=config.use_position_embedding,
            scale_embeddings=config.scale_embeddings,
            device=device,
        )
        # HSTULayer takes no device argument: build it under the device context (e.g. meta).
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.stack = HSTUStack(layer, config.num_layers)
            self.final_norm = nn.LayerNorm(layer.d_model, eps=1e-6) if config.output_norm == "layer_norm" else None
        # The reference's init: fused U/V/Q/K projection N(0, 0.02), output projection Xavier-uniform.
        for layer in self.stack.layers:
            layer.f1 = _with_init(layer.f1, NormalInitLinear)
            layer.f2 = _with_init(layer.f2, XavierUniformLinear)

    @property
    def num_items(self) -> int:
        """Size of the item vocabulary (ids 0..num_items-1, 0 = padding)."""
        return self._num_items

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (after `to_empty` from meta)."""
        self.input.reset_parameters()
        if self.final_norm is not None:
            self.final_norm.reset_parameters()
        for module in self.stack.modules():
            if module is not self.stack and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Candidate item vectors: rows of the same table that embeds the input tokens."""
        return self.input.item_embeddings(item_ids)

    def prepare_batch(self, batch: JaggedBatch, generator: torch.Generator | None = None) -> JaggedBatch:
        """The batch to train on: Stochastic Length applied in training mode when configured, else unchanged."""
        alpha = self.config.stochastic_length_alpha
        if not self.training or alpha is None:
            return batch
        return stochastic_length_batch(batch, alpha, self.config.hstu.max_len, generator)

    def forward(self, batch: JaggedBatch) -> torch.Tensor:
        """Hidden state `[T, d]` of every token; token t sees only earlier tokens of its own sequence."""
        with record_function("hstu_retrieval/input"):
            x = self.input(batch)
        timestamps = batch.ts
        if timestamps is None and self.config.hstu.use_time_bias:
            timestamps = torch.zeros_like(batch.position)
        query_timestamps = None
        if timestamps is not None and self.config.time_gap_from == "request":
            query_timestamps = next_event_timestamps(timestamps, batch.offsets)
        # Segment offsets as rows: attention inside a row is then exactly attention inside a sequence.
        x = self.stack(
            x, batch.offsets, timestamps=timestamps, positions=batch.position, query_timestamps=query_timestamps
        )
        return apply_output_norm(x, self.config.output_norm, self.final_norm)
