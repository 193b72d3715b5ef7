"""HSTU layer and stack (against a padded reference composition, packing, causality) and Stochastic Length."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

import lumrec.modules.layers.hstu as hstu_mod
from lumrec.modules.layers.hstu import HSTUConfig, HSTULayer, HSTUStack, stochastic_length_subsample
from lumrec.modules.ops import jagged_causal_attention_reference, lengths_to_offsets, offsets_to_ids


def _config(**overrides) -> HSTUConfig:
    base = dict(d_model=12, num_heads=2, dqk=4, dv=3, max_len=16, num_time_buckets=12, dropout=0.0)
    base.update(overrides)
    return HSTUConfig(**base)


def _inputs(seed: int, lengths: list[int], d_model: int = 12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    total = int(offsets[-1])
    x = torch.randn(total, d_model, generator=gen, dtype=dtype)
    timestamps = torch.cumsum(torch.randint(0, 3000, (total,), generator=gen), 0)
    return x, offsets, timestamps


def _reference_layer(layer: HSTULayer, x, offsets, **mask_kwargs):
    """The paper's layer written out on the padded reference attention."""
    cfg = layer.config
    t, h = x.shape[0], cfg.num_heads
    uvqk = F.silu(layer.f1(layer.input_norm(x)))
    u, v, q, k = torch.split(uvqk, [h * cfg.dv, h * cfg.dv, h * cfg.dqk, h * cfg.dqk], dim=-1)
    attn = jagged_causal_attention_reference(
        q.reshape(t, h, cfg.dqk),
        k.reshape(t, h, cfg.dqk),
        v.reshape(t, h, cfg.dv),
        offsets,
        kind="hstu",
        relative_bias=layer.relative_bias,
        normaliser=cfg.resolved_normaliser,
        **mask_kwargs,
    )
    return x + layer.f2(layer.attn_norm(attn.reshape(t, h * cfg.dv)) * u)


@pytest.mark.parametrize("normaliser", [None, "length", 5.0])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_reference_with_grads(normaliser, packed):
    torch.manual_seed(0)
    layer = HSTULayer(_config(normaliser=normaliser)).double()
    x, offsets, timestamps = _inputs(1, [0, 1, 16, 5, 9, 3])
    segment_ids = None
    if packed:
        segment_ids = torch.arange(x.shape[0]) // 4  # runs of 4 tokens, also cut at row ends
    x.requires_grad_()
    mask_kwargs = dict(segment_ids=segment_ids, timestamps=timestamps)
    fast = layer(x, offsets, **mask_kwargs)
    ref = _reference_layer(layer, x, offsets, **mask_kwargs)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    weight = torch.randn(fast.shape, dtype=fast.dtype, generator=torch.Generator().manual_seed(2))
    params = [x] + list(layer.parameters())
    g_fast = torch.autograd.grad((fast * weight).sum(), params)
    g_ref = torch.autograd.grad((ref * weight).sum(), params)
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-10)
    assert layer.relative_bias.position_weight.shape == (1, 2 * 16 - 1)
    assert layer.f1.out_features == 2 * (2 * 3 + 2 * 4)


def test_stack_packed_row_equals_separate_rows():
    torch.manual_seed(0)
    stack = HSTUStack(_config(), num_layers=3).double().eval()
    x, _, timestamps = _inputs(3, [3, 4, 2])
    separate = stack(x, torch.tensor([0, 3, 7, 9]), timestamps=timestamps)
    segment_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    packed = stack(x, torch.tensor([0, 9]), segment_ids=segment_ids, timestamps=timestamps)
    torch.testing.assert_close(packed, separate)


def test_stack_equals_layers_with_fresh_layouts():
    # The stack shares one layout (and its cached bias indices) across layers; that must change nothing.
    torch.manual_seed(1)
    stack = HSTUStack(_config(), num_layers=3).double().eval()
    x, offsets, timestamps = _inputs(6, [7, 0, 2, 16])
    flags = torch.zeros(x.shape[0], dtype=torch.bool)
    flags[-3:] = True
    expected = x
    for layer in stack.layers:
        expected = layer(expected, offsets, timestamps=timestamps, query_flags=flags)
    torch.testing.assert_close(stack(x, offsets, timestamps=timestamps, query_flags=flags), expected)


def test_stack_is_causal_and_queries_are_isolated():
    torch.manual_seed(0)
    stack = HSTUStack(_config(), num_layers=2).double().eval()
    x, offsets, timestamps = _inputs(4, [6, 5])
    base = stack(x, offsets, timestamps=timestamps)
    changed = x.clone()
    changed[3] += 1.0  # token 3 of row 0: earlier tokens and row 1 must not move
    out = stack(changed, offsets, timestamps=timestamps)
    torch.testing.assert_close(out[:3], base[:3])
    torch.testing.assert_close(out[6:], base[6:])
    assert not torch.allclose(out[3:6], base[3:6])

    # Rows end with 2 query tokens each (M-FALCON style): changing a query moves only itself.
    flags = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    base = stack(x, offsets, timestamps=timestamps, query_flags=flags)
    changed = x.clone()
    changed[4] += 1.0
    out = stack(changed, offsets, timestamps=timestamps, query_flags=flags)
    moved = (out - base).abs().amax(dim=1) > 1e-12
    assert moved.tolist() == [i == 4 for i in range(11)]


def test_dropout_and_train_eval():
    torch.manual_seed(0)
    stack = HSTUStack(_config(dropout=0.5, use_time_bias=False), num_layers=1)
    x, offsets, _ = _inputs(5, [4, 7], dtype=torch.float32)
    stack.eval()
    torch.testing.assert_close(stack(x, offsets), stack(x, offsets))
    stack.train()
    assert not torch.allclose(stack(x, offsets), stack(x, offsets))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="normaliser"):
        HSTUConfig(normaliser="max")
    with pytest.raises(ValueError, match="dropout"):
        HSTUConfig(dropout=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        HSTUConfig(num_heads=0)
    layer = HSTULayer(_config())
    x, offsets, _ = _inputs(0, [3], dtype=torch.float32)
    with pytest.raises(ValueError, match="timestamps"):
        layer(x, offsets)
    with pytest.raises(ValueError, match="x must be"):
        layer(x[:, :5], offsets)
    no_bias = HSTULayer(_config(use_time_bias=False, use_position_bias=False))
    assert no_bias.relative_bias is None and no_bias(x, offsets).shape == x.shape
    assert HSTUStack(_config(), 1)(x[:0], torch.tensor([0, 0]), timestamps=torch.zeros(0, dtype=torch.long)).shape == (
        0,
        12,
    )


def test_profiler_scopes_present():
    stack = HSTUStack(_config(use_time_bias=False), num_layers=1)
    x, offsets, _ = _inputs(0, [3, 5], dtype=torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stack(x, offsets).sum().backward()
    names = {event.name for event in prof.events()}
    for scope in ("hstu/layer_0", "hstu/uvqk", "hstu/attention", "hstu/output", "jagged_attention/layout"):
        assert scope in names, scope


def _sl_batch(lengths):
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    total = int(offsets[-1])
    timestamps = torch.cumsum(torch.randint(0, 10, (total,), generator=torch.Generator().manual_seed(0)), 0)
    return offsets, timestamps


def test_stochastic_length_deterministic_and_ordered():
    lengths = [0, 1, 5, 31, 32, 100, 250, 7, 64]
    offsets, timestamps = _sl_batch(lengths)
    run = lambda seed: stochastic_length_subsample(  # noqa: E731
        offsets, timestamps, alpha=1.5, max_len=100, generator=torch.Generator().manual_seed(seed)
    )
    idx_a, off_a = run(42)
    idx_b, off_b = run(42)
    assert torch.equal(idx_a, idx_b) and torch.equal(off_a, off_b)
    assert any(not torch.equal(run(s)[0], idx_a) for s in range(1, 6))
    keep = 31  # floor(100 ** 0.75)
    for seed in range(20):
        idx, new_offsets = run(seed)
        assert torch.all(idx[1:] > idx[:-1])  # strictly increasing: order kept, no duplicates
        rows = offsets_to_ids(offsets)[idx]
        assert torch.equal(lengths_to_offsets(torch.bincount(rows, minlength=len(lengths))), new_offsets)
        assert torch.all(timestamps[idx][1:][rows[1:] == rows[:-1]] >= timestamps[idx][:-1][rows[1:] == rows[:-1]])
        new_lengths = (new_offsets[1:] - new_offsets[:-1]).tolist()
        for n, m in zip(lengths, new_lengths):
            assert m == n if n <= keep else m in (keep, n)


def test_stochastic_length_probabilities():
    # n=100, max_len=100, alpha=1.5: keep whole with prob 100^1.5/100^2 = 0.1, else 31 events.
    offsets, timestamps = _sl_batch([100] * 3000)
    idx, new_offsets = stochastic_length_subsample(offsets, timestamps, 1.5, 100, torch.Generator().manual_seed(0))
    new_lengths = new_offsets[1:] - new_offsets[:-1]
    assert set(new_lengths.tolist()) == {31, 100}
    assert abs((new_lengths == 100).float().mean().item() - 0.1) < 0.02
    # Subsampled events are drawn uniformly: each position kept about 31% of the time.
    positions = idx - offsets[:-1][offsets_to_ids(offsets)[idx]]
    sub_rows = (new_lengths == 31).repeat_interleave(new_lengths)
    freq = torch.bincount(positions[sub_rows], minlength=100).double() / int((new_lengths == 31).sum())
    assert 0.25 < freq.min() and freq.max() < 0.37


def test_stochastic_length_errors_and_alpha_two():
    offsets, timestamps = _sl_batch([5, 300])
    idx, new_offsets = stochastic_length_subsample(offsets, None, 2.0, 300, torch.Generator().manual_seed(0))
    assert torch.equal(new_offsets, offsets) and idx.numel() == 305  # alpha=2: nothing is cut
    bad = timestamps.clone()
    bad[2], bad[3] = bad[3] + 5, bad[2]
    with pytest.raises(ValueError, match="timestamps decrease"):
        stochastic_length_subsample(offsets, bad, 1.5, 100)
    with pytest.raises(ValueError, match="alpha"):
        stochastic_length_subsample(offsets, timestamps, 2.5, 100)
    empty_idx, empty_off = stochastic_length_subsample(torch.tensor([0, 0]), None, 1.5, 10)
    assert empty_idx.numel() == 0 and empty_off.tolist() == [0, 0]


def test_docstring_examples_run():
    result = doctest.testmod(hstu_mod)
    assert result.failed == 0 and result.attempted > 0

