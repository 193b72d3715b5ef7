"""Plain-PyTorch references of every op in ``lumrec.modules.ops``, named ``<op>_reference``.

Written to be read, not to be fast: per-row loops and one padded `B x Lmax` block. The fast
paths are tested against these (tests/test_ops.py) on random shapes, values and gradients;
``Kernel.REFERENCE`` runs them inside a model.

Example::

    >>> import torch
    >>> lengths_to_offsets_reference(torch.tensor([2, 0, 1])).tolist()
    [0, 2, 2, 3]
    >>> padded_dense_to_jagged_reference(torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]),
    ...                                  torch.tensor([0, 2, 2, 3])).tolist()
    [1.0, 2.0, 3.0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lumrec.modules.ops.attention_args import (
    AttentionKind,
    Normaliser,
    RelativeBias,
    check_kind,
    check_qkv,
    default_scale,
)

__all__ = [
    "gather_columns_reference",
    "jagged_causal_attention_reference",
    "jagged_to_padded_dense_reference",
    "lengths_to_offsets_reference",
    "padded_dense_to_jagged_reference",
]


def lengths_to_offsets_reference(lengths: torch.Tensor) -> torch.Tensor:
    """`offsets [B+1]` (int64, from 0) of `lengths [B]`: a leading 0, then the running sum."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def jagged_to_padded_dense_reference(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """`[B, max_len, *F]`: row b holds `values[offsets[b]:offsets[b+1]]` cut to max_len, then padding."""
    bounds = offsets.tolist()
    dense = values.new_full((len(bounds) - 1, max_len, *values.shape[1:]), padding_value)
    rows = []
    for b in range(len(bounds) - 1):
        piece = values[bounds[b] : min(bounds[b + 1], bounds[b] + max_len)]
        rows.append(torch.cat([piece, dense[b, piece.shape[0] :]]))
    return torch.stack(rows) if rows else dense


def padded_dense_to_jagged_reference(dense: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """The first `offsets[b+1] - offsets[b]` rows of each `dense[b]`, concatenated."""
    bounds = offsets.tolist()
    pieces = [dense[b, : bounds[b + 1] - bounds[b]] for b in range(len(bounds) - 1)]
    if not pieces:
        return dense.new_zeros(0 if total is None else total, *dense.shape[2:])
    return torch.cat(pieces)


def gather_columns_reference(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`weight[:, index]` by autograd's own advanced indexing."""
    return weight[:, index]


def jagged_causal_attention_reference(
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
    relative_bias: RelativeBias | None = None,
    normaliser: Normaliser | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``jagged_causal_attention`` by padding all rows to `B x Lmax`, building the full mask by loops, unpadding."""
    check_qkv(q, k, v)
    check_kind(kind, normaliser)
    num_tokens, heads, dqk = q.shape
    dv = v.shape[2]
    if scale is None:
        scale = default_scale(kind, dqk)
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

    device = q.device
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
    mask, pos_pad, time_pad = mask.to(device), pos_pad.to(device), time_pad.to(device)
    query_time_pad, len_pad = query_time_pad.to(device), len_pad.to(device)
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * scale
    if relative_bias is not None:
        has_times = timestamps is not None
        bias = relative_bias(pos_pad, time_pad if has_times else None, query_time_pad if has_times else None)
        scores = scores + bias.to(scores.dtype)
    full_mask = mask[:, None]
    if kind == "softmax":
        # Padding rows see nothing; let them see themselves so softmax stays finite (they are dropped).
        safe = full_mask | torch.eye(lmax, dtype=torch.bool, device=device)[None, None]
        weights = torch.softmax(scores.masked_fill(~safe, float("-inf")), dim=-1) * full_mask
    else:
        norm = len_pad[:, None, :, None] if normaliser == "length" else float(normaliser)
        weights = F.silu(scores) / norm * full_mask
    out = torch.einsum("bhij,bjhd->bihd", weights, vp)
    pieces = [out[b, : bounds[b + 1] - bounds[b]] for b in range(rows)]
    return torch.cat(pieces) if pieces else v.new_zeros(0, heads, dv)
