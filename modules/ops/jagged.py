"""Jagged-tensor ops on `(values, offsets)` pairs: fbgemm kernels, PyTorch fast paths, references in reference.py.

A jagged batch of B sequences is `values [T, ...]` (all sequences concatenated) plus
`offsets [B+1]` (sequence b is `values[offsets[b]:offsets[b+1]]`). fbgemm's CPU kernels
cover float32/float16/bfloat16 and integer values; other dtypes (float64, used by the
tests for tight tolerances, and bool) take the equivalent PyTorch path, as does every
tensor under ``Kernel.PYTORCH`` or on a device fbgemm has no kernel for.

Example::

    >>> import torch
    >>> offsets = lengths_to_offsets(torch.tensor([2, 0, 1]))
    >>> offsets.tolist(), offsets_to_ids(offsets).tolist(), jagged_positions(offsets).tolist()
    ([0, 2, 2, 3], [0, 0, 2], [0, 1, 0])
"""

from __future__ import annotations

import torch

from lumrec.modules.ops.kernel import Kernel, current_kernel, fbgemm_supports
from lumrec.modules.ops.reference import (
    jagged_to_padded_dense_reference,
    lengths_to_offsets_reference,
    padded_dense_to_jagged_reference,
)

__all__ = [
    "jagged_positions",
    "jagged_to_padded_dense",
    "lengths_to_offsets",
    "offsets_to_ids",
    "offsets_to_lengths",
    "padded_dense_to_jagged",
    "ranges_to_indices",
    "segment_positions",
]

# Dtypes fbgemm's jagged kernels implement (checked on CPU: no float64, no bool).
_FBGEMM_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64})


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Return `offsets [B+1]` (int64, starting at 0) from `lengths [B]`."""
    lengths = lengths.to(torch.int64)
    if fbgemm_supports("asynchronous_complete_cumsum", lengths, _FBGEMM_DTYPES):
        return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    return lengths_to_offsets_reference(lengths)


def offsets_to_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """Return `lengths [B]` from `offsets [B+1]`."""
    return offsets[1:] - offsets[:-1]


def offsets_to_ids(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Return, for each of the `offsets[-1]` tokens, the index of the sequence it belongs to."""
    lengths = offsets_to_lengths(offsets)
    ids = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def jagged_positions(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Return, for each token, its 0-based position inside its own sequence (`total`: the number of tokens, if known)."""
    lengths = offsets_to_lengths(offsets)
    total = int(offsets[-1]) if total is None else total
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def segment_positions(offsets: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Index of every token inside its segment (rows cut by `offsets`, further cut where `segment_ids` changes).

    Example::

        >>> segment_positions(torch.tensor([0, 4, 6]), torch.tensor([0, 0, 1, 1, 0, 0])).tolist()
        [0, 1, 0, 1, 0, 1]
    """
    offsets = offsets.to(torch.int64)
    num_tokens = int(offsets[-1])
    device = offsets.device
    is_start = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    lengths = offsets[1:] - offsets[:-1]
    is_start[offsets[:-1][lengths > 0]] = True
    if segment_ids is not None and num_tokens > 1:
        is_start[1:] |= segment_ids[1:] != segment_ids[:-1]
    index = torch.arange(num_tokens, device=device)
    # Running max of each token's latest segment start.
    start_of = torch.cummax(torch.where(is_start, index, torch.zeros_like(index)), dim=0).values
    return index - start_of


def ranges_to_indices(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Return the concatenation of `arange(s, s + n)` for each `(s, n)` pair, vectorised."""
    total = int(lengths.sum())
    out_offsets = lengths_to_offsets(lengths)
    shift = torch.repeat_interleave(starts - out_offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


def _flatten_trailing(values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """fbgemm wants 1-D or 2-D values; fold trailing dims into one and remember them."""
    trailing = tuple(values.shape[1:])
    if values.dim() <= 2:
        return values, trailing
    return values.reshape(values.shape[0], -1), trailing


def jagged_to_padded_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """Pad `values [T, *F]` into `[B, max_len, *F]` (longer sequences are truncated); differentiable.

    Example::

        >>> jagged_to_padded_dense(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 2, 3]), 2).tolist()
        [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]
    """
    kernel = current_kernel()
    if kernel is Kernel.REFERENCE:
        return jagged_to_padded_dense_reference(values, offsets, max_len, padding_value)
    num_seqs = offsets.numel() - 1
    if values.shape[0] > 0 and fbgemm_supports("jagged_to_padded_dense_forward", values, _FBGEMM_DTYPES):
        flat, trailing = _flatten_trailing(values)
        dense = torch.ops.fbgemm.jagged_to_padded_dense(flat, [offsets], [max_len], padding_value)
        return dense.reshape(num_seqs, max_len, *trailing)
    lengths = offsets_to_lengths(offsets)
    steps = torch.arange(max_len, device=values.device)
    valid = steps[None, :] < lengths[:, None]
    if values.shape[0] == 0:
        return values.new_full((num_seqs, max_len, *values.shape[1:]), padding_value)
    index = (offsets[:-1, None] + steps[None, :]).clamp(max=values.shape[0] - 1)
    gathered = values[index]
    valid = valid.reshape(*valid.shape, *([1] * (values.dim() - 1)))
    return torch.where(valid, gathered, gathered.new_full((), padding_value))


def padded_dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Inverse of `jagged_to_padded_dense`: keep the first `lengths[b]` rows of each `dense[b]`."""
    total = int(offsets[-1]) if total is None else total
    kernel = current_kernel()
    if kernel is Kernel.REFERENCE:
        return padded_dense_to_jagged_reference(dense, offsets, total)
    if total > 0 and fbgemm_supports("dense_to_jagged_forward", dense, _FBGEMM_DTYPES):
        trailing = tuple(dense.shape[2:])
        # fbgemm wants exactly [B, L, F]: add or fold the feature dims.
        flat = dense.reshape(dense.shape[0], dense.shape[1], -1)
        values = torch.ops.fbgemm.dense_to_jagged(flat, [offsets], total)[0]
        return values.reshape(total, *trailing)
    lengths = offsets_to_lengths(offsets)
    steps = torch.arange(dense.shape[1], device=dense.device)
    valid = steps[None, :] < lengths[:, None]
    # Boolean indexing walks row-major, i.e. sequence by sequence: the jagged order.
    return dense[valid]
