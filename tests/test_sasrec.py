"""SASRec: packed == per-user runs (forward and backward), causality, shared item table, meta init, and it learns."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import lumrec.modules.retrieval.sasrec as sasrec_mod
from lumrec.data.batches import JaggedBatch
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import ITEM, TokenConfig, TokenSequences, build_item_sequences
from lumrec.modules.retrieval.sasrec import SASRec, SASRecConfig
from lumrec.modules.retrieval.sequence_model import next_item_queries, seen_item_pairs

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


def make_tokens(item_rows: list[list[int]], ts_rows: list[list[int]] | None = None, with_category: bool = False) -> TokenSequences:
    """Item-sequence tokens of the given per-user item ids (and timestamps; default 10 apart)."""
    lengths = np.array([len(r) for r in item_rows], dtype=np.int64)
    n = int(lengths.sum())
    items = np.array([i for r in item_rows for i in r], dtype=np.int64)
    ts = np.array([t for r in ts_rows for t in r], dtype=np.int64) if ts_rows else np.arange(n, dtype=np.int64) * 10
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
    return build_item_sequences(seqs, TokenConfig(item_features=features))


def small_config(**overrides) -> SASRecConfig:
    base = dict(d_model=16, num_blocks=2, num_heads=2, dropout=0.0, max_len=MAX_LEN)
    base.update(overrides)
    return SASRecConfig(**base)


def test_doctests():
    assert doctest.testmod(sasrec_mod).failed == 0


@pytest.mark.parametrize("block_style", ["sasrec", "pre_ln"])
def test_packed_batch_equals_per_user_runs_forward_and_backward(block_style):
    torch.manual_seed(0)
    model = SASRec(small_config(block_style=block_style), NUM_ITEMS).eval()
    # 20 > MAX_LEN: truncated to the newest 16 in both paths.
    rows = random_rows(1, [5, 1, 9, 3, 7, 12, 2, 20, 4])
    tokens = make_tokens(rows, with_category=True)  # an extra KJT key the model must ignore
    packed = one_batch(tokens)
    assert packed.num_rows < packed.num_segments  # several users really share rows
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


def test_output_at_a_token_does_not_depend_on_later_tokens():
    torch.manual_seed(0)
    model = SASRec(small_config(), NUM_ITEMS).eval()
    rows = random_rows(3, [10, 6])
    base = model(one_batch(make_tokens(rows)))
    changed = [list(rows[0]), list(rows[1])]
    changed[0][6] = (changed[0][6] % (NUM_ITEMS - 1)) + 1  # another item at position 6 of user 0
    out = model(one_batch(make_tokens(changed)))
    torch.testing.assert_close(out[:6], base[:6])  # earlier tokens of user 0
    torch.testing.assert_close(out[10:], base[10:])  # the other user
    assert (out[6:10] - base[6:10]).abs().amax(dim=1).min() > 1e-4  # later tokens do see it


def test_item_embeddings_are_the_input_table_rows():
    torch.manual_seed(0)
    model = SASRec(small_config(), NUM_ITEMS).eval()
    table = model.input.item_table.embedding_bags["item_id"].weight
    ids = torch.tensor([[3, 1], [39, 3]])
    torch.testing.assert_close(model.item_embeddings(ids), table[ids])
    batch = one_batch(make_tokens(random_rows(4, [5, 3])))
    expected = table[batch.item_id] * 4.0 + model.input.position.weight[batch.position]  # sqrt(16) = 4
    torch.testing.assert_close(model.input(batch), expected)


def test_meta_device_then_materialise_matches_a_cpu_model():
    torch.manual_seed(0)
    cpu = SASRec(small_config(), NUM_ITEMS).eval()
    meta = SASRec(small_config(), NUM_ITEMS, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    table = meta.input.item_table.embedding_bags["item_id"].weight
    assert torch.isfinite(table).all() and 0.01 < float(table.detach().std()) < 0.03  # std 0.02 init, not empty memory
    meta.eval()
    batch = one_batch(make_tokens(random_rows(5, [6, 4])))
    assert torch.isfinite(meta(batch)).all()
    meta.load_state_dict(cpu.state_dict())
    torch.testing.assert_close(meta(batch), cpu(batch))


def test_bad_inputs_are_rejected_with_the_key_named():
    model = SASRec(small_config(), NUM_ITEMS)
    batch = one_batch(make_tokens(random_rows(6, [5, 3])))
    renamed = KeyedJaggedTensor(keys=["other"], values=batch.kjt.values(), lengths=batch.kjt.lengths(), stride=batch.num_tokens)
    with pytest.raises(ValueError, match="item_id"):
        model(JaggedBatch(**{**batch.__dict__, "kjt": renamed}))
    too_long = one_batch(make_tokens(random_rows(6, [20])), max_len=32)
    with pytest.raises(ValueError, match="max_len"):
        model(too_long)
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(dropout=1.0)


@pytest.mark.parametrize("block_style", ["sasrec", "pre_ln"])
def test_learns_a_planted_successor_rule(block_style):
    torch.manual_seed(0)
    model = SASRec(small_config(d_model=32, dropout=0.1, block_style=block_style), num_items=30)
    before, after = train_on_planted_rule(model, successor_rows, make_tokens)
    assert before < 0.2
    assert after > 0.9, (before, after)


def test_learns_a_rule_that_needs_attention():
    torch.manual_seed(0)
    model = SASRec(small_config(d_model=32, dropout=0.1), num_items=30)
    # From position 1 on, the next item is the one before the current one: only attention can tell.
    before, after = train_on_planted_rule(model, alternating_rows, make_tokens, min_position=1)
    assert before < 0.2
    assert after > 0.8, (before, after)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_meta_model_is_sharded_by_dmp_and_matches_unsharded(tmp_path):
    # d_model 50 (the paper's, not a multiple of 4) needs the dense kernel: fbgemm's fused one refuses it.
    config = small_config(d_model=50, num_heads=1)
    dmp, cleanup = shard_like_training(SASRec(config, NUM_ITEMS, device="meta"), tmp_path)
    try:
        # DMP materialised the dense layers through their own reset_parameters: the reference init, not torch's default.
        block = dmp.module.blocks[0]
        assert not block.q_proj.bias.any() and not block.ffn[0].bias.any()
        assert 0.1 < float(block.q_proj.weight.detach().std()) < 0.18  # Xavier-normal: sqrt(2 / 100) = 0.141
        batch = one_batch(make_tokens(random_rows(7, [6, 4, 9]), with_category=True))
        ref = unsharded_copy(dmp, SASRec(config, NUM_ITEMS)).eval()
        dmp.eval()
        torch.testing.assert_close(dmp(batch), ref(batch))
        ids = torch.tensor([1, 5, 39])
        torch.testing.assert_close(dmp.module.item_embeddings(ids), ref.item_embeddings(ids))
    finally:
        cleanup()


@pytest.mark.parametrize("seed", range(4))
def test_seen_item_pairs_match_a_loop_over_packed_segments(seed):
    """Each query's pairs are the items of its own segment up to it (repeats of its target left out)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, 8, n).tolist() for n in rng.integers(1, MAX_LEN + 1, 9)]  # 7 items: many repeats
    batch = one_batch(make_tokens(rows))
    index, targets = next_item_queries(batch, ITEM)
    pairs = seen_item_pairs(batch, index, targets)
    expected = set()
    for k, t in enumerate(index.tolist()):
        seg = int(torch.searchsorted(batch.offsets, torch.tensor(t), right=True)) - 1
        for j in range(int(batch.offsets[seg]), t + 1):
            item = int(batch.item_id[j])
            if item != int(targets[k]):
                expected.add((k, item))
    got = list(zip(pairs[0].tolist(), pairs[1].tolist()))
    assert set(got) == expected and len(expected) > 0
    assert batch.num_segments > batch.num_rows  # packing put several users in a row
