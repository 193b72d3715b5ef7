"""Jagged causal attention, softmax and HSTU pointwise (SiLU), with packed segments, query tokens and relative bias.

`q, k [T, H, Dqk]`, `v [T, H, Dv]` over a jagged batch; the segment/bucket layout and the
mask rules are in ``lumrec.modules.ops.layout``. Paths, chosen by ``lumrec.modules.ops.Kernel``:

- ``PYTORCH`` / ``FBGEMM``: the length-bucketed path below (each bucket one padded batched
  matmul; the jagged <-> padded moves are fbgemm kernels under FBGEMM).
- ``REFERENCE``: ``jagged_causal_attention_reference`` (all rows padded to the longest, masks
  built by loops).
- ``TRITON``: HSTU attention by the Triton kernels of ``lumrec.modules.ops.triton.hstu_attention``
  (no padding, no `L x L` tensor); softmax attention by the PyTorch path. A `layout` of
  ``TritonSegments`` (built on the device) goes to the kernels whatever the setting.

Softmax attention in the PyTorch path runs PyTorch's fused ``scaled_dot_product_attention`` on
each padded bucket off CPU, and the explicit softmax on CPU.

Example::

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> q, k, v = torch.randn(5, 2, 4), torch.randn(5, 2, 4), torch.randn(5, 2, 3)
    >>> offsets = torch.tensor([0, 3, 5])                     # rows of 3 and 2 tokens
    >>> out = jagged_causal_attention(q, k, v, offsets, kind="hstu", normaliser="length")
    >>> ref = jagged_causal_attention_reference(q, k, v, offsets, kind="hstu", normaliser="length")
    >>> out.shape, bool(torch.allclose(out, ref, atol=1e-6))
    (torch.Size([5, 2, 3]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from lumrec.modules.ops.attention_args import (
    AttentionKind,
    Normaliser,
    RelativeBias,
    check_kind,
    check_qkv,
    default_scale,
)
from lumrec.modules.ops.jagged import jagged_to_padded_dense, padded_dense_to_jagged
from lumrec.modules.ops.kernel import Kernel, current_kernel
from lumrec.modules.ops.layout import AttentionBucket, JaggedAttentionLayout, build_attention_layout
from lumrec.modules.ops.reference import jagged_causal_attention_reference
from lumrec.modules.ops.triton.hstu_attention import triton_hstu_attention
from lumrec.modules.ops.triton.segments import TritonSegments

__all__ = ["jagged_causal_attention"]


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


def _use_fused_softmax(x: torch.Tensor) -> bool:
    """Softmax through PyTorch's fused attention off CPU; on CPU the explicit path, whose numbers CPU runs keep."""
    return x.device.type != "cpu"


def _fused_softmax(
    qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`softmax(scale * q k^T + bias)` v of padded `[N, H, L, D]` blocks by ``scaled_dot_product_attention``."""
    attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=attn_mask, scale=scale)


def _bucket_bias(relative_bias: RelativeBias | None, bucket: AttentionBucket) -> torch.Tensor | None:
    """Relative bias of a bucket's pairs, reusing pair indices cached on the layout."""
    if relative_bias is None:
        return None
    key = relative_bias.index_key()
    if key not in bucket.bias_index_cache:
        bucket.bias_index_cache[key] = relative_bias.pair_indices(
            bucket.positions, bucket.timestamps, bucket.query_timestamps
        )
    return relative_bias.bias_from_indices(*bucket.bias_index_cache[key])


def _bucketed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: JaggedAttentionLayout,
    kind: AttentionKind,
    relative_bias: RelativeBias | None,
    normaliser: Normaliser | None,
    scale: float,
) -> torch.Tensor:
    """The fast path: one gather into bucket order, one padded batched matmul per length bucket."""
    num_tokens, heads, dqk = q.shape
    dv = v.shape[2]
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
            bias = _bucket_bias(relative_bias, bucket)
            if bias is not None:
                bias = bias.to(qb.dtype)
            if kind == "softmax" and _use_fused_softmax(qb):
                out = _fused_softmax(qb, kb, vb, bucket.mask, bias, scale)
            else:
                scores = torch.matmul(qb, kb.transpose(-1, -2))
                if normaliser == "length":
                    norm: torch.Tensor | float = bucket.lengths.to(scores.dtype).view(n, 1, 1, 1)
                else:
                    norm = float(normaliser) if normaliser is not None else 1.0
                out = _combine(scores, vb, bucket.mask, bias, kind, scale, norm)
            out = out.transpose(1, 2).reshape(n, length, heads * dv)
            outputs.append(padded_dense_to_jagged(out, bucket.offsets, bucket.end - bucket.start))
    return torch.cat(outputs)[layout.inv_perm].view(num_tokens, heads, dv)


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
    relative_bias: RelativeBias | None = None,
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
    check_qkv(q, k, v)
    check_kind(kind, normaliser)
    if isinstance(layout, TritonSegments):  # built on the device for the Triton kernels: nothing read on the host
        if kind != "hstu":
            raise ValueError(
                "jagged attention: TritonSegments serve HSTU attention (kind='hstu') only; "
                "build a layout with build_attention_layout for softmax attention"
            )
        return triton_hstu_attention(
            q, k, v, offsets, layout=layout, segment_ids=segment_ids, query_flags=query_flags, positions=positions,
            timestamps=timestamps, query_timestamps=query_timestamps, relative_bias=relative_bias,
            normaliser=normaliser, scale=scale,
        )
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
    if scale is None:
        scale = default_scale(kind, dqk)
    if current_kernel() is Kernel.REFERENCE:
        given = layout.inputs
        if given is None:
            raise ValueError("jagged attention: the reference path needs a layout from build_attention_layout")
        return jagged_causal_attention_reference(
            q, k, v, given.offsets, kind=kind, segment_ids=given.segment_ids, query_flags=given.query_flags,
            positions=given.positions, timestamps=given.timestamps, query_timestamps=given.query_timestamps,
            relative_bias=relative_bias, normaliser=normaliser, scale=scale,
        )
    if current_kernel() is Kernel.TRITON and kind == "hstu":
        return triton_hstu_attention(
            q, k, v, layout=layout, relative_bias=relative_bias, normaliser=normaliser, scale=scale
        )
    if num_tokens == 0:
        return v.new_zeros(0, heads, v.shape[2])
    return _bucketed_attention(q, k, v, layout, kind, relative_bias, normaliser, scale)
