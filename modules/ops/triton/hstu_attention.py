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
depend on when triton was first imported.

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

import contextlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from lumrec.modules.ops.attention_args import Normaliser, RelativeBias, check_kind, check_qkv, default_scale
from lumrec.modules.ops.layout import JaggedAttentionLayout, build_attention_layout

__all__ = ["INTERPRET_ENV_VAR", "triton_hstu_attention", "triton_interpret_requested"]

INTERPRET_ENV_VAR = "TRITON_INTERPRET"
_KERNELS_FILE = Path(__file__).with_name("hstu_kernels.py")
_INT64_MAX = torch.iinfo(torch.int64).max
_TIME_WINDOW = 4  # time buckets per tile whose gradient is summed in the tile before one atomic add
_loaded: dict[bool, ModuleType] = {}
_threshold_cache: dict[tuple, torch.Tensor] = {}


def triton_interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's interpreter (1, true, yes, on)."""
    return os.environ.get(INTERPRET_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _interpret_env(interpret: bool) -> Iterator[None]:
    """Set TRITON_INTERPRET for the block: ``triton.jit`` reads it when it decorates a kernel."""
    before = os.environ.get(INTERPRET_ENV_VAR)
    os.environ[INTERPRET_ENV_VAR] = "1" if interpret else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[INTERPRET_ENV_VAR]
        else:
            os.environ[INTERPRET_ENV_VAR] = before


def _kernels(interpret: bool) -> ModuleType:
    """The kernel module, compiled or interpreted; each mode is loaded once, as its own module."""
    if interpret not in _loaded:
        # triton itself is imported under the process's own setting (its standard library binds to it);
        # only the kernel file is decorated under the mode asked for.
        importlib.import_module("triton")
        name = f"{__package__}.hstu_kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, _KERNELS_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton looks kernels' modules up by name
        with _interpret_env(interpret):
            spec.loader.exec_module(module)
        _loaded[interpret] = module
    return _loaded[interpret]


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
class _Launch:
    """What the three kernels read in one call: per-token tensors, grid sizes, constants and the kernel module."""

    seg_offsets: torch.Tensor  # [S+1] int64: token where each segment starts, then the total
    flags: torch.Tensor | None  # [T] int8: query tokens
    positions: torch.Tensor | None  # [T] int64 (position bias only)
    times: torch.Tensor | None  # [T] int64 (time bias only)
    query_times: torch.Tensor | None  # [T] int64 (time bias only)
    thresholds: torch.Tensor | None  # [num_buckets + 2] int64 (time bias only)
    default_positions: bool  # positions are each token's index in its segment (the position gradient by diagonals)
    num_segments: int
    max_len: int
    scale: float
    norm: float
    norm_by_length: bool
    max_rel: int
    num_buckets: int
    inv_log2_base: float
    interpret: bool
    kernels: ModuleType


def _time_bucket_of(relative_bias: RelativeBias, gaps: torch.Tensor) -> torch.Tensor:
    """The bias module's own time bucket of each gap `[N]` (pairs of 2-token blocks: query time 0, key time gap)."""
    zeros = torch.zeros_like(gaps)
    times = torch.stack([zeros, gaps], dim=1)
    _, time_index = relative_bias.pair_indices(torch.zeros_like(times), times, torch.zeros_like(times))
    return time_index[:, 0, 1]


def _time_thresholds(relative_bias: RelativeBias, num_buckets: int, device: torch.device) -> torch.Tensor:
    """`[num_buckets + 2]`: the smallest gap of each bucket (binary search on the bias module), then a sentinel."""
    key = (relative_bias.index_key(), num_buckets, str(device))
    if key not in _threshold_cache:
        wanted = torch.arange(num_buckets + 1)
        low = torch.zeros(num_buckets + 1, dtype=torch.int64)
        high = torch.full((num_buckets + 1,), _INT64_MAX, dtype=torch.int64)
        for _ in range(64):  # buckets never decrease with the gap: bisect over all of int64
            mid = low + (high - low) // 2
            reached = _time_bucket_of(relative_bias, mid) >= wanted
            high = torch.where(reached, mid, high)
            low = torch.where(reached, low, mid + 1)
        sentinel = torch.tensor([_INT64_MAX], dtype=torch.int64)
        _threshold_cache[key] = torch.cat([low, sentinel]).to(device)
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


def _launch_setup(
    q: torch.Tensor,
    layout: JaggedAttentionLayout,
    relative_bias: RelativeBias | None,
    pos_table: torch.Tensor | None,
    time_table: torch.Tensor | None,
    normaliser: Normaliser,
    scale: float,
    interpret: bool,
) -> _Launch:
    """Per-token tensors and constants of one call, from the layout (no host synchronisation beyond it)."""
    given = layout.inputs
    if given is None:
        raise ValueError("jagged attention (Kernel.TRITON): needs a layout from build_attention_layout")
    device = q.device
    num_tokens = q.shape[0]
    lengths = layout.segment_lengths.to(device=device, dtype=torch.int64)
    seg_offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    positions = times = query_times = thresholds = None
    num_buckets, inv_log2_base, max_rel = 0, 1.0, 0
    default_positions = given.positions is None
    if pos_table is not None:
        if not default_positions:
            positions = given.positions.to(device=device, dtype=torch.int64).contiguous()
        else:
            starts = torch.repeat_interleave(seg_offsets[:-1], lengths, output_size=num_tokens)
            positions = torch.arange(num_tokens, device=device) - starts
        max_rel = (pos_table.shape[1] - 1) // 2
    if time_table is not None:
        if given.timestamps is None:
            raise ValueError("RelativeAttentionBias: use_time_bias is on but timestamps is None")
        times = given.timestamps.to(device=device, dtype=torch.int64).contiguous()
        query_times = times
        if given.query_timestamps is not None:
            query_times = given.query_timestamps.to(device=device, dtype=torch.int64).contiguous()
        base = getattr(relative_bias, "time_bucket_base", None)
        if base is None:
            raise TypeError(
                "jagged attention (Kernel.TRITON): a relative bias with a time table needs time_bucket_base "
                f"(the log base of its time buckets, as RelativeAttentionBias); {type(relative_bias).__name__} has none"
            )
        num_buckets = time_table.shape[1] - 1
        thresholds = _time_thresholds(relative_bias, num_buckets, device)
        inv_log2_base = 1.0 / math.log2(float(base))
    flags = given.query_flags.to(device=device, dtype=torch.int8).contiguous() if given.query_flags is not None else None
    by_length = normaliser == "length"
    return _Launch(
        seg_offsets=seg_offsets, flags=flags, positions=positions, times=times, query_times=query_times,
        thresholds=thresholds, default_positions=default_positions, num_segments=lengths.numel(), max_len=max((b.max_len for b in layout.buckets), default=0),
        scale=float(scale), norm=1.0 if by_length else float(normaliser), norm_by_length=by_length, max_rel=max_rel,
        num_buckets=num_buckets, inv_log2_base=inv_log2_base, interpret=interpret, kernels=_kernels(interpret),
    )


def _tiles(dqk: int, dv: int, interpret: bool, square: bool = False) -> dict:
    """Tile sizes and launch options; the interpreter runs the smallest tiles tl.dot accepts (fewer numpy ops).

    `square`: BLOCK_M == BLOCK_N (the dk/dv kernel's position gradient by tile diagonals needs it).
    """
    block_dqk = max(16, 1 << (dqk - 1).bit_length())
    block_dv = max(16, 1 << (dv - 1).bit_length())
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv)
    block_n = 64 if max(block_dqk, block_dv) <= 128 else 32
    return dict(BLOCK_M=block_n if square else 64, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
                num_warps=4 if block_n == 64 else 8, num_stages=2)


def _constants(launch: _Launch, dtype: torch.dtype) -> dict:
    """Compile-time flags: which inputs exist, accumulator type and the matmul precision."""
    tl = launch.kernels.tl
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not launch.interpret
    return dict(
        HAS_FLAGS=launch.flags is not None, USE_POS=launch.positions is not None, USE_TIME=launch.times is not None,
        NORM_BY_LENGTH=launch.norm_by_length, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        PRECISION="tf32" if tf32 or dtype in (torch.bfloat16, torch.float16) else "ieee",
    )


def _pointer_args(launch: _Launch, pos_table: torch.Tensor | None, time_table: torch.Tensor | None) -> list:
    """The per-token and table pointers; an absent one is replaced by any tensor (its constexpr flag is off)."""
    dummy = launch.seg_offsets
    return [
        launch.seg_offsets,
        launch.flags if launch.flags is not None else dummy,
        launch.positions if launch.positions is not None else dummy,
        launch.times if launch.times is not None else dummy,
        launch.query_times if launch.query_times is not None else dummy,
        launch.thresholds if launch.thresholds is not None else dummy,
        pos_table if pos_table is not None else dummy,
        time_table if time_table is not None else dummy,
    ]


def _head_stride(table: torch.Tensor | None) -> int:
    """0 for a table shared by all heads (one row), else its row stride."""
    return 0 if table is None or table.shape[0] == 1 else table.stride(0)


def _scalars(launch: _Launch, q: torch.Tensor, v: torch.Tensor) -> list:
    return [q.shape[1], q.shape[2], v.shape[2], launch.scale, launch.norm, launch.max_rel, launch.num_buckets,
            launch.inv_log2_base]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index tokens and heads by stride but read the feature dimension densely."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _HSTUAttention(torch.autograd.Function):
    """Autograd wrapper: forward kernel, then dk/dv (+ bias tables) and dq kernels in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, pos_table, time_table, launch: _Launch):  # type: ignore[override]
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=v.device)
        tiles = _tiles(q.shape[2], v.shape[2], launch.interpret)
        grid = (launch.num_segments * q.shape[1], _cdiv(launch.max_len, tiles["BLOCK_M"]))
        launch.kernels.hstu_forward[grid](
            q, k, v, out, *_pointer_args(launch, pos_table, time_table),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            _head_stride(pos_table), _head_stride(time_table), *_scalars(launch, q, v),
            **_constants(launch, q.dtype), **tiles,
        )
        ctx.save_for_backward(q, k, v, pos_table, time_table)
        ctx.launch = launch
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, pos_table, time_table = ctx.saved_tensors
        launch: _Launch = ctx.launch
        dout = _last_dim_contiguous(dout)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Bias-table gradients are summed atomically in the accumulator type, then cast to each table's dtype.
        dpos = torch.zeros_like(pos_table, dtype=acc) if pos_table is not None else None
        dtime = torch.zeros_like(time_table, dtype=acc) if time_table is not None else None
        tiles = _tiles(q.shape[2], v.shape[2], launch.interpret)
        constants = _constants(launch, q.dtype)
        pointers = _pointer_args(launch, pos_table, time_table)
        heads = q.shape[1]
        strides = [q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   dout.stride(0), dout.stride(1)]
        square = _tiles(q.shape[2], v.shape[2], launch.interpret, square=launch.default_positions)
        grid_n = (launch.num_segments * heads, _cdiv(launch.max_len, square["BLOCK_N"]))
        launch.kernels.hstu_backward_dkdv[grid_n](
            q, k, v, dout, dk, dv, dpos if dpos is not None else dk, dtime if dtime is not None else dk, *pointers,
            *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            _head_stride(pos_table), _head_stride(time_table), *_scalars(launch, q, v), **constants, **square,
            DEFAULT_POS=launch.default_positions, TIME_WINDOW=_TIME_WINDOW,
        )
        grid_m = (launch.num_segments * heads, _cdiv(launch.max_len, tiles["BLOCK_M"]))
        launch.kernels.hstu_backward_dq[grid_m](
            q, k, v, dout, dq, *pointers, *strides, dq.stride(0), dq.stride(1),
            _head_stride(pos_table), _head_stride(time_table), *_scalars(launch, q, v), **constants, **tiles,
        )
        dpos = dpos.to(pos_table.dtype) if dpos is not None else None
        dtime = dtime.to(time_table.dtype) if dtime is not None else None
        return dq, dk, dv, dpos, dtime, None


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (as ``triton.cdiv``; kept here so that the wrapper loads without triton)."""
    return -(-a // b)


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    normaliser: Normaliser,
    layout: JaggedAttentionLayout | None = None,
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
    or a prebuilt `layout`. `relative_bias` must hold RelativeAttentionBias's tables
    (`position_weight`, `time_weight`: `[1 or H, entries]` or None) and `time_bucket_base`.
    `interpret`: run in Triton's interpreter; default: the TRITON_INTERPRET environment variable.
    """
    check_qkv(q, k, v)
    check_kind("hstu", normaliser)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"jagged attention (Kernel.TRITON): q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
    if q.shape[0] != layout.num_tokens:
        raise ValueError(f"jagged attention: q has {q.shape[0]} tokens but the offsets describe {layout.num_tokens}")
    if scale is None:
        scale = default_scale("hstu", q.shape[2])
    if q.shape[0] == 0:
        return v.new_zeros(0, q.shape[1], v.shape[2])
    interpret = _resolve_interpret(q.device, interpret)
    pos_table, time_table = _bias_tables(relative_bias, q.shape[1])
    launch = _launch_setup(q, layout, relative_bias, pos_table, time_table, normaliser, scale, interpret)
    tables = [t.contiguous() if t is not None else None for t in (pos_table, time_table)]
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _HSTUAttention.apply(q, k, v, *tables, launch)
