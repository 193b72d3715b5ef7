"""The Triton HSTU attention kernels as PyTorch custom operators: ``lumrec::hstu_attention`` and its backward.

As operators (``torch.library.custom_op``) with fake implementations, the kernels are one opaque
node each to ``torch.compile`` (no graph break) and ``torch.export`` (one call in the exported
graph), and their launch reads no tensor value on the host: the grid comes from tensor sizes and
the `max_len` bound given (the kernels loop over blocks beyond the grid, so any bound is correct).
``register_autograd`` makes ``lumrec::hstu_attention_backward`` the gradient of the forward.

Arguments (both ops): `q, k [T, H, Dqk]`, `v [T, H, Dv]`; `seg_offsets [S+1]` int64, where each
segment starts (segments past the last token are empty); per token `flags` (int8, query tokens),
`positions`, `times`, `query_times` (int64) or None; the bias tables `pos_table`, `time_table`
`[1 or H, entries]` or None; `thresholds`, the smallest gap of every time bucket then a sentinel
(``hstu_attention.time_thresholds``); `max_len`, a bound on segment lengths that sizes the grid;
`scale`, `norm` (the constant normaliser) or `norm_by_length`; `inv_log2_base` of the time buckets;
`default_positions` (positions are each token's index in its segment); `interpret`: run the
kernels in Triton's interpreter (CPU tensors) rather than compiled (CUDA tensors).

The implementations launch the kernels of ``hstu_kernels.py``, each mode loaded once as its own
module (triton binds its standard library to the mode it is imported in).

Example (CPU tensors, so the interpreter; no bias, normaliser 3)::

    >>> import torch
    >>> q = torch.ones(3, 1, 4)
    >>> out = torch.ops.lumrec.hstu_attention(q, q, q, torch.tensor([0, 3]), None, None, None, None, None, None,
    ...                                       [], 3, 1.0, 3.0, False, 1.0, True, True)
    >>> out.shape, round(float(out[2, 0, 0]), 4)            # row 2 sees 3 keys: 3 * silu(4) / 3
    (torch.Size([3, 1, 4]), 3.9281)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

__all__ = ["INTERPRET_ENV_VAR", "hstu_attention_backward_op", "hstu_attention_op", "triton_interpret_requested"]

INTERPRET_ENV_VAR = "TRITON_INTERPRET"
_KERNELS_FILE = Path(__file__).with_name("hstu_kernels.py")
_TIME_WINDOW = 4  # time buckets per tile whose gradient is summed in the tile before one atomic add
_loaded: dict[bool, ModuleType] = {}
_device_thresholds: dict[tuple, torch.Tensor] = {}


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


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (as ``triton.cdiv``; kept here so that this file loads without triton)."""
    return -(-a // b)


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


class _Call:
    """One launch's tensors and constants, from the operator's arguments (all on the kernels' device)."""

    def __init__(self, q, v, seg_offsets, flags, positions, times, query_times, pos_table, time_table, thresholds,
                 max_len, scale, norm, norm_by_length, inv_log2_base, default_positions, interpret) -> None:
        if not interpret and q.device.type != "cuda":
            raise RuntimeError(
                f"jagged attention (Kernel.TRITON): the Triton kernels need CUDA tensors, got tensors on {q.device}. "
                f"Set {INTERPRET_ENV_VAR}=1 to run them in Triton's interpreter (slow; for tests), "
                "or choose another kernel (use_kernel('pytorch'))."
            )
        self.kernels = _kernels(interpret)
        self.interpret = interpret
        self.seg_offsets = seg_offsets
        self.num_segments = seg_offsets.numel() - 1
        # No segment is longer than all the tokens: a smaller grid when the bound is loose.
        self.max_len = max(min(int(max_len), q.shape[0]), 1)
        self.pos_table, self.time_table = pos_table, time_table
        self.default_positions = default_positions
        dummy = seg_offsets  # an absent input is replaced by any tensor (its constexpr flag is off)
        self.pointers = [seg_offsets] + [t if t is not None else dummy for t in (
            flags, positions, times, query_times, self._thresholds(thresholds, q.device), pos_table, time_table)]
        max_rel = (pos_table.shape[1] - 1) // 2 if pos_table is not None else 0
        num_buckets = time_table.shape[1] - 1 if time_table is not None else 0
        self.scalars = [q.shape[1], q.shape[2], v.shape[2], float(scale), 1.0 if norm_by_length else float(norm),
                        max_rel, num_buckets, float(inv_log2_base)]
        tl = self.kernels.tl
        tf32 = q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpret
        self.constants = dict(
            HAS_FLAGS=flags is not None, USE_POS=pos_table is not None, USE_TIME=time_table is not None,
            NORM_BY_LENGTH=norm_by_length, ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
            PRECISION="tf32" if tf32 or q.dtype in (torch.bfloat16, torch.float16) else "ieee",
        )
        self.head_strides = [_head_stride(pos_table), _head_stride(time_table)]

    @staticmethod
    def _thresholds(thresholds: list[int], device: torch.device) -> torch.Tensor | None:
        """The time-bucket thresholds on the device, copied there once per bias config."""
        if not thresholds:
            return None
        key = (tuple(thresholds), str(device))
        if key not in _device_thresholds:
            host = torch.tensor(thresholds, dtype=torch.int64)
            # Pinned and non-blocking on CUDA: a pageable copy would synchronise the stream.
            on_device = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
            _device_thresholds[key] = on_device
        return _device_thresholds[key]

    def grid(self, heads: int, block: int) -> tuple[int, int]:
        return self.num_segments * heads, _cdiv(self.max_len, block)


def _head_stride(table: torch.Tensor | None) -> int:
    """0 for a table shared by all heads (one row), else its row stride."""
    return 0 if table is None or table.shape[0] == 1 else table.stride(0)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index tokens and heads by stride but read the feature dimension densely."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("lumrec::hstu_attention", mutates_args=())
def hstu_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_offsets: torch.Tensor,
    flags: Optional[torch.Tensor], positions: Optional[torch.Tensor], times: Optional[torch.Tensor],
    query_times: Optional[torch.Tensor], pos_table: Optional[torch.Tensor], time_table: Optional[torch.Tensor],
    thresholds: list[int], max_len: int, scale: float, norm: float, norm_by_length: bool, inv_log2_base: float,
    default_positions: bool, interpret: bool,
) -> torch.Tensor:
    """HSTU attention `[T, H, Dv]` (v's dtype) by the forward kernel; arguments in the module docstring."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=v.device)
    if q.shape[0] == 0:
        return out
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    call = _Call(q, v, seg_offsets, flags, positions, times, query_times, pos_table, time_table, thresholds,
                 max_len, scale, norm, norm_by_length, inv_log2_base, default_positions, interpret)
    tiles = _tiles(q.shape[2], v.shape[2], interpret)
    call.kernels.hstu_forward[call.grid(q.shape[1], tiles["BLOCK_M"])](
        q, k, v, out, *call.pointers,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *call.head_strides, *call.scalars, **call.constants, **tiles,
    )
    return out


@hstu_attention_op.register_fake
def _hstu_attention_fake(q, k, v, seg_offsets, flags, positions, times, query_times, pos_table, time_table,
                         thresholds, max_len, scale, norm, norm_by_length, inv_log2_base, default_positions,
                         interpret):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype)


@torch.library.custom_op("lumrec::hstu_attention_backward", mutates_args=())
def hstu_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_offsets: torch.Tensor,
    flags: Optional[torch.Tensor], positions: Optional[torch.Tensor], times: Optional[torch.Tensor],
    query_times: Optional[torch.Tensor], pos_table: Optional[torch.Tensor], time_table: Optional[torch.Tensor],
    thresholds: list[int], max_len: int, scale: float, norm: float, norm_by_length: bool, inv_log2_base: float,
    default_positions: bool, interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d pos_table, d time_table); a table's gradient is empty `[0]` where the table is None."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Bias-table gradients are summed atomically in the accumulator type, then cast to each table's dtype.
    dpos = torch.zeros_like(pos_table, dtype=acc) if pos_table is not None else None
    dtime = torch.zeros_like(time_table, dtype=acc) if time_table is not None else None
    if q.shape[0] > 0:
        q, k, v, dout = (_last_dim_contiguous(x) for x in (q, k, v, dout))
        call = _Call(q, v, seg_offsets, flags, positions, times, query_times, pos_table, time_table, thresholds,
                     max_len, scale, norm, norm_by_length, inv_log2_base, default_positions, interpret)
        tiles = _tiles(q.shape[2], v.shape[2], interpret)
        heads = q.shape[1]
        strides = [q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   dout.stride(0), dout.stride(1)]
        square = _tiles(q.shape[2], v.shape[2], interpret, square=default_positions)
        call.kernels.hstu_backward_dkdv[call.grid(heads, square["BLOCK_N"])](
            q, k, v, dout, dk, dv, dpos if dpos is not None else dk, dtime if dtime is not None else dk,
            *call.pointers, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            *call.head_strides, *call.scalars, **call.constants, **square,
            DEFAULT_POS=default_positions, TIME_WINDOW=_TIME_WINDOW,
        )
        call.kernels.hstu_backward_dq[call.grid(heads, tiles["BLOCK_M"])](
            q, k, v, dout, dq, *call.pointers, *strides, dq.stride(0), dq.stride(1),
            *call.head_strides, *call.scalars, **call.constants, **tiles,
        )
    dpos = dpos.to(pos_table.dtype) if dpos is not None else q.new_empty(0)
    dtime = dtime.to(time_table.dtype) if dtime is not None else q.new_empty(0)
    return dq, dk, dv, dpos, dtime


@hstu_attention_backward_op.register_fake
def _hstu_attention_backward_fake(dout, q, k, v, seg_offsets, flags, positions, times, query_times, pos_table,
                                  time_table, thresholds, max_len, scale, norm, norm_by_length, inv_log2_base,
                                  default_positions, interpret):
    dpos = torch.empty_like(pos_table) if pos_table is not None else q.new_empty(0)
    dtime = torch.empty_like(time_table) if time_table is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos, dtime


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:10])  # q, k, v, seg_offsets, the per-token inputs and the two tables
    ctx.constants = inputs[10:]


def _backward(ctx, dout):
    q, k, v, seg_offsets, flags, positions, times, query_times, pos_table, time_table = ctx.saved_tensors
    dq, dk, dv, dpos, dtime = hstu_attention_backward_op(
        dout, q, k, v, seg_offsets, flags, positions, times, query_times, pos_table, time_table, *ctx.constants
    )
    tables = (dpos if pos_table is not None else None, dtime if time_table is not None else None)
    return (dq, dk, dv) + (None,) * 5 + tables + (None,) * len(ctx.constants)


hstu_attention_op.register_autograd(_backward, setup_context=_setup_context)
