"""Jagged causal attention and relative bias against the padded reference, plus hand-checked masks."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import lumrec.modules.ops.attention as attention_mod
import lumrec.modules.ops.jagged as jagged_mod
import lumrec.modules.ops.layout as layout_mod
import lumrec.modules.layers.relative_bias as relative_bias_mod
from lumrec.modules.ops import (
    build_attention_layout,
    jagged_causal_attention,
    jagged_causal_attention_reference,
    jagged_positions,
    jagged_to_padded_dense,
    lengths_to_offsets,
    offsets_to_ids,
    padded_dense_to_jagged,
)
from lumrec.modules.layers.relative_bias import RelativeAttentionBias, time_gap_buckets

MAX_LEN = 24
HEADS = 2

# (kind, normaliser) pairs covering softmax and both HSTU normalisers.
KINDS = [("softmax", None), ("hstu", float(MAX_LEN)), ("hstu", "length")]


def _batch(seed: int, dtype: torch.dtype, packed: bool, flags: str | None = None):
    """Random jagged batch: lengths 0, 1 and MAX_LEN always present; optional packing and query flags."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.tensor([0, 1, MAX_LEN]), torch.randint(0, MAX_LEN + 1, (4,), generator=gen)])
    lengths = lengths[torch.randperm(lengths.numel(), generator=gen)]
    offsets = lengths_to_offsets(lengths)
    total = int(offsets[-1])
    segment_ids = None
    if packed:
        # Ids restart at 0 in every row, so neighbouring rows share ids: the row boundary must still split.
        pieces = []
        for n in lengths.tolist():
            cuts = torch.rand(n, generator=gen) < 0.25
            if n:
                cuts[0] = False
            pieces.append(torch.cumsum(cuts.long(), 0))
        segment_ids = torch.cat(pieces)
    query_flags = None
    if flags == "random":
        query_flags = torch.rand(total, generator=gen) < 0.3
    elif flags == "tail":
        # LUM's grouped query: the last tokens of each segment (or row) are queries.
        seg = segment_ids if segment_ids is not None else offsets_to_ids(offsets, total)
        row = offsets_to_ids(offsets, total)
        is_last = torch.ones(total, dtype=torch.bool)
        is_last[:-1] = (seg[1:] != seg[:-1]) | (row[1:] != row[:-1])
        second_last = torch.zeros(total, dtype=torch.bool)
        second_last[:-1] = is_last[1:] & ~is_last[:-1]
        query_flags = is_last | (second_last & (torch.rand(total, generator=gen) < 0.7))
    timestamps = torch.cumsum(torch.randint(0, 5000, (total,), generator=gen), 0)
    head_dim, value_dim = 4, 3
    q = torch.randn(total, HEADS, head_dim, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(total, HEADS, head_dim, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(total, HEADS, value_dim, generator=gen, dtype=dtype).requires_grad_()
    rab = RelativeAttentionBias(max_len=MAX_LEN // 2, num_time_buckets=10, num_heads=HEADS).to(dtype)
    with torch.no_grad():  # larger than the init so the bias visibly matters
        rab.position_weight.normal_(generator=gen)
        rab.time_weight.normal_(generator=gen)
    return dict(
        q=q, k=k, v=v, offsets=offsets, segment_ids=segment_ids, query_flags=query_flags, timestamps=timestamps, rab=rab
    )


def _compare(b, kind, normaliser, dtype, use_rab=True, **fast_kwargs):
    """Run fast and reference on batch `b`; assert outputs and grads (q, k, v, rab tables) match."""
    rab = b["rab"] if use_rab else None
    common = dict(
        kind=kind,
        segment_ids=b["segment_ids"],
        query_flags=b["query_flags"],
        timestamps=b["timestamps"] if use_rab else None,
        query_timestamps=b.get("query_timestamps") if use_rab else None,
        relative_bias=rab,
        normaliser=normaliser,
    )
    fast = jagged_causal_attention(b["q"], b["k"], b["v"], b["offsets"], min_block=4, **common, **fast_kwargs)
    ref = jagged_causal_attention_reference(b["q"], b["k"], b["v"], b["offsets"], **common)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, ref, **tol)
    weight = torch.randn(fast.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    inputs = [b["q"], b["k"], b["v"]] + ([rab.position_weight, rab.time_weight] if use_rab else [])
    grads_fast = torch.autograd.grad((fast * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, gf, gr in zip(["q", "k", "v", "pos_table", "time_table"], grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    return fast


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,normaliser", KINDS)
def test_matches_reference(seed, packed, dtype, kind, normaliser):
    b = _batch(seed, dtype, packed)
    out = _compare(b, kind, normaliser, dtype)
    assert out.shape == b["v"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("flags", ["random", "tail"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind,normaliser", KINDS)
def test_query_flags_match_reference(flags, packed, kind, normaliser):
    b = _batch(11, torch.float64, packed, flags=flags)
    assert b["query_flags"].any()
    _compare(b, kind, normaliser, torch.float64)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind,normaliser", KINDS)
def test_query_timestamps_match_reference(packed, kind, normaliser):
    """Gaps measured from a per-query time (HSTU's request time) agree with the padded reference."""
    b = _batch(13, torch.float64, packed, flags="random")
    gen = torch.Generator().manual_seed(3)
    b["query_timestamps"] = b["timestamps"] + torch.randint(0, 20000, b["timestamps"].shape, generator=gen)
    with_query_times = _compare(b, kind, normaliser, torch.float64)
    own_times = _compare({**b, "query_timestamps": None}, kind, normaliser, torch.float64)
    assert (with_query_times - own_times).abs().max() > 1e-6  # the query times do reach the output


@pytest.mark.parametrize("kind,normaliser", KINDS)
def test_without_relative_bias(kind, normaliser):
    b = _batch(5, torch.float64, packed=True)
    _compare(b, kind, normaliser, torch.float64, use_rab=False)


def _visibility(offsets, segment_ids=None, query_flags=None):
    """Recover the mask: with q = 0 softmax is uniform over visible keys and v = one-hot reveals which."""
    total = int(offsets[-1])
    q = torch.zeros(total, 1, 2, dtype=torch.float64)
    v = torch.eye(total, dtype=torch.float64)[:, None, :]
    out = jagged_causal_attention(q, q, v, offsets, segment_ids=segment_ids, query_flags=query_flags)
    return (out[:, 0, :] > 0).int().tolist()


def test_mask_by_hand_segments_and_rows():
    # Row 0: segments [a a][b], row 1: [c c] (same id 0 as row 0 start: rows still split).
    offsets = torch.tensor([0, 3, 5])
    seen = _visibility(offsets, segment_ids=torch.tensor([0, 0, 1, 0, 0]))
    assert seen == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_mask_by_hand_grouped_query():
    # History h0 h1, then queries q2 q3 q4: each query sees the history and itself only.
    offsets = torch.tensor([0, 5])
    seen = _visibility(offsets, query_flags=torch.tensor([False, False, True, True, True]))
    assert seen == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    # A history token after a query does not see it either.
    seen = _visibility(offsets, query_flags=torch.tensor([False, True, False, False, True]))
    assert seen[2] == [1, 0, 1, 0, 0] and seen[3] == [1, 0, 1, 1, 0]


def test_empty_and_tiny_batches():
    for lengths in ([0, 0, 0], [1], [0, 1, 0], []):
        offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
        total = int(offsets[-1])
        q = torch.randn(total, HEADS, 4, dtype=torch.float64, requires_grad=True)
        v = torch.randn(total, HEADS, 3, dtype=torch.float64)
        for kind, norm in KINDS:
            out = jagged_causal_attention(q, q, v, offsets, kind=kind, normaliser=norm)
            ref = jagged_causal_attention_reference(q, q, v, offsets, kind=kind, normaliser=norm)
            assert out.shape == (total, HEADS, 3)
            torch.testing.assert_close(out, ref)
    # A single token attends only to itself: softmax returns its own value.
    v = torch.randn(1, HEADS, 3)
    out = jagged_causal_attention(torch.randn(1, HEADS, 4), torch.randn(1, HEADS, 4), v, torch.tensor([0, 1]))
    torch.testing.assert_close(out, v)


def test_layout_buckets_bound_padding():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.exp(torch.rand(200, generator=gen) * math.log(500)).long()
    offsets = lengths_to_offsets(lengths)
    layout = build_attention_layout(offsets, min_block=16, bucket_ratio=2.0)
    assert sorted(layout.perm.tolist()) == list(range(int(offsets[-1])))
    torch.testing.assert_close(layout.perm[layout.inv_perm], torch.arange(int(offsets[-1])))
    seen = 0
    for bucket in layout.buckets:
        shortest = int(bucket.lengths.min())
        assert bucket.max_len <= max(16, 2 * shortest)
        assert bucket.mask.shape == (bucket.lengths.numel(), 1, bucket.max_len, bucket.max_len)
        seen += bucket.lengths.numel()
    assert seen == int((lengths > 0).sum())
    padded_area = sum(b.lengths.numel() * b.max_len**2 for b in layout.buckets)
    assert padded_area < 0.5 * lengths.numel() * int(lengths.max()) ** 2  # far below B x Lmax^2
    assert padded_area <= 4 * int((lengths.clamp(min=16) ** 2).sum())


def test_bucketing_does_not_change_results_and_layout_reuse():
    b = _batch(4, torch.float64, packed=True, flags="random")
    kwargs = dict(kind="hstu", segment_ids=b["segment_ids"], query_flags=b["query_flags"], normaliser=7.0)
    one_bucket = jagged_causal_attention(b["q"], b["k"], b["v"], b["offsets"], min_block=64, **kwargs)
    many = jagged_causal_attention(b["q"], b["k"], b["v"], b["offsets"], min_block=1, bucket_ratio=1.3, **kwargs)
    torch.testing.assert_close(one_bucket, many)
    layout = build_attention_layout(b["offsets"], segment_ids=b["segment_ids"], query_flags=b["query_flags"])
    reused = jagged_causal_attention(b["q"], b["k"], b["v"], kind="hstu", layout=layout, normaliser=7.0)
    torch.testing.assert_close(reused, one_bucket)


def test_bad_inputs_raise():
    offsets = torch.tensor([0, 4])
    q = torch.randn(4, 1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        jagged_causal_attention(q, q, q, offsets, segment_ids=torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="segment_ids"):
        jagged_causal_attention(q, q, q, offsets, segment_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="query_flags"):
        jagged_causal_attention(q, q, q, offsets, query_flags=torch.tensor([True]))
    with pytest.raises(ValueError, match="kind"):
        jagged_causal_attention(q, q, q, offsets, kind="linear")
    with pytest.raises(ValueError, match="normaliser"):
        jagged_causal_attention(q, q, q, offsets, kind="hstu")
    with pytest.raises(ValueError, match="tokens"):
        jagged_causal_attention(q, q, q, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="q, k"):
        jagged_causal_attention(q, q[:, :, :1], q, offsets)


def test_relative_bias_matches_loops():
    gen = torch.Generator().manual_seed(0)
    rab = RelativeAttentionBias(max_len=4, num_time_buckets=5, time_bucket_base=2.0, num_heads=2)
    positions = torch.tensor([[0, 1, 2, 3, 9], [5, 4, 0, 0, 0]])
    timestamps = torch.randint(0, 200, (2, 5), generator=gen)
    bias = rab(positions, timestamps)
    assert bias.shape == (2, 2, 5, 5)
    for n in range(2):
        for h in range(2):
            for i in range(5):
                for j in range(5):
                    rel = max(-3, min(3, int(positions[n, i] - positions[n, j])))
                    gap = abs(int(timestamps[n, i] - timestamps[n, j]))
                    bucket = min(5, int(math.floor(math.log(gap + 1) / math.log(2.0) + 1e-9)))
                    expected = rab.position_weight[h, rel + 3] + rab.time_weight[h, bucket]
                    assert torch.isclose(bias[n, h, i, j], expected)
    bias.sum().backward()
    assert rab.position_weight.grad.abs().sum() > 0 and rab.time_weight.grad.abs().sum() > 0


def test_relative_bias_query_timestamps_set_the_row_side_of_each_gap():
    rab = RelativeAttentionBias(max_len=4, num_time_buckets=6, time_bucket_base=2.0, num_heads=1)
    positions = torch.tensor([[0, 1, 2]])
    timestamps = torch.tensor([[0, 3, 10]])
    query_times = torch.tensor([[3, 10, 40]])  # each query asks at the next event's time
    bias = rab(positions, timestamps, query_times)
    for i in range(3):
        for j in range(3):
            rel = int(positions[0, i] - positions[0, j])
            bucket = min(6, int(math.floor(math.log(abs(int(query_times[0, i] - timestamps[0, j])) + 1, 2) + 1e-9)))
            assert torch.isclose(bias[0, 0, i, j], rab.position_weight[0, rel + 3] + rab.time_weight[0, bucket])
    with pytest.raises(ValueError, match="query_timestamps"):
        rab(positions, timestamps, query_times[:, :2])
    with pytest.raises(ValueError, match="query_timestamps needs timestamps"):
        build_attention_layout(torch.tensor([0, 3]), query_timestamps=torch.tensor([1, 2, 3]))


def test_time_gap_buckets_values():
    gaps = torch.tensor([0, 1, 2, 3, 7, 8, -8, 10**12])
    assert time_gap_buckets(gaps, base=2.0, num_buckets=10).tolist() == [0, 1, 1, 2, 3, 3, 3, 10]
    only_pos = RelativeAttentionBias(max_len=3, use_time_bias=False)
    assert only_pos(torch.tensor([[0, 1]]), None).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="timestamps"):
        RelativeAttentionBias(max_len=3)(torch.tensor([[0, 1]]), None)


@pytest.mark.parametrize("trailing", [(), (3,), (2, 3)])
def test_jagged_helpers_fbgemm_matches_fallback(trailing):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 0, 1, 5])
    offsets = lengths_to_offsets(lengths)
    assert offsets.tolist() == [0, 3, 3, 4, 9]
    assert offsets_to_ids(offsets).tolist() == [0, 0, 0, 2, 3, 3, 3, 3, 3]
    assert jagged_positions(offsets).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    values32 = torch.randn(9, *trailing, generator=gen).requires_grad_()
    values64 = values32.detach().double().requires_grad_()
    dense32 = jagged_to_padded_dense(values32, offsets, 4, padding_value=-1.0)  # fbgemm kernel
    dense64 = jagged_to_padded_dense(values64, offsets, 4, padding_value=-1.0)  # plain fallback
    assert dense32.shape == (4, 4, *trailing)
    torch.testing.assert_close(dense32.double(), dense64)
    assert (dense64[1] == -1).all() and (dense64[0, 3] == -1).all()
    short = lengths_to_offsets(lengths.clamp(max=4))
    torch.testing.assert_close(padded_dense_to_jagged(dense32, short).double(), padded_dense_to_jagged(dense64, short))
    full = padded_dense_to_jagged(jagged_to_padded_dense(values64, offsets, 5), offsets)
    torch.testing.assert_close(full, values64)
    (dense32 * 2).sum().backward()
    (dense64 * 2).sum().backward()
    torch.testing.assert_close(values32.grad.double(), values64.grad)


def test_docstring_examples_run():
    for module in (jagged_mod, attention_mod, layout_mod, relative_bias_mod):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.failed == 0, module.__name__
    assert doctest.testmod(attention_mod).attempted > 0
    assert doctest.testmod(layout_mod).attempted > 0
