"""Triton kernels of jagged causal HSTU (SiLU) attention: forward, and the backward as two kernels.

Loaded by ``hstu_op`` (the custom operators that launch them; ``hstu_attention`` holds the docs),
once per mode: compiled for CUDA tensors, or run by Triton's interpreter on CPU; do not import this
file directly.

One program handles one block of rows (forward, dq) or of key columns (dk, dv, bias tables) of
one (segment, head), then every ``num_programs(1)``-th block after it: a grid sized from a bound
on segment lengths (the model's max_len, read from its config rather than from the data, so that
no host synchronisation is needed) still covers a longer segment. Segments are the jagged batch
cut at row starts and ``segment_ids`` changes, so attention never leaves a program's segment and
the causal loop bounds follow from the block.
Per pair (i, j) of a segment with `i` the query row and `j` the key column:

    allowed(i, j) = j <= i and (not query_flag[j] or i == j)
    s_ij = scale * q_i . k_j + pos_table[clamp(pos_i - pos_j)] + time_table[bucket(|t'_i - t_j|)]
    out_i = sum_j allowed(i, j) * silu(s_ij) * v_j / n

with `t'` the query times (the timestamps when none are given) and `n` the segment length or a
constant. The time bucket is found from a float32 `log2` guess, then corrected by one
comparison each way against `thresholds` (the smallest gap of every bucket, computed on the host
by the bias module's own bucketing), so kernel and reference never disagree at a bucket edge.
"""

import triton
import triton.language as tl

# Sizes that vary between models but gain nothing from specialisation: one compiled kernel serves them all.
_SIZES = ["num_heads", "dqk", "dv", "max_rel", "num_buckets"]


@triton.jit
def _sigmoid(x):
    """Written out: triton's own ``tl.sigmoid`` is bound to the mode triton was imported in."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _segment(SegOffsets, num_heads):
    """(first token, length, head) of this program's segment and head."""
    pid = tl.program_id(0)
    seg = pid // num_heads
    head = pid % num_heads
    start = tl.load(SegOffsets + seg)
    length = tl.load(SegOffsets + seg + 1) - start
    return start, length, head


@triton.jit
def _allowed(Flags, start, length, offs_m, offs_n, HAS_FLAGS: tl.constexpr):
    """Mask of the (row, column) pairs that attend: causal inside the segment, query keys only on the diagonal."""
    rows = offs_m[:, None]
    cols = offs_n[None, :]
    allowed = (cols <= rows) & (rows < length)
    if HAS_FLAGS:
        flag = tl.load(Flags + start + offs_n, mask=offs_n < length, other=0)
        allowed = allowed & ((flag[None, :] == 0) | (cols == rows))
    return allowed


@triton.jit
def _position_index(Positions, start, length, offs_m, offs_n, max_rel):
    """Column of the position table of each pair: `clamp(pos_i - pos_j, -max_rel, max_rel) + max_rel`."""
    pos_m = tl.load(Positions + start + offs_m, mask=offs_m < length, other=0)
    pos_n = tl.load(Positions + start + offs_n, mask=offs_n < length, other=0)
    return _clamp_rel(pos_m[:, None] - pos_n[None, :], max_rel)


@triton.jit
def _clamp_rel(rel, max_rel):
    """Table column of a relative position: clipped to [-max_rel, max_rel], shifted to start at 0."""
    return (tl.minimum(tl.maximum(rel, -max_rel), max_rel) + max_rel).to(tl.int32)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add_diagonals(DTable, ds, offset, max_rel, BLOCK: tl.constexpr):
    """Position-table gradient of a square tile whose positions are the indices in the segment.

    Pair (a, b) of the tile has relative position `offset + a - b`, so the tile's contribution is
    its diagonal sums: 2 * BLOCK atomic adds instead of BLOCK**2 (which would queue on few rows).
    """
    a = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    # skewed[a, c] = ds[a, (a - c) mod BLOCK]: column c holds diagonal a - b = c where c <= a, c - BLOCK elsewhere.
    skewed = tl.gather(ds, (a - c + BLOCK) % BLOCK, axis=1)
    upper = tl.reduce(tl.where(c <= a, skewed, 0.0), 0, _add)
    lower = tl.reduce(tl.where(c > a, skewed, 0.0), 0, _add)
    t = tl.arange(0, BLOCK)
    tl.atomic_add(DTable + _clamp_rel(offset + t, max_rel), upper, sem="relaxed")
    tl.atomic_add(DTable + _clamp_rel(offset + t - BLOCK, max_rel), lower, mask=t > 0, sem="relaxed")


@triton.jit
def _add_by_bucket(DTable, ds, index, allowed, num_buckets, WINDOW: tl.constexpr):
    """Time-table gradient of a tile: its pairs fall in few buckets (gaps are log-bucketed), so the
    WINDOW buckets from the tile's lowest are summed here (one atomic add each), the rest pair by pair."""
    lowest = tl.reduce(tl.where(allowed, index, num_buckets + 1), None, _minimum)
    for w in tl.static_range(WINDOW):
        total = tl.reduce(tl.where(allowed & (index == lowest + w), ds, 0.0), None, _add)
        tl.atomic_add(DTable + lowest + w, total, mask=lowest + w <= num_buckets, sem="relaxed")
    tl.atomic_add(DTable + index, ds, mask=allowed & (index >= lowest + WINDOW), sem="relaxed")


@triton.jit
def _time_index(Times, QueryTimes, Thresholds, start, length, offs_m, offs_n, allowed, num_buckets, inv_log2_base):
    """Bucket of each pair's time gap `|t'_i - t_j|`: a float32 log guess, corrected against the exact thresholds."""
    t_m = tl.load(QueryTimes + start + offs_m, mask=offs_m < length, other=0)
    t_n = tl.load(Times + start + offs_n, mask=offs_n < length, other=0)
    gap = tl.abs(t_m[:, None] - t_n[None, :])
    guess = (tl.log2(gap.to(tl.float32) + 1.0) * inv_log2_base).to(tl.int32)
    guess = tl.minimum(tl.maximum(guess, 0), num_buckets)
    # The guess is off by at most one bucket (float32 log error << one bucket): one step down, one up.
    low = tl.load(Thresholds + guess, mask=allowed, other=0)
    guess = tl.where(gap < low, guess - 1, guess)
    high = tl.load(Thresholds + guess + 1, mask=allowed, other=0)
    guess = tl.where(allowed & (gap >= high), guess + 1, guess)
    return tl.minimum(tl.maximum(guess, 0), num_buckets)


@triton.jit
def _scores(
    q, k, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
    start, length, head, offs_m, offs_n, stride_pos_h, stride_time_h,
    scale, max_rel, num_buckets, inv_log2_base,
    HAS_FLAGS: tl.constexpr, USE_POS: tl.constexpr, USE_TIME: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Biased scores `s [BLOCK_M, BLOCK_N]` of a tile, its mask, and the table columns of its pairs."""
    s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PRECISION) * scale
    allowed = _allowed(Flags, start, length, offs_m, offs_n, HAS_FLAGS)
    pos_index = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    time_index = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    if USE_POS:
        pos_index = _position_index(Positions, start, length, offs_m, offs_n, max_rel)
        s += tl.load(PosTable + head * stride_pos_h + pos_index, mask=allowed, other=0.0).to(ACC)
    if USE_TIME:
        time_index = _time_index(
            Times, QueryTimes, Thresholds, start, length, offs_m, offs_n, allowed, num_buckets, inv_log2_base
        )
        s += tl.load(TimeTable + head * stride_time_h + time_index, mask=allowed, other=0.0).to(ACC)
    return s, allowed, pos_index, time_index


@triton.jit
def _norm(length, norm, NORM_BY_LENGTH: tl.constexpr, ACC: tl.constexpr):
    """n: the segment's own length, or the constant the caller gave (divided by, as the reference does)."""
    if NORM_BY_LENGTH:
        n = length.to(ACC)
    else:
        n = (length * 0).to(ACC) + norm  # both branches of the accumulator's type (norm arrives as float32)
    return n


@triton.jit(do_not_specialize=_SIZES)
def hstu_forward(
    Q, K, V, Out, SegOffsets, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pos_h, stride_time_h,
    num_heads, dqk, dv, scale, norm, max_rel, num_buckets, inv_log2_base,
    HAS_FLAGS: tl.constexpr, USE_POS: tl.constexpr, USE_TIME: tl.constexpr, NORM_BY_LENGTH: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """`out` rows [m0, m0 + BLOCK_M) of one (segment, head): keys up to the block's last row."""
    start, length, head = _segment(SegOffsets, num_heads)
    for m0 in range(tl.program_id(1) * BLOCK_M, length, tl.num_programs(1) * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        rows = (start + offs_m)[:, None]
        mask_m = offs_m < length
        q = tl.load(Q + rows * stride_qt + head * stride_qh + offs_dqk[None, :],
                    mask=mask_m[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
        acc = tl.full((BLOCK_M, BLOCK_DV), 0, ACC)
        for n0 in range(0, tl.minimum(length, m0 + BLOCK_M), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            cols = (start + offs_n)[:, None]
            mask_n = offs_n < length
            k = tl.load(K + cols * stride_kt + head * stride_kh + offs_dqk[None, :],
                        mask=mask_n[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
            v = tl.load(V + cols * stride_vt + head * stride_vh + offs_dv[None, :],
                        mask=mask_n[:, None] & (offs_dv[None, :] < dv), other=0.0)
            s, allowed, _, _ = _scores(
                q, k, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
                start, length, head, offs_m, offs_n, stride_pos_h, stride_time_h,
                scale, max_rel, num_buckets, inv_log2_base,
                HAS_FLAGS, USE_POS, USE_TIME, ACC, PRECISION, BLOCK_M, BLOCK_N,
            )
            p = tl.where(allowed, s * _sigmoid(s), 0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=ACC, input_precision=PRECISION)
        acc = acc / _norm(length, norm, NORM_BY_LENGTH, ACC)
        tl.store(Out + rows * stride_ot + head * stride_oh + offs_dv[None, :], acc.to(Out.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_dv[None, :] < dv))


@triton.jit(do_not_specialize=_SIZES)
def hstu_backward_dkdv(
    Q, K, V, DOut, DK, DV, DPosTable, DTimeTable,
    SegOffsets, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_pos_h, stride_time_h,
    num_heads, dqk, dv, scale, norm, max_rel, num_buckets, inv_log2_base,
    HAS_FLAGS: tl.constexpr, USE_POS: tl.constexpr, USE_TIME: tl.constexpr, NORM_BY_LENGTH: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DEFAULT_POS: tl.constexpr, TIME_WINDOW: tl.constexpr,
):
    """dk, dv of key columns [n0, n0 + BLOCK_N) of one (segment, head), over the rows at or after them.

    The bias tables' gradients (the pairs' `ds`) are added atomically: every pair is visited by
    exactly one program of this kernel. DEFAULT_POS (positions = index in segment; needs
    BLOCK_M == BLOCK_N) adds the position gradient by tile diagonals; TIME_WINDOW buckets per
    tile are summed before their atomic add.
    """
    start, length, head = _segment(SegOffsets, num_heads)
    for n0 in range(tl.program_id(1) * BLOCK_N, length, tl.num_programs(1) * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        cols = (start + offs_n)[:, None]
        mask_n = offs_n < length
        k = tl.load(K + cols * stride_kt + head * stride_kh + offs_dqk[None, :],
                    mask=mask_n[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
        v = tl.load(V + cols * stride_vt + head * stride_vh + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < dv), other=0.0)
        n = _norm(length, norm, NORM_BY_LENGTH, ACC)
        dk = tl.full((BLOCK_N, BLOCK_DQK), 0, ACC)
        dv_acc = tl.full((BLOCK_N, BLOCK_DV), 0, ACC)
        for m0 in range((n0 // BLOCK_M) * BLOCK_M, length, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows = (start + offs_m)[:, None]
            mask_m = offs_m < length
            q = tl.load(Q + rows * stride_qt + head * stride_qh + offs_dqk[None, :],
                        mask=mask_m[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
            do = tl.load(DOut + rows * stride_dot + head * stride_doh + offs_dv[None, :],
                         mask=mask_m[:, None] & (offs_dv[None, :] < dv), other=0.0)
            s, allowed, pos_index, time_index = _scores(
                q, k, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
                start, length, head, offs_m, offs_n, stride_pos_h, stride_time_h,
                scale, max_rel, num_buckets, inv_log2_base,
                HAS_FLAGS, USE_POS, USE_TIME, ACC, PRECISION, BLOCK_M, BLOCK_N,
            )
            sig = _sigmoid(s)
            p = tl.where(allowed, s * sig / n, 0.0)
            dv_acc = tl.dot(tl.trans(p.to(do.dtype)), do, dv_acc, out_dtype=ACC, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PRECISION)
            # d silu(s) / ds = sig * (1 + s * (1 - sig)); `ds` is also the gradient of the pair's bias.
            ds = tl.where(allowed, dp * sig * (1.0 + s * (1.0 - sig))  / n, 0.0)
            if USE_POS:
                if DEFAULT_POS:
                    _add_diagonals(DPosTable + head * stride_pos_h, ds, m0 - n0, max_rel, BLOCK_N)
                else:
                    tl.atomic_add(DPosTable + head * stride_pos_h + pos_index, ds, mask=allowed, sem="relaxed")
            if USE_TIME:
                _add_by_bucket(DTimeTable + head * stride_time_h, ds, time_index, allowed, num_buckets, TIME_WINDOW)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, out_dtype=ACC, input_precision=PRECISION)
        tl.store(DK + cols * stride_dkt + head * stride_dkh + offs_dqk[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_dqk[None, :] < dqk))
        tl.store(DV + cols * stride_dvt + head * stride_dvh + offs_dv[None, :], dv_acc.to(DV.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_dv[None, :] < dv))


@triton.jit(do_not_specialize=_SIZES)
def hstu_backward_dq(
    Q, K, V, DOut, DQ,
    SegOffsets, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_pos_h, stride_time_h,
    num_heads, dqk, dv, scale, norm, max_rel, num_buckets, inv_log2_base,
    HAS_FLAGS: tl.constexpr, USE_POS: tl.constexpr, USE_TIME: tl.constexpr, NORM_BY_LENGTH: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq of rows [m0, m0 + BLOCK_M) of one (segment, head): the forward's loop again, no atomics."""
    start, length, head = _segment(SegOffsets, num_heads)
    for m0 in range(tl.program_id(1) * BLOCK_M, length, tl.num_programs(1) * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        rows = (start + offs_m)[:, None]
        mask_m = offs_m < length
        q = tl.load(Q + rows * stride_qt + head * stride_qh + offs_dqk[None, :],
                    mask=mask_m[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
        do = tl.load(DOut + rows * stride_dot + head * stride_doh + offs_dv[None, :],
                     mask=mask_m[:, None] & (offs_dv[None, :] < dv), other=0.0)
        n = _norm(length, norm, NORM_BY_LENGTH, ACC)
        dq = tl.full((BLOCK_M, BLOCK_DQK), 0, ACC)
        for n0 in range(0, tl.minimum(length, m0 + BLOCK_M), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            cols = (start + offs_n)[:, None]
            mask_n = offs_n < length
            k = tl.load(K + cols * stride_kt + head * stride_kh + offs_dqk[None, :],
                        mask=mask_n[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
            v = tl.load(V + cols * stride_vt + head * stride_vh + offs_dv[None, :],
                        mask=mask_n[:, None] & (offs_dv[None, :] < dv), other=0.0)
            s, allowed, _, _ = _scores(
                q, k, Flags, Positions, Times, QueryTimes, Thresholds, PosTable, TimeTable,
                start, length, head, offs_m, offs_n, stride_pos_h, stride_time_h,
                scale, max_rel, num_buckets, inv_log2_base,
                HAS_FLAGS, USE_POS, USE_TIME, ACC, PRECISION, BLOCK_M, BLOCK_N,
            )
            sig = _sigmoid(s)
            dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PRECISION)
            ds = tl.where(allowed, dp * sig * (1.0 + s * (1.0 - sig))  / n, 0.0)
            dq = tl.dot(ds.to(k.dtype), k, dq, out_dtype=ACC, input_precision=PRECISION)
        tl.store(DQ + rows * stride_dqt + head * stride_dqh + offs_dqk[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_dqk[None, :] < dqk))
