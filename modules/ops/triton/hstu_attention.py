"""Jagged causal HSTU (SiLU) attention as Triton kernels: forward and backward, relative bias, segments, query tokens.

``triton_hstu_attention`` computes what ``jagged_causal_attention_reference(..., kind="hstu")``
computes, without padding and without any `L x L` tensor: for each query token `i`, over the
keys `j` it may see (causal inside its segment; a query token is seen only by itself: the rule
of ``lumrec.modules.ops.layout``),

    out_i = sum_j silu(scale * q_i . k_j + bias_ij) / n * v_j

with `n` a constant or the segment's length, and `bias_ij` read inside the kernel from the
relative bias's small tables (position: clamped `pos_i - pos_j`; time: bucket of the gap
`|t'_i - t_j|`). Gradients reach q, k, v and both tables. ``Kernel.TRITON`` routes
``jagged_causal_attention(kind="hstu")`` here.

The kernels (``hstu_kernels.py``) run compiled on CUDA tensors, or in Triton's interpreter on
CPU when ``TRITON_INTERPRET=1`` is set (or ``interpret=True`` is passed): slow, for tests.
Each mode loads its own copy of the kernels, so the choice is made per call and does not
depend on when triton was first imported. The launches are the custom operators of
``hstu_op.py`` (``lumrec::hstu_attention`` and its backward), so that torch.compile and
torch.export see one node; with ``TritonSegments`` as the layout nothing is read on the host.

Example (CPU, so in Triton's interpreter)::

    >>> import torch
    >>> from lumrec.modules.ops import jagged_causal_attention_reference
    >>> _ = torch.manual_seed(0)
    >>> q, k, v = torch.randn(5, 1, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    >>> offsets = torch.tensor([0, 3, 5])
    >>> out = triton_hstu_attention(q, k, v, offsets, normaliser="length", interpret=True)
    >>> ref = jagged_causal_attention_reference(q, k, v, offsets, kind="hstu", normaliser="length")
    >>> bool(torch.allclose(out, ref, atol=1e-6))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _disable_current_modes

from lumrec.modules.ops.attention_args import Normaliser, RelativeBias, check_kind, check_qkv, default_scale
from lumrec.modules.ops.layout import JaggedAttentionLayout, build_attention_layout
from lumrec.modules.ops.triton.hstu_op import INTERPRET_ENV_VAR, hstu_attention_op, triton_interpret_requested
from lumrec.modules.ops.triton.segments import TritonSegments

__all__ = ["INTERPRET_ENV_VAR", "time_thresholds", "triton_hstu_attention", "triton_interpret_requested"]

_INT64_MAX = torch.iinfo(torch.int64).max
_threshold_cache: dict[tuple, tuple[int, ...]] = {}


def _resolve_interpret(device: torch.device, interpret: bool | None) -> bool:
    """Interpreter or compiled kernels for tensors on `device`; raise where neither can run."""
    if interpret is None:
        interpret = triton_interpret_requested()
    if not interpret and device.type != "cuda":
        raise RuntimeError(
            f"jagged attention (Kernel.TRITON): the Triton kernels need CUDA tensors, got tensors on {device}. "
            f"Set {INTERPRET_ENV_VAR}=1 to run them in Triton's interpreter (slow; for tests), "
            "or choose another kernel (use_kernel('pytorch'))."
        )
    return interpret


@dataclass
class _Tokens:
    """What the kernels read of a batch, from either layout: segments, per-token inputs, a length bound."""

    seg_offsets: torch.Tensor  # [S+1] int64: token where each segment starts, then the total
    flags: torch.Tensor | None  # [T] int8: query tokens
    positions: torch.Tensor | None  # [T] int64 (position bias only)
    times: torch.Tensor | None  # [T] int64 (time bias only)
    query_times: torch.Tensor | None  # [T] int64 (time bias only)
    default_positions: bool  # positions are each token's index in its segment (the position gradient by diagonals)
    max_len: int  # bound on segment lengths: sizes the grid


def _time_bucket_of(relative_bias: RelativeBias, gaps: torch.Tensor) -> torch.Tensor:
    """The bias module's own time bucket of each gap `[N]` (pairs of 2-token blocks: query time 0, key time gap)."""
    zeros = torch.zeros_like(gaps)
    times = torch.stack([zeros, gaps], dim=1)
    _, time_index = relative_bias.pair_indices(torch.zeros_like(times), times, torch.zeros_like(times))
    return time_index[:, 0, 1]


@torch._dynamo.assume_constant_result
def time_thresholds(relative_bias: RelativeBias, num_buckets: int) -> tuple[int, ...]:
    """The smallest gap of each of the `num_buckets + 1` time buckets (bisecting the bias module), then a sentinel.

    A constant of the bias config, computed once on CPU with real tensors even while a graph is
    traced (torch.compile calls it as a constant; under torch.export the tracing modes are set aside).
    """
    key = (relative_bias.index_key(), num_buckets)
    if key not in _threshold_cache:
        # (No torch.no_grad here: export would record the grad-mode switch as an empty region; nothing needs grad.)
        with _disable_current_modes():
            wanted = torch.arange(num_buckets + 1)
            low = torch.zeros(num_buckets + 1, dtype=torch.int64)
            high = torch.full((num_buckets + 1,), _INT64_MAX, dtype=torch.int64)
            for _ in range(64):  # buckets never decrease with the gap: bisect over all of int64
                mid = low + (high - low) // 2
                reached = _time_bucket_of(relative_bias, mid) >= wanted
                high = torch.where(reached, mid, high)
                low = torch.where(reached, low, mid + 1)
            _threshold_cache[key] = tuple(low.tolist()) + (_INT64_MAX,)
    return _threshold_cache[key]


def _bias_tables(relative_bias: RelativeBias | None, heads: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(position table, time table), each `[1 or heads, entries]` or None when that bias is off."""
    if relative_bias is None:
        return None, None
    tables = []
    for name in ("position_weight", "time_weight"):
        if not hasattr(relative_bias, name):
            raise TypeError(
                f"jagged attention (Kernel.TRITON): relative_bias needs the tables of RelativeAttentionBias "
                f"(position_weight, time_weight, time_bucket_base); {type(relative_bias).__name__} has no {name}"
            )
        table = getattr(relative_bias, name)
        if table is not None and (table.dim() != 2 or table.shape[0] not in (1, heads)):
            raise ValueError(
                f"jagged attention (Kernel.TRITON): relative_bias.{name} must be [1 or {heads} heads, entries], "
                f"got {tuple(table.shape)}"
            )
        tables.append(table)
    return tables[0], tables[1]


def _tokens_of_layout(layout: JaggedAttentionLayout, device: torch.device, num_tokens: int) -> _Tokens:
    """From a bucketed layout (built on the host): its segment lengths and its longest segment."""
    given = layout.inputs
    if given is None:
        raise ValueError("jagged attention (Kernel.TRITON): needs a layout from build_attention_layout")
    lengths = layout.segment_lengths.to(device=device, dtype=torch.int64)
    seg_offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    default_positions = given.positions is None
    if default_positions:
        starts = torch.repeat_interleave(seg_offsets[:-1], lengths, output_size=num_tokens)
        positions = torch.arange(num_tokens, device=device) - starts
    else:
        positions = given.positions.to(device=device, dtype=torch.int64).contiguous()
    as_int64 = lambda t: t.to(device=device, dtype=torch.int64).contiguous() if t is not None else None  # noqa: E731
    return _Tokens(
        seg_offsets=seg_offsets,
        flags=given.query_flags.to(device=device, dtype=torch.int8).contiguous()
        if given.query_flags is not None else None,
        positions=positions, times=as_int64(given.timestamps), query_times=as_int64(given.query_timestamps),
        default_positions=default_positions, max_len=max((b.max_len for b in layout.buckets), default=1),
    )


def _tokens_of_segments(segments: TritonSegments) -> _Tokens:
    """From device-built segments: nothing read on the host."""
    return _Tokens(
        seg_offsets=segments.seg_offsets, flags=segments.query_flags, positions=segments.positions,
        times=segments.timestamps, query_times=segments.query_timestamps,
        default_positions=segments.default_positions, max_len=segments.max_len,
    )


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    normaliser: Normaliser,
    layout: JaggedAttentionLayout | TritonSegments | None = None,
    segment_ids: torch.Tensor | None = None,
    query_flags: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    relative_bias: RelativeBias | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
) -> torch.Tensor:
    """HSTU attention of jagged `q, k [T, H, Dqk]`, `v [T, H, Dv]`; returns `[T, H, Dv]` in v's dtype.

    Arguments as ``jagged_causal_attention(kind="hstu")``: `offsets` and the per-token inputs,
    or a prebuilt `layout`: a ``JaggedAttentionLayout``, or ``TritonSegments`` (built on the
    device, ``build_triton_segments``: then nothing is read on the host, so the call compiles
    and exports). `relative_bias` must hold RelativeAttentionBias's tables (`position_weight`,
    `time_weight`: `[1 or H, entries]` or None) and `time_bucket_base`.
    `interpret`: run in Triton's interpreter; default: the TRITON_INTERPRET environment variable.
    """
    check_qkv(q, k, v)
    check_kind("hstu", normaliser)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"jagged attention (Kernel.TRITON): q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if layout is None:
        if offsets is None:
            raise ValueError("jagged attention: give offsets or a prebuilt layout")
        layout = build_attention_layout(
            offsets, segment_ids=segment_ids, query_flags=query_flags, positions=positions, timestamps=timestamps,
            query_timestamps=query_timestamps,
        )
    elif any(t is not None for t in (segment_ids, query_flags, positions, timestamps, query_timestamps)):
        raise ValueError(
            "jagged attention: with a prebuilt layout, pass segments/flags/positions/timestamps to the layout"
        )
    if isinstance(layout, TritonSegments):
        torch._check(q.shape[0] == layout.num_tokens, lambda: "jagged attention: q and the segments differ in tokens")
        tokens = _tokens_of_segments(layout)
    else:
        if q.shape[0] != layout.num_tokens:
            raise ValueError(
                f"jagged attention: q has {q.shape[0]} tokens but the offsets describe {layout.num_tokens}"
            )
        if q.shape[0] == 0:
            return v.new_zeros(0, q.shape[1], v.shape[2])
        tokens = _tokens_of_layout(layout, q.device, q.shape[0])
    if scale is None:
        scale = default_scale("hstu", q.shape[2])
    interpret = _resolve_interpret(q.device, interpret)
    pos_table, time_table = _bias_tables(relative_bias, q.shape[1])
    thresholds: tuple[int, ...] = ()
    inv_log2_base = 1.0
    times = query_times = None
    if time_table is not None:
        if tokens.times is None:
            raise ValueError("RelativeAttentionBias: use_time_bias is on but timestamps is None")
        base = getattr(relative_bias, "time_bucket_base", None)
        if base is None:
            raise TypeError(
                "jagged attention (Kernel.TRITON): a relative bias with a time table needs time_bucket_base "
                f"(the log base of its time buckets, as RelativeAttentionBias); {type(relative_bias).__name__} has none"
            )
        thresholds = time_thresholds(relative_bias, time_table.shape[1] - 1)
        inv_log2_base = 1.0 / math.log2(float(base))
        times = tokens.times
        query_times = tokens.query_times if tokens.query_times is not None else times
    by_length = normaliser == "length"
    tables = [t.contiguous() if t is not None else None for t in (pos_table, time_table)]
    return hstu_attention_op(
        q, k, v, tokens.seg_offsets, tokens.flags, tokens.positions if pos_table is not None else None,
        times, query_times, *tables, list(thresholds), tokens.max_len, float(scale),
        1.0 if by_length else float(normaliser), by_length, inv_log2_base, tokens.default_positions, interpret,
    )
