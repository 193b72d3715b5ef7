"""Relative attention bias of HSTU: learned biases over relative position and log-bucketed time gaps.

The tables are read through ``lumrec.modules.ops.gather_columns`` (a fast-gradient gather with
its reference beside it); the attention ops take this module as their ``relative_bias``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lumrec.modules.ops import gather_columns


def time_gap_buckets(gaps: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """Map time gaps to `floor(log(|gap| + 1) / log(base))`, clipped to `[0, num_buckets]`."""
    # float64: int64 epoch seconds lose precision in float32 and would move bucket edges.
    magnitude = gaps.abs().to(torch.float64)
    # The epsilon puts exact powers of `base` (e.g. gap 3 in base 2) on the upper bucket despite rounding.
    buckets = torch.floor(torch.log1p(magnitude) / math.log(base) + 1e-9)
    return buckets.clamp(0, num_buckets).to(torch.int64)


class RelativeAttentionBias(nn.Module):
    """Sum of a learned bias over relative position `i - j` (clipped to ±(max_len-1)) and one over
    log-bucketed time gaps `|t_i - t_j|` (clipped to `num_time_buckets`).

    Called on padded blocks `positions [N, L]`, `timestamps [N, L]` it returns the bias of every
    pair in each block, `[N, num_heads, L, L]` (`num_heads=1` broadcasts over attention heads).

    Example::

        >>> import torch
        >>> rab = RelativeAttentionBias(max_len=8, num_time_buckets=4, num_heads=1)
        >>> positions = torch.tensor([[0, 1, 2]])
        >>> timestamps = torch.tensor([[100, 101, 160]])
        >>> rab(positions, timestamps).shape
        torch.Size([1, 1, 3, 3])
        >>> bool(rab(positions, timestamps)[0, 0, 2, 1] == rab.position_weight[0, 8] + rab.time_weight[0, 4])
        True
    """

    def __init__(
        self,
        max_len: int,
        num_time_buckets: int = 64,
        time_bucket_base: float = 2.0,
        num_heads: int = 1,
        use_position_bias: bool = True,
        use_time_bias: bool = True,
    ) -> None:
        super().__init__()
        if max_len < 1 or num_time_buckets < 1 or num_heads < 1:
            raise ValueError(
                f"RelativeAttentionBias: max_len ({max_len}), num_time_buckets ({num_time_buckets}) "
                f"and num_heads ({num_heads}) must be >= 1"
            )
        if time_bucket_base <= 1.0:
            raise ValueError(f"RelativeAttentionBias: time_bucket_base must be > 1, got {time_bucket_base}")
        self.max_len = max_len
        self.num_time_buckets = num_time_buckets
        self.time_bucket_base = time_bucket_base
        self.num_heads = num_heads
        self.use_position_bias = use_position_bias
        self.use_time_bias = use_time_bias
        # Tables are [heads, entries] so that one gather yields head-major biases.
        self.position_weight = nn.Parameter(torch.empty(num_heads, 2 * max_len - 1)) if use_position_bias else None
        self.time_weight = nn.Parameter(torch.empty(num_heads, num_time_buckets + 1)) if use_time_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random init so that the bias starts near zero but carries gradient signal."""
        for weight in (self.position_weight, self.time_weight):
            if weight is not None:
                nn.init.normal_(weight, std=0.02)

    def index_key(self) -> tuple:
        """Identifies the pair indices this module needs; equal keys mean shareable indices."""
        return (self.max_len, self.num_time_buckets, self.time_bucket_base, self.use_position_bias, self.use_time_bias)

    def pair_indices(
        self,
        positions: torch.Tensor | None,
        timestamps: torch.Tensor | None,
        query_timestamps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Table rows for every pair of padded blocks `[N, L]`: (clipped relative position, time bucket).

        The time gap of pair (i, j) is `query_timestamps[i] - timestamps[j]`; `query_timestamps`
        defaults to `timestamps` (the query token's own time).
        """
        pos_index = time_index = None
        if self.position_weight is not None:
            if positions is None:
                raise ValueError("RelativeAttentionBias: use_position_bias is on but positions is None")
            rel = positions[:, :, None] - positions[:, None, :]
            pos_index = rel.clamp(-(self.max_len - 1), self.max_len - 1) + (self.max_len - 1)
        if self.time_weight is not None:
            if timestamps is None:
                raise ValueError("RelativeAttentionBias: use_time_bias is on but timestamps is None")
            row_times = timestamps if query_timestamps is None else query_timestamps
            if row_times.shape != timestamps.shape:
                raise ValueError(
                    f"RelativeAttentionBias: query_timestamps {tuple(row_times.shape)} must match "
                    f"timestamps {tuple(timestamps.shape)}"
                )
            gaps = row_times[:, :, None] - timestamps[:, None, :]
            time_index = time_gap_buckets(gaps, self.time_bucket_base, self.num_time_buckets)
        return pos_index, time_index

    def bias_from_indices(self, pos_index: torch.Tensor | None, time_index: torch.Tensor | None) -> torch.Tensor | None:
        """Gather the learned biases for precomputed pair indices; `[N, num_heads, L, L]` or None if all off."""
        bias = None
        if self.position_weight is not None and pos_index is not None:
            bias = gather_columns(self.position_weight, pos_index).permute(1, 0, 2, 3)
        if self.time_weight is not None and time_index is not None:
            time_bias = gather_columns(self.time_weight, time_index).permute(1, 0, 2, 3)
            bias = time_bias if bias is None else bias + time_bias
        return bias

    def forward(
        self,
        positions: torch.Tensor | None,
        timestamps: torch.Tensor | None,
        query_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the bias `[N, num_heads, L, L]` for padded blocks `positions/timestamps [N, L]`."""
        ref = positions if positions is not None else timestamps
        if ref is None:
            raise ValueError("RelativeAttentionBias: needs positions or timestamps")
        bias = self.bias_from_indices(*self.pair_indices(positions, timestamps, query_timestamps))
        if bias is None:
            n, length = ref.shape
            dtype = torch.get_default_dtype()
            return torch.zeros(n, self.num_heads, length, length, dtype=dtype, device=ref.device)
        return bias
