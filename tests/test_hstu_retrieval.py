"""HSTU retrieval model: packed == per-user runs, causality (items and timestamps), shared table, meta init,
presets, Stochastic Length on whole batches, and it learns planted next-item rules."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import lumrec.modules.retrieval.hstu_retrieval as hr_mod
from lumrec.config import ConfigError
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import TokenConfig, TokenSequences, build_item_sequences
from lumrec.modules.retrieval.hstu_retrieval import (
    HSTU_PRESETS,
    ML1M_LOSS,
    HSTURetrieval,
    HSTURetrievalConfig,
    hstu_preset,
    stochastic_length_batch,
    subsample_batch,
)
from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.retrieval.sequence_model import RetrievalTrain, next_item_queries
from lumrec.modules.retrieval.registry import build_model

from retrieval_helpers import (  # noqa: E402 - shared with the other retrieval model's tests
    MAX_LEN,
    NUM_ITEMS,
    alternating_rows,
    one_batch,
    random_rows,
    shard_like_training,
    successor_rows,
    train_on_planted_rule,
    unsharded_copy,
)


def make_tokens(
    item_rows: list[list[int]], ts_rows: list[list[int]] | None = None, with_category: bool = False, timestamps: bool = True
) -> TokenSequences:
    """Item-sequence tokens of the given per-user item ids (timestamps: given, else irregular increasing gaps)."""
    lengths = np.array([len(r) for r in item_rows], dtype=np.int64)
    n = int(lengths.sum())
    items = np.array([i for r in item_rows for i in r], dtype=np.int64)
    if ts_rows is not None:
        ts = np.array([t for r in ts_rows for t in r], dtype=np.int64)
    else:
        ts = np.cumsum(np.random.default_rng(n).integers(0, 5000, n)).astype(np.int64)
    zeros = np.zeros(n, dtype=np.int64)
    seqs = UserSequences(
        user_ids=np.arange(len(item_rows), dtype=np.int64) + 100,
        offsets=offsets_from_lengths(lengths),
        item_id=items,
        ts=ts,
        action=zeros.astype(np.int32),
        scenario=zeros.astype(np.int32),
        query_id=zeros,
        category_id=items % 5 + 1,
    )
    features = ["item_id", "category_id"] if with_category else ["item_id"]
    return build_item_sequences(seqs, TokenConfig(item_features=features, include_timestamps=timestamps))


def small_config(hstu: dict | None = None, **overrides) -> HSTURetrievalConfig:
    """The `hstu` preset at test size; `hstu` replaces layer (HSTUConfig) fields, `overrides` the model's own."""
    layer = dict(d_model=16, num_heads=2, dqk=8, dv=8, dropout=0.0, max_len=MAX_LEN, num_time_buckets=32)
    layer.update(hstu or {})
    return hstu_preset("hstu", hstu=layer, **{"num_layers": 2, "input_dropout": 0.0, **overrides})


def test_doctests():
    assert doctest.testmod(hr_mod).failed == 0


def test_presets_are_the_reference_ml1m_settings():
    base, large = HSTU_PRESETS["hstu"], HSTU_PRESETS["hstu-large"]
    assert (base.hstu.d_model, base.num_layers, base.hstu.num_heads, base.hstu.dqk, base.hstu.dv) == (50, 2, 1, 50, 50)
    assert (large.hstu.d_model, large.num_layers, large.hstu.num_heads, large.hstu.dqk, large.hstu.dv) == (50, 8, 2, 25, 25)
    for cfg in (base, large):
        assert (cfg.input_dropout, cfg.hstu.dropout, cfg.hstu.max_len, cfg.hstu.num_time_buckets) == (0.2, 0.2, 200, 128)
        assert cfg.output_norm == "l2" and cfg.stochastic_length_alpha is None
    assert (ML1M_LOSS.num_sampled_negatives, ML1M_LOSS.temperature, ML1M_LOSS.in_batch_negatives) == (128, 0.05, False)
    assert hstu_preset("hstu-large", hstu=dict(max_len=50)).hstu.max_len == 50
    with pytest.raises(KeyError, match="hstu-large"):
        hstu_preset("hstu-xl")
    with pytest.raises(ValueError, match="stochastic_length_alpha"):
        HSTURetrievalConfig(stochastic_length_alpha=3.0)
    with pytest.raises(ValueError, match="input_dropout"):
        HSTURetrievalConfig(input_dropout=-0.1)
    assert base.time_gap_from == "event"
    with pytest.raises(ValueError, match="time_gap_from"):
        HSTURetrievalConfig(time_gap_from="target")


def test_model_config_merges_into_the_preset_layer_and_names_nested_keys():
    """`model_config.hstu` replaces single layer fields of the preset; hstu.max_len defaults to the data's."""
    meta = type("Meta", (), {"vocab_sizes": {"item_id": NUM_ITEMS}})()
    model = build_model("hstu-large", {"num_layers": 1, "hstu": {"d_model": 8, "dqk": 4, "dv": 4}}, meta, None, None, 24)
    layer = model.config.hstu
    assert (layer.d_model, layer.num_heads, layer.dqk, layer.dropout, layer.max_len) == (8, 2, 4, 0.2, 24)
    assert layer.time_bucket_base == hr_mod.REFERENCE_TIME_BUCKET_BASE and model.config.num_layers == 1
    assert build_model("hstu", {"hstu": {"max_len": 50}}, meta, None, None, 24).config.hstu.max_len == 50
    with pytest.raises(ConfigError, match=r"model_config\.hstu\.num_heads.*expected an integer"):
        build_model("hstu", {"hstu": {"num_heads": "two"}}, meta, None, None, 24)
    with pytest.raises(ConfigError, match=r"unknown config key 'model_config\.hstu\.linear_dropout'"):
        build_model("hstu", {"hstu": {"linear_dropout": 0.1}}, meta, None, None, 24)
    with pytest.raises(ConfigError, match=r"unknown config key 'model_config\.linear_dropout'"):
        build_model("hstu", {"linear_dropout": 0.1}, meta, None, None, 24)
    with pytest.raises(ConfigError, match=r"model_config\.hstu.*expected a mapping"):
        build_model("hstu", {"hstu": 3}, meta, None, None, 24)
    with pytest.raises(ValueError, match="HSTUConfig: num_heads must be >= 1"):
        build_model("hstu", {"hstu": {"num_heads": 0}}, meta, None, None, 24)

@pytest.mark.parametrize("normaliser,time_gap_from", [(None, "event"), ("length", "event"), (None, "request")])
def test_packed_batch_equals_per_user_runs_forward_and_backward(normaliser, time_gap_from):
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(hstu=dict(normaliser=normaliser), time_gap_from=time_gap_from), NUM_ITEMS).eval()
    rows = random_rows(1, [5, 1, 9, 3, 7, 12, 2, 20, 4])  # 20 > MAX_LEN: truncated alike in both paths
    tokens = make_tokens(rows, with_category=True)
    packed = one_batch(tokens)
    assert packed.num_rows < packed.num_segments
    weights = torch.randn(tokens.num_tokens, 16, generator=torch.Generator().manual_seed(2))

    out = model(packed)
    (out * weights[packed.token_index]).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    got = torch.zeros(tokens.num_tokens, 16)
    for u in range(len(rows)):
        single = one_batch(tokens.take([u]))
        idx = torch.from_numpy(tokens.token_index(np.array([u])))[single.token_index]
        out_u = model(single)
        got[idx] = out_u.detach()
        (out_u * weights[idx]).sum().backward()
    torch.testing.assert_close(out.detach(), got[packed.token_index], atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_packed[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_output_at_a_token_does_not_depend_on_later_items_or_timestamps():
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(), NUM_ITEMS).eval()
    rows = random_rows(3, [10, 6])
    ts = [[100 * k * k for k in range(10)], [7 * k for k in range(6)]]
    base = model(one_batch(make_tokens(rows, ts)))

    changed = [list(rows[0]), list(rows[1])]
    changed[0][6] = (changed[0][6] % (NUM_ITEMS - 1)) + 1
    out = model(one_batch(make_tokens(changed, ts)))
    torch.testing.assert_close(out[:6], base[:6])
    torch.testing.assert_close(out[10:], base[10:])
    assert (out[6:10] - base[6:10]).abs().amax(dim=1).min() > 1e-6

    later_ts = [list(ts[0]), list(ts[1])]
    later_ts[0][6:] = [t + 10**6 for t in later_ts[0][6:]]  # a long break before event 6
    out = model(one_batch(make_tokens(rows, later_ts)))
    torch.testing.assert_close(out[:6], base[:6])
    assert (out[6:10] - base[6:10]).abs().max() > 1e-6  # the time bias does reach later tokens


def test_request_time_gaps_see_the_next_event_time_only():
    """time_gap_from="request": token i's gaps run from event i+1's time (the reference's request time),
    so token i depends on when event i+1 happens but still not on its item nor on anything later."""
    torch.manual_seed(0)
    rows = random_rows(3, [10, 6])
    ts = [[100 * k * k for k in range(10)], [7 * k for k in range(6)]]
    later_ts = [list(ts[0]), list(ts[1])]
    later_ts[0][7:] = [t + 10**6 for t in later_ts[0][7:]]  # a long break before event 7
    changed = [list(rows[0]), list(rows[1])]
    changed[0][7] = (changed[0][7] % (NUM_ITEMS - 1)) + 1
    for time_gap_from, token_6_moves in (("request", True), ("event", False)):
        model = HSTURetrieval(small_config(time_gap_from=time_gap_from), NUM_ITEMS).eval()
        base = model(one_batch(make_tokens(rows, ts)))
        out = model(one_batch(make_tokens(rows, later_ts)))
        torch.testing.assert_close(out[:6], base[:6])
        torch.testing.assert_close(out[10:], base[10:])
        assert ((out[6] - base[6]).abs().max() > 1e-6) == token_6_moves, time_gap_from
        out = model(one_batch(make_tokens(changed, ts)))
        torch.testing.assert_close(out[:7], base[:7])  # the next item itself stays unseen


def test_runs_without_timestamps():
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(), NUM_ITEMS).eval()
    batch = one_batch(make_tokens(random_rows(4, [5, 3]), timestamps=False))
    assert batch.ts is None
    out = model(batch)
    assert out.shape == (8, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(8))  # L2 output norm


def test_item_embeddings_are_the_input_table_rows():
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(), NUM_ITEMS).eval()
    table = model.input.item_table.embedding_bags["item_id"].weight
    ids = torch.tensor([7, 1, 39, 7])
    torch.testing.assert_close(model.item_embeddings(ids), table[ids])
    batch = one_batch(make_tokens(random_rows(4, [5, 3])))
    expected = table[batch.item_id] * 4.0 + model.input.position.weight[batch.position]
    torch.testing.assert_close(model.input(batch), expected)


def test_meta_device_then_materialise_matches_a_cpu_model():
    torch.manual_seed(0)
    cpu = HSTURetrieval(small_config(), NUM_ITEMS).eval()
    meta = HSTURetrieval(small_config(), NUM_ITEMS, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    meta.eval()
    f1 = meta.stack.layers[0].f1.weight.detach()
    assert torch.isfinite(f1).all() and 0.015 < float(f1.std()) < 0.025  # the reference's N(0, 0.02)
    batch = one_batch(make_tokens(random_rows(5, [6, 4])))
    assert torch.isfinite(meta(batch)).all()
    meta.load_state_dict(cpu.state_dict())
    torch.testing.assert_close(meta(batch), cpu(batch))


def test_subsample_batch_keeps_a_consistent_batch():
    tokens = make_tokens(random_rows(6, [6, 3, 5]), with_category=True)
    batch = one_batch(tokens)
    keep = torch.tensor([0, 2, 5, 6, 9, 13])  # user 0: 3 of 6, user 1: 2 of 3 (tokens 6..8), user 2: 1 of 5
    offsets = torch.tensor([0, 3, 5, 6])
    sub = subsample_batch(batch, keep, offsets)
    assert sub.num_tokens == 6 and sub.position.tolist() == [0, 1, 2, 0, 1, 0]
    assert sub.item_id.tolist() == batch.item_id[keep].tolist()
    assert sub.kjt["item_id"].values().tolist() == sub.item_id.tolist()
    assert sub.kjt["category_id"].values().tolist() == batch.kjt["category_id"].values()[keep].tolist()
    assert sub.ts.tolist() == batch.ts[keep].tolist() and sub.token_index.tolist() == batch.token_index[keep].tolist()
    assert int(sub.row_offsets[-1]) == 6
    with pytest.raises(ValueError, match="at least one token"):
        subsample_batch(batch, keep[:5], torch.tensor([0, 3, 5, 5]))


def test_stochastic_length_only_in_training_and_targets_follow():
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(stochastic_length_alpha=1.0), NUM_ITEMS)  # keep floor(16**0.5) = 4
    tokens = make_tokens(random_rows(7, [16] * 8 + [3]))
    batch = one_batch(tokens)
    gen = torch.Generator().manual_seed(0)
    sub = model.prepare_batch(batch, gen)
    lengths = (sub.offsets[1:] - sub.offsets[:-1]).tolist()
    assert lengths[-1] == 3 and set(lengths[:-1]) <= {4, 16} and 4 in lengths  # long ones kept whole w.p. 16/256
    assert sub.kjt["item_id"].values().tolist() == sub.item_id.tolist()
    assert bool((sub.ts[1:] >= sub.ts[:-1])[sub.position[1:] > 0].all())  # order kept inside sequences
    index, targets = next_item_queries(sub, model.predicts_from)
    assert torch.equal(targets, sub.item_id[index + 1])  # the targets are the subsampled next items
    loss, n = RetrievalTrain(model, InfoNCELoss(InfoNCEConfig(num_sampled_negatives=4), NUM_ITEMS))(sub, gen)
    assert n == sub.num_tokens - sub.num_segments and torch.isfinite(loss)
    model.eval()
    assert model.prepare_batch(batch, gen) is batch
    assert stochastic_length_batch(one_batch(make_tokens(random_rows(8, [3, 2]))), 1.0, MAX_LEN).num_tokens == 5


def test_learns_a_planted_successor_rule():
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(hstu=dict(d_model=32, dqk=16, dv=16, dropout=0.1), input_dropout=0.1), num_items=30)
    before, after = train_on_planted_rule(model, successor_rows, make_tokens)
    assert before < 0.2
    assert after > 0.9, (before, after)


def test_learns_a_rule_that_needs_attention():
    torch.manual_seed(0)
    model = HSTURetrieval(small_config(hstu=dict(d_model=32, dqk=16, dv=16, dropout=0.1), input_dropout=0.1), num_items=30)
    before, after = train_on_planted_rule(model, alternating_rows, make_tokens, min_position=1)
    assert before < 0.2
    assert after > 0.8, (before, after)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_meta_model_is_sharded_by_dmp_and_matches_unsharded(tmp_path):
    # d_model 50 (the paper's, not a multiple of 4) needs the dense kernel: fbgemm's fused one refuses it.
    config = small_config(hstu=dict(d_model=50, num_heads=1, dqk=8, dv=8))
    dmp, cleanup = shard_like_training(HSTURetrieval(config, NUM_ITEMS, device="meta"), tmp_path)
    try:
        # DMP materialised the dense layers through their own reset_parameters: the reference init, not torch's default.
        f1 = dmp.module.stack.layers[0].f1
        assert not f1.bias.any() and 0.015 < float(f1.weight.detach().std()) < 0.025
        batch = one_batch(make_tokens(random_rows(7, [6, 4, 9]), with_category=True))
        ref = unsharded_copy(dmp, HSTURetrieval(config, NUM_ITEMS)).eval()
        dmp.eval()
        torch.testing.assert_close(dmp(batch), ref(batch))
        ids = torch.tensor([1, 5, 39])
        torch.testing.assert_close(dmp.module.item_embeddings(ids), ref.item_embeddings(ids))
    finally:
        cleanup()
