"""Jagged causal attention (softmax and HSTU pointwise) with packed segments and query-token masks.

Inputs are jagged: `q, k [T, H, Dqk]`, `v [T, H, Dv]` and `offsets [B+1]` over rows. A row may be
*packed*: `segment_ids [T]` splits it into segments, and attention never crosses a segment
(block-diagonal causal). A segment is a maximal run of equal consecutive ids inside a row; an id
that comes back later in the same row after another id is rejected, since "same id" and
"same run" would then disagree.

Optional `query_flags [T]` (bool) marks *query tokens* (LUM's grouped query, M-FALCON
candidates): a query token is visible, as a key, only to itself. So a query sees every earlier
non-query token of its segment and itself, never another query; other tokens never see queries.

Mask, per pair inside one segment: `allowed(i, j) = j <= i and (not query[j] or i == j)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from lumrec.modules.jagged import (
    jagged_to_padded_dense,
    lengths_to_offsets,
    offsets_to_ids,
    offsets_to_lengths,
    padded_dense_to_jagged,
    ranges_to_indices,
)
from lumrec.modules.relative_bias import RelativeAttentionBias

AttentionKind = Literal["softmax", "hstu"]
# "length": divide each segment's HSTU scores by that segment's length; a number: by that constant.
Normaliser = float | Literal["length"]

__all__ = [
    "AttentionBucket",
    "JaggedAttentionLayout",
    "build_attention_layout",
    "jagged_causal_attention",
    "padded_reference_attention",
]


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
        num_tokens=num_tokens, perm=perm, inv_perm=inv_perm, segment_lengths=seg_lengths, buckets=buckets
    )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            "jagged attention: expected q, k [T, H, Dqk] and v [T, H, Dv]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _check_kind(kind: str, normaliser: Normaliser | None) -> None:
    if kind not in ("softmax", "hstu"):
        raise ValueError(f"jagged attention: kind must be 'softmax' or 'hstu', got {kind!r}")
    if kind == "hstu":
        if isinstance(normaliser, str) and normaliser != "length":
            raise ValueError(f"jagged attention: normaliser must be a number or 'length', got {normaliser!r}")
        if normaliser is None or (not isinstance(normaliser, str) and normaliser <= 0):
            raise ValueError(f"jagged attention: hstu needs a positive normaliser or 'length', got {normaliser!r}")


def _combine(
    scores: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    kind: AttentionKind,
    scale: float,
    norm: torch.Tensor | float,
) -> torch.Tensor:
    """Turn raw scores `[N, H, L, L]` into attention weights under `mask` and apply them to `values`."""
    scores = scores * scale if scale != 1.0 else scores
    if bias is not None:
        scores = scores + bias
    if kind == "softmax":
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.matmul(weights, values)
    weights = F.silu(scores).masked_fill(~mask, 0.0)
    # Dividing the [.., L, Dv] output rather than the [.., L, L] weights: same value, fewer flops.
    return torch.matmul(weights, values) / norm


def _bucket_bias(relative_bias: RelativeAttentionBias | None, bucket: AttentionBucket) -> torch.Tensor | None:
    """Relative bias of a bucket's pairs, reusing pair indices cached on the layout."""
    if relative_bias is None:
        return None
    key = relative_bias.index_key()
    if key not in bucket.bias_index_cache:
        bucket.bias_index_cache[key] = relative_bias.pair_indices(
            bucket.positions, bucket.timestamps, bucket.query_timestamps
        )
    return relative_bias.bias_from_indices(*bucket.bias_index_cache[key])


def jagged_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    kind: AttentionKind = "softmax",
    layout: JaggedAttentionLayout | None = None,
    segment_ids: torch.Tensor | None = None,
    query_flags: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    relative_bias: RelativeAttentionBias | None = None,
    normaliser: Normaliser | None = None,
    scale: float | None = None,
    min_block: int = 16,
    bucket_ratio: float = 2.0,
) -> torch.Tensor:
    """Causal attention inside each segment of a jagged batch; returns `[T, H, Dv]`.

    `kind="softmax"`: `softmax(scale * q k^T + rab)` (scale defaults to 1/sqrt(Dqk)).
    `kind="hstu"`: `silu(scale * q k^T + rab) / n` (scale defaults to 1) with `n = normaliser`,
    a constant (HSTU's N) or `"length"` for each segment's own length; masked pairs are 0.
    Pass a prebuilt `layout` to reuse it across layers (then offsets, segment_ids,
    query_flags, positions and timestamps are taken from it and must not be given).
    """
    _check_qkv(q, k, v)
    _check_kind(kind, normaliser)
    if layout is None:
        if offsets is None:
            raise ValueError("jagged attention: give offsets or a prebuilt layout")
        layout = build_attention_layout(
            offsets,
            segment_ids=segment_ids,
            query_flags=query_flags,
            positions=positions,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            min_block=min_block,
            bucket_ratio=bucket_ratio,
        )
    elif any(t is not None for t in (segment_ids, query_flags, positions, timestamps, query_timestamps)):
        raise ValueError(
            "jagged attention: with a prebuilt layout, pass segments/flags/positions/timestamps to the layout"
        )
    if q.shape[0] != layout.num_tokens:
        raise ValueError(f"jagged attention: q has {q.shape[0]} tokens but the offsets describe {layout.num_tokens}")
    num_tokens, heads, dqk = q.shape
    dv = v.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(dqk) if kind == "softmax" else 1.0
    if num_tokens == 0:
        return v.new_zeros(0, heads, dv)

    # One gather into bucket order per tensor, then every bucket is a contiguous slice.
    q_perm = q.reshape(num_tokens, heads * dqk)[layout.perm]
    k_perm = k.reshape(num_tokens, heads * dqk)[layout.perm]
    v_perm = v.reshape(num_tokens, heads * dv)[layout.perm]
    outputs = []
    for bucket in layout.buckets:
        n, length = bucket.lengths.numel(), bucket.max_len
        with record_function(f"jagged_attention/bucket_L{length}"):
            sl = slice(bucket.start, bucket.end)
            qb = jagged_to_padded_dense(q_perm[sl], bucket.offsets, length).view(n, length, heads, dqk).transpose(1, 2)
            kb = jagged_to_padded_dense(k_perm[sl], bucket.offsets, length).view(n, length, heads, dqk).transpose(1, 2)
            vb = jagged_to_padded_dense(v_perm[sl], bucket.offsets, length).view(n, length, heads, dv).transpose(1, 2)
            scores = torch.matmul(qb, kb.transpose(-1, -2))
            bias = _bucket_bias(relative_bias, bucket)
            if bias is not None:
                bias = bias.to(scores.dtype)
            if normaliser == "length":
                norm: torch.Tensor | float = bucket.lengths.to(scores.dtype).view(n, 1, 1, 1)
            else:
                norm = float(normaliser) if normaliser is not None else 1.0
            out = _combine(scores, vb, bucket.mask, bias, kind, scale, norm)
            out = out.transpose(1, 2).reshape(n, length, heads * dv)
            outputs.append(padded_dense_to_jagged(out, bucket.offsets, bucket.end - bucket.start))
    return torch.cat(outputs)[layout.inv_perm].view(num_tokens, heads, dv)


def padded_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kind: AttentionKind = "softmax",
    segment_ids: torch.Tensor | None = None,
    query_flags: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    relative_bias: RelativeAttentionBias | None = None,
    normaliser: Normaliser | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain reference for tests: pad all rows to `B x Lmax`, build the full mask, compute, unpad."""
    _check_qkv(q, k, v)
    _check_kind(kind, normaliser)
    num_tokens, heads, dqk = q.shape
    dv = v.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(dqk) if kind == "softmax" else 1.0
    bounds = offsets.tolist()
    rows = len(bounds) - 1
    lmax = max([bounds[b + 1] - bounds[b] for b in range(rows)] + [1])
    seg = segment_ids.tolist() if segment_ids is not None else [0] * num_tokens
    flags = query_flags.tolist() if query_flags is not None else [False] * num_tokens

    # Per-token position inside its segment and segment length, by walking the tokens.
    default_pos, seg_len = [0] * num_tokens, [0] * num_tokens
    for b in range(rows):
        run_start = bounds[b]
        for t in range(bounds[b], bounds[b + 1] + 1):
            if t == bounds[b + 1] or seg[t] != seg[run_start]:
                for u in range(run_start, t):
                    default_pos[u] = u - run_start
                    seg_len[u] = t - run_start
                run_start = t
    pos = positions.tolist() if positions is not None else default_pos
    times = timestamps.tolist() if timestamps is not None else [0] * num_tokens
    query_times = query_timestamps.tolist() if query_timestamps is not None else times

    qp = q.new_zeros(rows, lmax, heads, dqk)
    kp = k.new_zeros(rows, lmax, heads, dqk)
    vp = v.new_zeros(rows, lmax, heads, dv)
    mask = torch.zeros(rows, lmax, lmax, dtype=torch.bool)
    pos_pad = torch.zeros(rows, lmax, dtype=torch.int64)
    time_pad = torch.zeros(rows, lmax, dtype=torch.int64)
    query_time_pad = torch.zeros(rows, lmax, dtype=torch.int64)
    len_pad = torch.ones(rows, lmax, dtype=q.dtype)
    for b in range(rows):
        s, e = bounds[b], bounds[b + 1]
        qp[b, : e - s] = q[s:e]
        kp[b, : e - s] = k[s:e]
        vp[b, : e - s] = v[s:e]
        for i in range(e - s):
            pos_pad[b, i] = pos[s + i]
            time_pad[b, i] = times[s + i]
            query_time_pad[b, i] = query_times[s + i]
            len_pad[b, i] = seg_len[s + i]
            for j in range(i + 1):
                same_segment = seg[s + i] == seg[s + j]
                visible = (not flags[s + j]) or i == j
                mask[b, i, j] = same_segment and visible
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * scale
    if relative_bias is not None:
        has_times = timestamps is not None
        bias = relative_bias(pos_pad, time_pad if has_times else None, query_time_pad if has_times else None)
        scores = scores + bias.to(scores.dtype)
    full_mask = mask[:, None]
    if kind == "softmax":
        # Padding rows see nothing; let them see themselves so softmax stays finite (they are dropped).
        safe = full_mask | torch.eye(lmax, dtype=torch.bool)[None, None]
        weights = torch.softmax(scores.masked_fill(~safe, float("-inf")), dim=-1) * full_mask
    else:
        norm = len_pad[:, None, :, None] if normaliser == "length" else float(normaliser)
        weights = F.silu(scores) / norm * full_mask
    out = torch.einsum("bhij,bjhd->bihd", weights, vp)
    pieces = [out[b, : bounds[b + 1] - bounds[b]] for b in range(rows)]
    return torch.cat(pieces) if pieces else v.new_zeros(0, heads, dv)
