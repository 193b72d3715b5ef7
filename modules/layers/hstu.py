"""HSTU (Hierarchical Sequential Transduction Unit) layers on jagged sequences, and Stochastic Length.

Per layer, following "Actions Speak Louder than Words" (Zhai et al., 2024):
    U, V, Q, K = split(silu(f1(LayerNorm(X))))
    A V        = (silu(Q K^T + rab(pos, time)) / n) V      under the causal (and segment) mask
    Y          = X + f2(dropout(LayerNorm(A V) * U))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from lumrec.modules.ops import (
    JaggedAttentionLayout,
    Kernel,
    build_attention_layout,
    current_kernel,
    jagged_causal_attention,
    lengths_to_offsets,
    offsets_to_ids,
    offsets_to_lengths,
)
from lumrec.modules.ops.triton.segments import TritonSegments, build_triton_segments
from lumrec.modules.layers.relative_bias import RelativeAttentionBias

__all__ = ["HSTUAttentionConfig", "HSTUConfig", "HSTULayer", "HSTUStack", "stochastic_length_subsample"]


@dataclass
class HSTUAttentionConfig:
    """HSTU's attention options, apart from the layer's shape: per-head widths, relative bias, normaliser.

    A model whose own sizes (d_model, heads, dropout, max_len) also shape its HSTU layers, as
    LUM's do, nests this part and builds the layer with `HSTUConfig.with_shape`.

    `dqk` / `dv`: per-head widths of q/k and v; None: `d_model // num_heads` (at least 1).
    `normaliser`: the `n` dividing `silu(QK^T + rab)`; None means `max_len` (the paper's N),
    "length" each segment's own length, a number that constant.

    Example::

        >>> HSTUConfig.with_shape(HSTUAttentionConfig(normaliser="length"), d_model=12, num_heads=3, dropout=0.0,
        ...                       max_len=8).dqk
        4
    """

    dqk: int | None = None
    dv: int | None = None
    num_time_buckets: int = 64
    use_time_bias: bool = True
    use_position_bias: bool = True
    normaliser: float | str | None = None
    time_bucket_base: float = 2.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("dqk", "dv", "num_time_buckets"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
        if isinstance(self.normaliser, str) and self.normaliser != "length":
            raise ValueError(f"{owner}: normaliser must be null, 'length' or a number, got {self.normaliser!r}")
        if isinstance(self.normaliser, (int, float)) and self.normaliser <= 0:
            raise ValueError(f"{owner}: normaliser must be positive, got {self.normaliser}")


@dataclass
class HSTUConfig(HSTUAttentionConfig):
    """Sizes and options of one HSTU layer: its shape plus the `HSTUAttentionConfig` fields.

    Example::

        >>> cfg = HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=16)
        >>> cfg.f1_out_dim, cfg.resolved_normaliser
        (32, 16.0)
        >>> HSTUConfig(d_model=8, num_heads=2).dqk              # None: d_model // num_heads
        4
    """

    d_model: int = 64
    num_heads: int = 2
    dropout: float = 0.0
    max_len: int = 256

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"HSTUConfig: {name} must be >= 1, got {getattr(self, name)}")
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HSTUConfig: dropout must be in [0, 1), got {self.dropout}")
        per_head = max(self.d_model // self.num_heads, 1)
        self.dqk = per_head if self.dqk is None else self.dqk
        self.dv = per_head if self.dv is None else self.dv

    @classmethod
    def with_shape(
        cls, attention: HSTUAttentionConfig, *, d_model: int, num_heads: int, dropout: float, max_len: int
    ) -> HSTUConfig:
        """The layer config of `attention`'s options at a host model's shape."""
        options = {f.name: getattr(attention, f.name) for f in fields(HSTUAttentionConfig)}
        return cls(d_model=d_model, num_heads=num_heads, dropout=dropout, max_len=max_len, **options)

    @property
    def f1_out_dim(self) -> int:
        """Width of the fused projection: U and V (heads*dv each), Q and K (heads*dqk each)."""
        return self.num_heads * (2 * self.dv + 2 * self.dqk)

    @property
    def resolved_normaliser(self) -> float | str:
        """The normaliser handed to the attention: a float or "length"."""
        if self.normaliser is None:
            return float(self.max_len)
        return self.normaliser if isinstance(self.normaliser, str) else float(self.normaliser)


def _build_layout(
    offsets: torch.Tensor, num_tokens: int, max_len: int, **tokens: torch.Tensor | None
) -> JaggedAttentionLayout | TritonSegments:
    """The attention layout of a batch: device-built segments under ``Kernel.TRITON``, length buckets otherwise."""
    if current_kernel() is Kernel.TRITON:
        return build_triton_segments(offsets, num_tokens=num_tokens, max_len=max_len, **tokens)
    return build_attention_layout(offsets, **tokens)


class HSTULayer(nn.Module):
    """One HSTU layer on jagged `x [T, d_model]`; returns `[T, d_model]` (residual included).

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = HSTULayer(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=16))
        >>> x = torch.randn(5, 8)                      # two sequences: 3 and 2 events
        >>> offsets = torch.tensor([0, 3, 5])
        >>> timestamps = torch.tensor([10, 20, 40, 5, 9])
        >>> layer(x, offsets, timestamps=timestamps).shape
        torch.Size([5, 8])
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        heads = config.num_heads
        self.input_norm = nn.LayerNorm(config.d_model)
        self.f1 = nn.Linear(config.d_model, config.f1_out_dim)
        self.attn_norm = nn.LayerNorm(heads * config.dv)
        self.dropout = nn.Dropout(config.dropout)
        self.f2 = nn.Linear(heads * config.dv, config.d_model)
        self.relative_bias = (
            RelativeAttentionBias(
                max_len=config.max_len,
                num_time_buckets=config.num_time_buckets,
                time_bucket_base=config.time_bucket_base,
                num_heads=1,
                use_position_bias=config.use_position_bias,
                use_time_bias=config.use_time_bias,
            )
            if config.use_position_bias or config.use_time_bias
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor | None = None,
        *,
        layout: JaggedAttentionLayout | TritonSegments | None = None,
        segment_ids: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        query_flags: torch.Tensor | None = None,
        query_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the layer; pass `layout` (from `build_attention_layout`) to skip rebuilding it.

        Under ``Kernel.TRITON`` the layout built here is ``TritonSegments`` (on the device, nothing
        read on the host: the layer compiles and exports), bounded by the config's max_len.
        """
        cfg = self.config
        if x.dim() != 2 or x.shape[1] != cfg.d_model:
            raise ValueError(f"HSTULayer: x must be [T, {cfg.d_model}], got {tuple(x.shape)}")
        if layout is None:
            if offsets is None:
                raise ValueError("HSTULayer: give offsets or a prebuilt layout")
            layout = _build_layout(
                offsets, x.shape[0], cfg.max_len, segment_ids=segment_ids, query_flags=query_flags,
                positions=positions, timestamps=timestamps, query_timestamps=query_timestamps,
            )
        elif any(t is not None for t in (offsets, segment_ids, timestamps, positions, query_flags, query_timestamps)):
            raise ValueError("HSTULayer: with a prebuilt layout, give offsets/segments/timestamps to the layout only")
        if isinstance(layout, TritonSegments):
            if cfg.use_time_bias and layout.timestamps is None:
                raise ValueError("HSTULayer: use_time_bias is on but no timestamps were given")
        elif cfg.use_time_bias and layout.num_tokens > 0 and layout.buckets[0].timestamps is None:
            raise ValueError("HSTULayer: use_time_bias is on but no timestamps were given")
        num_tokens, heads = x.shape[0], cfg.num_heads
        with record_function("hstu/uvqk"):
            uvqk = F.silu(self.f1(self.input_norm(x)))
            u, v, q, k = torch.split(
                uvqk, [heads * cfg.dv, heads * cfg.dv, heads * cfg.dqk, heads * cfg.dqk], dim=-1
            )
        with record_function("hstu/attention"):
            attn = jagged_causal_attention(
                q.reshape(num_tokens, heads, cfg.dqk),
                k.reshape(num_tokens, heads, cfg.dqk),
                v.reshape(num_tokens, heads, cfg.dv),
                kind="hstu",
                layout=layout,
                relative_bias=self.relative_bias,
                normaliser=cfg.resolved_normaliser,
            )
        with record_function("hstu/output"):
            gated = self.attn_norm(attn.reshape(num_tokens, heads * cfg.dv)) * u
            return x + self.f2(self.dropout(gated))


class HSTUStack(nn.Module):
    """`num_layers` HSTU layers over jagged `(x [T, d_model], offsets)`, sharing one attention layout.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> stack = HSTUStack(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=16), num_layers=2)
        >>> x = torch.randn(6, 8)
        >>> offsets = torch.tensor([0, 4, 6])            # row 0 packs two users: segments 0 and 1
        >>> segment_ids = torch.tensor([0, 0, 1, 1, 0, 0])
        >>> timestamps = torch.tensor([1, 2, 1, 3, 7, 8])
        >>> stack(x, offsets, segment_ids=segment_ids, timestamps=timestamps).shape
        torch.Size([6, 8])
    """

    def __init__(self, config: HSTUConfig, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"HSTUStack: num_layers must be >= 1, got {num_layers}")
        self.config = config
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(num_layers))
        # True: in training each layer's activations are recomputed in the backward instead of kept
        # (memory per token ~ one d_model vector per layer; gradients identical). Set by `train.activation_checkpointing`.
        self.activation_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        query_flags: torch.Tensor | None = None,
        query_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run all layers; the segment/bucket layout is built once for the whole stack.

        Under ``Kernel.TRITON`` that layout is ``TritonSegments``, built on the device with the
        config's max_len as the bound on segment lengths: no tensor value is read on the host, so
        the stack compiles (torch.compile, fullgraph) and exports (torch.export, dynamic tokens).
        """
        layout = _build_layout(
            offsets, x.shape[0], self.config.max_len, segment_ids=segment_ids, query_flags=query_flags,
            positions=positions, timestamps=timestamps, query_timestamps=query_timestamps,
        )
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            with record_function(f"hstu/layer_{i}"):
                # Non-reentrant checkpointing restores the RNG state, so dropout masks match the kept-activation run.
                x = checkpoint(layer, x, layout=layout, use_reentrant=False) if recompute else layer(x, layout=layout)
        return x


def stochastic_length_subsample(
    offsets: torch.Tensor,
    timestamps: torch.Tensor | None,
    alpha: float,
    max_len: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Length (HSTU paper, Sec. 3.3): pick, for training, which events of each history to keep.

    With `L = floor(max_len ** (alpha / 2))`, a sequence of length `n`:
    - `n <= L`: kept whole;
    - `n > L`: kept whole with probability `max_len**alpha / n**2`, otherwise replaced by
      `L` of its events drawn uniformly without replacement, in their original order.
    This bounds the expected attention cost by O(max_len**alpha) per sequence.
    Returns `(indices, new_offsets)`: ascending token indices into the input, so events are
    never reordered, and the offsets of the subsampled batch. `timestamps`, when given,
    must be non-decreasing inside each sequence (checked), so index order is time order.
    Deterministic for a given `generator` state.
    """
    if not 0.0 < alpha <= 2.0:
        raise ValueError(f"stochastic_length_subsample: alpha must be in (0, 2], got {alpha}")
    if max_len < 1:
        raise ValueError(f"stochastic_length_subsample: max_len must be >= 1, got {max_len}")
    with record_function("hstu/stochastic_length"):
        offsets = offsets.to(torch.int64)
        lengths = offsets_to_lengths(offsets)
        num_tokens = int(offsets[-1])
        seq_ids = offsets_to_ids(offsets, num_tokens)
        if timestamps is not None:
            if timestamps.shape != (num_tokens,):
                raise ValueError(
                    f"stochastic_length_subsample: timestamps must be [{num_tokens}], got {tuple(timestamps.shape)}"
                )
            same_seq = seq_ids[1:] == seq_ids[:-1]
            backwards = int((same_seq & (timestamps[1:] < timestamps[:-1])).sum())
            if backwards:
                raise ValueError(
                    f"stochastic_length_subsample: timestamps decrease inside a sequence at {backwards} place(s)"
                )
        keep_len = int(math.floor(max_len ** (alpha / 2.0) + 1e-9))
        keep_len = max(keep_len, 1)
        # Both draws have a fixed size given the batch, so results depend only on the generator.
        coin = torch.rand(lengths.numel(), generator=generator, dtype=torch.float64, device=offsets.device)
        keys = torch.rand(num_tokens, generator=generator, dtype=torch.float64, device=offsets.device)
        lengths_f = lengths.to(torch.float64).clamp(min=1.0)
        keep_whole_prob = (float(max_len) ** alpha / lengths_f**2).clamp(max=1.0)
        subsample = (lengths > keep_len) & (coin >= keep_whole_prob)

        # Rank each token's random key inside its sequence: sort by (sequence, key).
        order = torch.argsort(seq_ids.to(torch.float64) + keys)
        rank = torch.empty(num_tokens, dtype=torch.int64, device=offsets.device)
        rank[order] = torch.arange(num_tokens, device=offsets.device) - offsets[:-1][seq_ids[order]]
        selected = ~subsample[seq_ids] | (rank < keep_len)
        indices = torch.nonzero(selected).flatten()
        new_lengths = torch.where(subsample, torch.full_like(lengths, keep_len), lengths)
        return indices, lengths_to_offsets(new_lengths)
