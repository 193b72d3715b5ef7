"""The segments of a jagged batch for the Triton HSTU kernels, built on the device without host synchronisation.

``build_attention_layout`` reads lengths on the host (bucket sizes, `int(offsets[-1])`), which a
compiled or exported graph cannot do. The Triton kernels need less: where each segment starts,
a bound on segment lengths (to size the grid; the model's `max_len`), and the per-token inputs.
``build_triton_segments`` computes these with sizes taken from tensor shapes only:

- without `segment_ids` the segments are the rows: `seg_offsets` is `offsets` (`[B+1]`);
- with `segment_ids` a row splits where the id changes; their count depends on the data, so
  `seg_offsets` has `T+1` entries (at most one segment per token), the unused ones equal to `T`
  (empty segments, whose kernel programs return at once).

Default positions (each token's index in its segment) are computed here once for every layer.
Not checked here, unlike ``build_attention_layout`` (the checks need the host): that an id does
not come back later in its row (such a row is split at every change, as runs).

Example::

    >>> import torch
    >>> offsets = torch.tensor([0, 3, 3, 4])
    >>> segments = build_triton_segments(offsets, num_tokens=4, max_len=8, segment_ids=torch.tensor([0, 0, 1, 0]))
    >>> segments.seg_offsets.tolist(), segments.positions.tolist()
    ([0, 2, 3, 4, 4], [0, 1, 0, 0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TritonSegments", "build_triton_segments"]


@dataclass
class TritonSegments:
    """Segments and per-token inputs of a jagged batch, as the Triton HSTU kernels read them; reused by every layer."""

    num_tokens: int  # T, from a tensor's shape (symbolic under torch.export / torch.compile)
    seg_offsets: torch.Tensor  # [S+1] int64: where each segment starts, then T; S = B, or T with segment_ids
    max_len: int  # bound on segment lengths that sizes the kernels' grid (longer segments stay correct, slower)
    positions: torch.Tensor  # [T] int64: the given positions, or each token's index in its segment
    default_positions: bool  # positions are the index in the segment (the kernels then sum the table by diagonals)
    query_flags: torch.Tensor | None  # [T] int8
    timestamps: torch.Tensor | None  # [T] int64
    query_timestamps: torch.Tensor | None  # [T] int64


def _check_tokens(name: str, tensor: torch.Tensor | None, num_tokens: int) -> None:
    if tensor is not None:
        if tensor.dim() != 1:
            raise ValueError(f"jagged attention: {name} must be 1-D [T], got shape {tuple(tensor.shape)}")
        # torch._check rather than `if`: under export, a claim that two symbolic sizes are equal, not a branch.
        # (Its message may close over constants only, for torch.compile.)
        torch._check(tensor.shape[0] == num_tokens, lambda: f"jagged attention: {name} must have one entry per token")


def _packed_segment_offsets(offsets: torch.Tensor, segment_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`[T+1]`: the starts of the segments (row starts and id changes), in token order, then `T` for the rest."""
    device = offsets.device
    # Row starts, marked in a buffer one longer than the tokens: offsets[-1] and empty last rows mark slot T.
    # index_fill_ with a Python scalar: an indexed assignment would copy the value from the host (a sync on CUDA).
    is_start = torch.zeros(num_tokens + 1, dtype=torch.bool, device=device).index_fill_(0, offsets, True)
    # An id change against the previous token (token 0 starts a row anyway); roll keeps every size T, where
    # slices [1:] / [:-1] would make export guard on T - 1 (a size-1 special case) and narrow the dynamic range.
    is_start = is_start[:num_tokens] | (segment_ids != segment_ids.roll(1))
    tokens = torch.arange(num_tokens, device=device)
    index = torch.cumsum(is_start, 0) - 1
    # Non-starts write to a spare slot past the end, dropped after.
    slot = torch.where(is_start, index, torch.full_like(index, num_tokens + 1))
    seg_offsets = torch.full((num_tokens + 2,), num_tokens, dtype=torch.int64, device=device)
    seg_offsets = seg_offsets.scatter(0, slot, tokens)
    return seg_offsets[: num_tokens + 1]


def build_triton_segments(
    offsets: torch.Tensor,
    *,
    num_tokens: int,
    max_len: int,
    segment_ids: torch.Tensor | None = None,
    query_flags: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
) -> TritonSegments:
    """The segments of `offsets [B+1]` (rows, split by `segment_ids` where given) over `num_tokens` tokens.

    `num_tokens` must equal `offsets[-1]` (take it from the tokens' tensor shape: reading
    `offsets[-1]` would synchronise). `max_len` bounds segment lengths for the grid only.
    """
    if offsets.dim() != 1:
        raise ValueError(f"jagged attention: offsets must be 1-D [B+1], got shape {tuple(offsets.shape)}")
    if max_len < 1:
        raise ValueError(f"jagged attention: max_len must be >= 1, got {max_len}")
    if query_timestamps is not None and timestamps is None:
        raise ValueError("jagged attention: query_timestamps needs timestamps")
    named = (("segment_ids", segment_ids), ("query_flags", query_flags), ("positions", positions),
             ("timestamps", timestamps), ("query_timestamps", query_timestamps))
    for name, tensor in named:
        _check_tokens(name, tensor, num_tokens)
    offsets = offsets.to(torch.int64)
    if segment_ids is None:
        seg_offsets = offsets
    else:
        seg_offsets = _packed_segment_offsets(offsets, segment_ids, num_tokens)
    default_positions = positions is None
    if default_positions:
        tokens = torch.arange(num_tokens, device=offsets.device)
        segment = torch.searchsorted(seg_offsets[1:], tokens, right=True)  # the segment each token is in
        positions = tokens - seg_offsets[segment]
    as_int64 = lambda t: t.to(torch.int64).contiguous() if t is not None else None  # noqa: E731
    return TritonSegments(
        num_tokens=num_tokens, seg_offsets=seg_offsets, max_len=max_len, positions=as_int64(positions),
        default_positions=default_positions,
        query_flags=query_flags.to(torch.int8).contiguous() if query_flags is not None else None,
        timestamps=as_int64(timestamps), query_timestamps=as_int64(query_timestamps),
    )
