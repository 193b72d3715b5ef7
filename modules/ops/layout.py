"""The segment and length-bucket layout of a jagged batch, built once and reused by every attention layer.

Inputs are jagged: `offsets [B+1]` over rows. A row may be *packed*: `segment_ids [T]` splits
it into segments, and attention never crosses a segment (block-diagonal causal). A segment is a
maximal run of equal consecutive ids inside a row; an id that comes back later in the same row
after another id is rejected, since "same id" and "same run" would then disagree.

Optional `query_flags [T]` (bool) marks *query tokens* (LUM's grouped query, M-FALCON
candidates): a query token is visible, as a key, only to itself. So a query sees every earlier
non-query token of its segment and itself, never another query; other tokens never see queries.

Mask, per pair inside one segment: `allowed(i, j) = j <= i and (not query[j] or i == j)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from lumrec.modules.ops.jagged import (
    jagged_to_padded_dense,
    lengths_to_offsets,
    offsets_to_ids,
    offsets_to_lengths,
    ranges_to_indices,
)

__all__ = ["AttentionBucket", "JaggedAttentionLayout", "LayoutInputs", "build_attention_layout"]


@dataclass
class AttentionBucket:
    """Segments of similar length, padded together to `max_len`; tokens `[start, end)` of the permuted order."""

    start: int
    end: int
    max_len: int
    offsets: torch.Tensor  # [n+1] offsets of the bucket's segments inside [start, end)
    lengths: torch.Tensor  # [n]
    mask: torch.Tensor  # [n, 1, L, L] bool, allowed (query, key) pairs
    positions: torch.Tensor  # [n, L] int64, padded
    timestamps: torch.Tensor | None  # [n, L] int64, padded
    # Time each query row measures its gaps from (None: its own timestamp); see build_attention_layout.
    query_timestamps: torch.Tensor | None = None  # [n, L] int64, padded
    # Relative-bias pair indices depend only on positions/timestamps: computed by the first layer, reused by the rest.
    bias_index_cache: dict = field(default_factory=dict)


@dataclass
class JaggedAttentionLayout:
    """How a jagged batch is cut into segments and length buckets; build once, reuse in every layer.

    Example::

        >>> import torch
        >>> offsets = torch.tensor([0, 3, 3, 4])      # rows of length 3, 0, 1
        >>> layout = build_attention_layout(offsets, segment_ids=torch.tensor([0, 0, 1, 0]))
        >>> layout.segment_lengths.tolist()           # row 0 holds two segments
        [2, 1, 1]
        >>> [b.max_len for b in layout.buckets]
        [2]
    """

    num_tokens: int
    perm: torch.Tensor  # [T] token index at each slot of the bucket-sorted order
    inv_perm: torch.Tensor  # [T] slot of each token in the bucket-sorted order
    segment_lengths: torch.Tensor  # [S] lengths of the non-empty segments, in token order
    buckets: list[AttentionBucket]
    # The inputs the layout was built from, as given (None stays None): what the reference path reads.
    inputs: LayoutInputs | None = None


@dataclass
class LayoutInputs:
    """The per-token inputs of `build_attention_layout`, kept so that ``Kernel.REFERENCE`` can recompute from them."""

    offsets: torch.Tensor
    segment_ids: torch.Tensor | None
    query_flags: torch.Tensor | None
    positions: torch.Tensor | None
    timestamps: torch.Tensor | None
    query_timestamps: torch.Tensor | None


def _segment_starts(
    offsets: torch.Tensor, num_tokens: int, segment_ids: torch.Tensor | None
) -> torch.Tensor:
    """Token index where each non-empty segment starts (row starts plus id changes)."""
    device = offsets.device
    lengths = offsets_to_lengths(offsets)
    is_start = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    is_start[offsets[:-1][lengths > 0]] = True
    if segment_ids is not None:
        if segment_ids.shape != (num_tokens,):
            raise ValueError(
                f"jagged attention: segment_ids must have shape [{num_tokens}] (one per token), "
                f"got {tuple(segment_ids.shape)}"
            )
        is_start[1:] |= segment_ids[1:] != segment_ids[:-1]
    starts = torch.nonzero(is_start).flatten()
    if segment_ids is not None and num_tokens > 0:
        # A recurring id within a row would mean "same id" != "same run": refuse instead of guessing.
        row_ids = offsets_to_ids(offsets, num_tokens)
        pairs = torch.stack([row_ids[starts], segment_ids[starts]])
        distinct = torch.unique(pairs, dim=1).shape[1]
        if distinct != starts.numel():
            raise ValueError(
                "jagged attention: segment_ids must be contiguous inside each row "
                f"({starts.numel()} runs but {distinct} distinct (row, segment_id) pairs)"
            )
    return starts


def _bucket_keys(lengths: torch.Tensor, min_block: int, bucket_ratio: float) -> torch.Tensor:
    """Geometric length classes: lengths <= min_block share class 0, then each class spans a factor bucket_ratio."""
    ratio = lengths.to(torch.float64) / min_block
    keys = torch.ceil(torch.log(ratio.clamp(min=1.0)) / math.log(bucket_ratio) - 1e-9)
    return keys.clamp(min=0).to(torch.int64)


def build_attention_layout(
    offsets: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    query_flags: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    min_block: int = 16,
    bucket_ratio: float = 2.0,
) -> JaggedAttentionLayout:
    """Cut a jagged batch into segments, group them into length buckets and precompute masks.

    Why buckets: padding every sequence to the batch's longest (B x Lmax x Lmax) wastes
    time and memory quadratically when lengths are skewed, as recommendation histories
    are. Segments are sorted into geometric length classes (all lengths <= `min_block`
    together, then (min_block*r^(k-1), min_block*r^k]), and each class is padded only to
    its own longest segment. Inside a class the longest is at most `bucket_ratio` times
    the shortest, so the padded score area is at most `bucket_ratio**2` times the useful
    one (plus `min_block**2` per tiny segment), while the number of classes, i.e. of
    batched matmuls, stays logarithmic in the length range. Packed rows are split into
    their segments first: block-diagonal attention of a row is exactly independent
    attention per segment, so a row of many short segments costs what its segments cost.

    `positions` (default: index inside the segment) and `timestamps` feed the relative
    bias; they are padded per bucket here, once, so that every layer reuses them.
    `query_timestamps` (needs `timestamps`) is the time a query token measures its gaps from,
    e.g. the request time of the event it predicts; default its own timestamp.
    """
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"jagged attention: offsets must be 1-D [B+1], got shape {tuple(offsets.shape)}")
    if min_block < 1 or bucket_ratio <= 1.0:
        raise ValueError(f"jagged attention: need min_block >= 1 and bucket_ratio > 1, got {min_block}, {bucket_ratio}")
    with record_function("jagged_attention/layout"):
        offsets = offsets.to(torch.int64)
        inputs = LayoutInputs(offsets, segment_ids, query_flags, positions, timestamps, query_timestamps)
        device = offsets.device
        num_tokens = int(offsets[-1])
        if query_timestamps is not None and timestamps is None:
            raise ValueError("jagged attention: query_timestamps needs timestamps")
        named = (("query_flags", query_flags), ("positions", positions), ("timestamps", timestamps),
                 ("query_timestamps", query_timestamps))
        for name, tensor in named:
            if tensor is not None and tensor.shape != (num_tokens,):
                raise ValueError(
                    f"jagged attention: {name} must have shape [{num_tokens}] (one per token), "
                    f"got {tuple(tensor.shape)}"
                )
        starts = _segment_starts(offsets, num_tokens, segment_ids)
        seg_lengths = torch.diff(starts, append=torch.tensor([num_tokens], device=device))
        if positions is None:
            positions = torch.arange(num_tokens, device=device) - torch.repeat_interleave(
                starts, seg_lengths, output_size=num_tokens
            )

        keys = _bucket_keys(seg_lengths, min_block, bucket_ratio)
        # Stable sort keeps the segments of one bucket in token order (deterministic layouts).
        order = torch.sort(keys, stable=True).indices
        sorted_keys = keys[order]
        sorted_lengths = seg_lengths[order]
        perm = ranges_to_indices(starts[order], sorted_lengths)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=device)

        perm_positions = positions.to(torch.int64)[perm]
        perm_timestamps = timestamps.to(torch.int64)[perm] if timestamps is not None else None
        perm_query_ts = query_timestamps.to(torch.int64)[perm] if query_timestamps is not None else None
        perm_query = query_flags.to(torch.bool)[perm] if query_flags is not None else None

        buckets: list[AttentionBucket] = []
        counts = torch.unique_consecutive(sorted_keys, return_counts=True)[1]
        seg_cursor, token_cursor = 0, 0
        for count in counts.tolist():
            lengths = sorted_lengths[seg_cursor : seg_cursor + count]
            num_bucket_tokens = int(lengths.sum())
            max_len = int(lengths.max())
            local_offsets = lengths_to_offsets(lengths)
            sl = slice(token_cursor, token_cursor + num_bucket_tokens)
            steps = torch.arange(max_len, device=device)
            eye = torch.eye(max_len, dtype=torch.bool, device=device)[None]
            mask = (steps[None, :] <= steps[:, None])[None] & (steps[None, None, :] < lengths[:, None, None])
            if perm_query is not None:
                query_pad = jagged_to_padded_dense(perm_query[sl].to(torch.int32), local_offsets, max_len).bool()
                mask = mask & ~query_pad[:, None, :]
            # The diagonal is always allowed: real tokens see themselves anyway, and padding rows
            # (dropped later) then never have an empty softmax row whose NaNs would leak into grads.
            mask = mask | eye
            buckets.append(
                AttentionBucket(
                    start=token_cursor,
                    end=token_cursor + num_bucket_tokens,
                    max_len=max_len,
                    offsets=local_offsets,
                    lengths=lengths,
                    mask=mask[:, None],
                    positions=jagged_to_padded_dense(perm_positions[sl], local_offsets, max_len),
                    timestamps=(
                        jagged_to_padded_dense(perm_timestamps[sl], local_offsets, max_len)
                        if perm_timestamps is not None
                        else None
                    ),
                    query_timestamps=(
                        jagged_to_padded_dense(perm_query_ts[sl], local_offsets, max_len)
                        if perm_query_ts is not None
                        else None
                    ),
                )
            )
            seg_cursor += count
            token_cursor += num_bucket_tokens
    return JaggedAttentionLayout(
        num_tokens=num_tokens, perm=perm, inv_perm=inv_perm, segment_lengths=seg_lengths, buckets=buckets,
        inputs=inputs,
    )
