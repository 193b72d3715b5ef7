"""LUM user encoder and the jagged transformer: reference maths, packed == alone, grouped-query masks, a planted learning task."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lumrec.modules.retrieval.lum as lum_mod
import lumrec.modules.layers.transformer as transformer_mod
from lumrec.data.batches import make_jagged_batch
from lumrec.data.dataset import Dataset
from lumrec.data.packing import pack_sequences
from lumrec.data.sequences import UserSequences, offsets_from_lengths, sequences_from_dataset
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.data.tokens import CONDITION, ITEM, TokenConfig, build_lum_tokens, item_dense_matrix, item_lists_from_table
from lumrec.config import ConfigError
from lumrec.modules.layers.hstu import HSTUAttentionConfig
from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.retrieval.lum import LUM, LUMConfig
from lumrec.modules.ops import segment_positions
from lumrec.modules.retrieval.sequence_model import RetrievalTrain, next_item_queries
from lumrec.modules.layers.token_encoder import ItemFeatureLookup, token_encoder_config_from_tokens
from lumrec.modules.retrieval.registry import build_model
from lumrec.modules.layers.transformer import TransformerConfig, TransformerStack

MAX_LEN = 24
BACKBONES = ["transformer", "hstu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning OpenMP workers slow ~30x when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_doctests():
    for mod in (lum_mod, transformer_mod):
        assert doctest.testmod(mod, raise_on_error=True).attempted > 0


# -- the transformer stack --------------------------------------------------------------------


def _reference_transformer(stack: TransformerStack, x: torch.Tensor) -> torch.Tensor:
    """One sequence, written out densely: positions, pre-LN blocks with a lower-triangular mask, final norm."""
    cfg = stack.config
    n, d, h = x.shape[0], cfg.d_model, cfg.num_heads
    x = x + stack.position_embedding.weight[:n]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for blk in stack.layers:
        q, k, v = blk.qkv(blk.attn_norm(x)).split(d, dim=1)
        q, k, v = (t.view(n, h, d // h).transpose(0, 1) for t in (q, k, v))
        scores = (q @ k.transpose(1, 2)) / math.sqrt(d // h)
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        x = x + blk.out(attn.transpose(0, 1).reshape(n, d))
        x = x + blk.ffn_out(F.gelu(blk.ffn_in(blk.ffn_norm(x))))
    return stack.final_norm(x)


def test_transformer_matches_dense_reference_on_packed_rows():
    torch.manual_seed(0)
    stack = TransformerStack(TransformerConfig(d_model=12, num_heads=3, ffn_dim=20, max_len=32), num_layers=2).double()
    seg_lengths = [5, 1, 17, 3, 9, 2]
    # Rows: [5, 1], [17, 3], [9, 2]: every row packs two segments.
    offsets = torch.tensor([0, 6, 26, 37])
    segment_ids = torch.cat([torch.full((n,), i % 2) for i, n in enumerate(seg_lengths)])
    x = torch.randn(sum(seg_lengths), 12, dtype=torch.float64, requires_grad=True)
    out = stack(x, offsets, segment_ids=segment_ids)
    assert torch.equal(segment_positions(offsets, segment_ids), torch.cat([torch.arange(n) for n in seg_lengths]))
    bounds = np.cumsum([0] + seg_lengths)
    ref = torch.cat([_reference_transformer(stack, x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_transformer_is_causal_and_hides_query_tokens():
    torch.manual_seed(0)
    stack = TransformerStack(TransformerConfig(d_model=8, num_heads=2, ffn_dim=16, max_len=16), num_layers=2)
    x = torch.randn(10, 8)
    offsets = torch.tensor([0, 10])
    out = stack(x, offsets)
    changed = x.clone()
    changed[6:] += 1.0
    out2 = stack(changed, offsets)
    torch.testing.assert_close(out2[:6], out[:6], rtol=0, atol=0)
    assert not torch.allclose(out2[6:], out[6:])
    # Grouped query: tokens 7..9 are queries; each must equal its own run "history + that query".
    flags = torch.zeros(10, dtype=torch.bool)
    flags[7:] = True
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 7])
    grouped = stack(x, offsets, positions=positions, query_flags=flags)
    torch.testing.assert_close(grouped[:7], out[:7])
    for q in (7, 8, 9):
        alone = stack(torch.cat([x[:7], x[q : q + 1]]), torch.tensor([0, 8]))
        torch.testing.assert_close(grouped[q], alone[7], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 16\)"):
        stack(torch.randn(17, 8), torch.tensor([0, 17]))


# -- LUM on data built by lumrec.data ---------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic log -> LUM tokens (scenario/query/category conditions, multi-category items, content vectors)."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(seed=3, num_users=40, num_items=60, num_categories=5, num_queries=10, num_days=2))
    ds = Dataset(root)
    vocab = ds.read_meta().vocab_sizes
    items = ds.read_table("items")
    num_items = vocab["item_id"]
    lists = {"category_ids": item_lists_from_table(items, "category_ids", num_items)}
    cfg = TokenConfig(condition_features=["scenario", "query_id", "category_id"], item_features=["item_id", "category_id", "category_ids"])
    tokens = build_lum_tokens(sequences_from_dataset(ds), cfg, item_lists=lists)
    dense, _ = item_dense_matrix(items, ["content"], num_items)
    lookup = ItemFeatureLookup.from_items_table(items, tokens.item_keys, num_items, dense_columns=["content"])
    return tokens, vocab, dense, lookup


def _lum(tokens, vocab, lookup, backbone, dense_dim=0, **overrides):
    cfg = dict(d_model=16, num_layers=2, num_heads=2, ffn_dim=32, max_len=MAX_LEN, backbone=backbone,
               hstu=HSTUAttentionConfig(normaliser="length"))
    cfg.update(overrides)
    enc = token_encoder_config_from_tokens(tokens, vocab, dim=8, d_model=cfg["d_model"], dense_dim=dense_dim)
    return LUM(LUMConfig(**cfg), enc, lookup)


def _packed(tokens, rows=None, dense=None, max_len=MAX_LEN):
    """All sequences `rows` (default all) in one packed batch of `max_len`-token rows."""
    if rows is not None:
        tokens = tokens.take(rows)
    plan = pack_sequences(tokens.offsets, tokens.token_type, max_len)
    return tokens, make_jagged_batch(tokens, plan, dense)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_packed_batch_equals_each_user_alone(synthetic, backbone):
    tokens, vocab, dense, lookup = synthetic
    torch.manual_seed(0)
    model = _lum(tokens, vocab, lookup, backbone, dense_dim=dense.shape[1]).eval()
    _, batch = _packed(tokens, dense=dense)
    assert batch.num_rows < batch.num_segments  # several users really share rows
    assert int(batch.lengths().max()) == MAX_LEN  # and long users are truncated
    with torch.no_grad():
        packed = model(batch)
        for s in range(batch.num_segments):
            _, alone = _packed(tokens, rows=[int(batch.seq_index[s])], dense=dense)
            a, b = int(batch.offsets[s]), int(batch.offsets[s + 1])
            assert alone.num_tokens == b - a
            torch.testing.assert_close(packed[a:b], model(alone), rtol=1e-5, atol=1e-5)
        # Candidates are embedded exactly like the batch's item tokens (data and lookup agree).
        item_rows = torch.nonzero(batch.token_type == ITEM).flatten()
        torch.testing.assert_close(model.item_embeddings(batch.item_id[item_rows]), model.embed(batch)[item_rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_retrieval_loss_on_packed_batch_forward_backward(synthetic, backbone):
    tokens, vocab, dense, lookup = synthetic
    torch.manual_seed(0)
    model = _lum(tokens, vocab, lookup, backbone, dense_dim=dense.shape[1], dropout=0.1)
    train = RetrievalTrain(model, InfoNCELoss(InfoNCEConfig(temperature=0.1, num_sampled_negatives=8), model.num_items))
    _, batch = _packed(tokens, dense=dense)
    index, targets = next_item_queries(batch, model.predicts_from)
    # One query per event: every condition token, never across users.
    assert index.numel() == int((batch.token_type == CONDITION).sum())
    assert torch.equal(targets, batch.item_id[index + 1]) and bool((targets > 0).all())
    loss, num_queries = train(batch, torch.Generator().manual_seed(0))
    assert num_queries == index.numel() and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    # The tables get gradient exactly on the ids present (targets, sampled negatives, batch tokens).
    grad = model.encoder.embedding_bag_collection.embedding_bags["t_scenario"].weight.grad
    assert grad[0].abs().sum() == 0 and grad[1:].abs().sum() > 0


def test_lum_errors_name_the_problem(synthetic):
    tokens, vocab, dense, lookup = synthetic
    _, batch = _packed(tokens, dense=dense)
    model = _lum(tokens, vocab, lookup, "hstu", dense_dim=dense.shape[1])
    with pytest.raises(ValueError, match="no timestamps"):
        model(type(batch)(**{**batch.__dict__, "ts": None}))
    with pytest.raises(ValueError, match="d_model"):
        LUM(LUMConfig(d_model=32), token_encoder_config_from_tokens(tokens, vocab, dim=8, d_model=16), lookup)
    with pytest.raises(ValueError, match="dense rows have width 16"):
        LUM(LUMConfig(d_model=16), token_encoder_config_from_tokens(tokens, vocab, dim=8, d_model=16, dense_dim=4), lookup)
    with pytest.raises(ValueError, match="backbone must be"):
        LUMConfig(backbone="rnn")
    small = _lum(tokens, vocab, lookup, "transformer", dense_dim=dense.shape[1], max_len=8)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 8\)"):
        small(batch)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_grouped_queries_see_history_and_themselves(synthetic, backbone):
    """Hook for knowledge querying: N condition tokens appended to one history, flagged as queries."""
    tokens, vocab, dense, lookup = synthetic
    torch.manual_seed(0)
    # A constant HSTU normaliser: with "length", N queries would lengthen the segment and change the scale.
    model = _lum(tokens, vocab, lookup, backbone, dense_dim=dense.shape[1], hstu=HSTUAttentionConfig(normaliser=None)).eval()
    user = int(np.flatnonzero((tokens.lengths() >= 8) & (tokens.lengths() <= MAX_LEN - 2))[0])
    _, batch = _packed(tokens, rows=[user], dense=dense)
    n_hist = batch.num_tokens
    genres = torch.tensor([1, 3, 4])
    scenario = torch.ones(3, dtype=torch.int64)
    query_emb = model.condition_embeddings({"cond_scenario": scenario, "cond_query_id": torch.zeros(3, dtype=torch.int64), "cond_category_id": genres})
    with torch.no_grad():
        x = torch.cat([model.embed(batch), query_emb])
        ts = torch.cat([batch.ts, batch.ts[-1:].expand(3)])
        pos = torch.cat([batch.position, torch.full((3,), n_hist)])
        flags = torch.cat([torch.zeros(n_hist, dtype=torch.bool), torch.ones(3, dtype=torch.bool)])
        grouped = model.encode(x, torch.tensor([0, n_hist + 3]), positions=pos, timestamps=ts, query_flags=flags)
        for j in range(3):
            one = model.encode(
                torch.cat([x[:n_hist], x[n_hist + j : n_hist + j + 1]]), torch.tensor([0, n_hist + 1]),
                positions=pos[: n_hist + 1], timestamps=ts[: n_hist + 1],
            )
            torch.testing.assert_close(grouped[n_hist + j], one[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grouped[:n_hist], model(batch), rtol=1e-5, atol=1e-5)


# -- a real learning test -------------------------------------------------------------------


def _planted(num_users: int, seed: int, num_items: int = 41, num_queries: int = 20):
    """Events whose item is a fixed function of the condition (query, scenario); the model must learn that map."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, num_users)
    n = int(lengths.sum())
    query = rng.integers(1, num_queries + 1, n)
    scenario = rng.integers(1, 3, n)
    item = 1 + (2 * query + scenario) % (num_items - 1)
    seqs = UserSequences(
        user_ids=np.arange(num_users, dtype=np.int64) + 1, offsets=offsets_from_lengths(lengths),
        item_id=item.astype(np.int64), ts=np.arange(n, dtype=np.int64) * 60, action=np.ones(n, np.int32),
        scenario=scenario.astype(np.int32), query_id=query.astype(np.int64), category_id=(item % 5 + 1).astype(np.int64),
    )
    tokens = build_lum_tokens(seqs, TokenConfig(condition_features=["scenario", "query_id"], item_features=["item_id", "category_id"]))
    return tokens, {"item_id": num_items, "category_id": 6, "scenario": 3, "query_id": num_queries + 1}


def _top1_accuracy(model: LUM, batch) -> float:
    index, targets = next_item_queries(batch, model.predicts_from)
    with torch.no_grad():
        queries = F.normalize(model(batch)[index], dim=-1)
        cand = F.normalize(model.item_embeddings(torch.arange(1, model.num_items)), dim=-1)
        return float(((queries @ cand.T).argmax(1) + 1 == targets).float().mean())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_learns_planted_next_condition_item_task(backbone):
    tokens, vocab = _planted(64, seed=0)
    held_out, _ = _planted(24, seed=1)
    torch.manual_seed(0)
    model = LUM(
        LUMConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, max_len=32, backbone=backbone),
        token_encoder_config_from_tokens(tokens, vocab, dim=16, d_model=32),
        ItemFeatureLookup.from_tokens(tokens, vocab["item_id"]),
    )
    train = RetrievalTrain(model, InfoNCELoss(InfoNCEConfig(temperature=0.1, num_sampled_negatives=16), model.num_items))
    opt = torch.optim.AdamW(train.parameters(), lr=1e-2)
    plan = pack_sequences(tokens.offsets, tokens.token_type, 32, rng=np.random.default_rng(0))
    batches = [make_jagged_batch(tokens, plan.rows(r, min(r + 8, plan.num_rows))) for r in range(0, plan.num_rows, 8)]
    _, test_batch = _packed(held_out, max_len=32)
    acc_before = _top1_accuracy(model.eval(), test_batch)
    model.train()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        loss, _ = train(batches[step % len(batches)], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = np.mean(losses[:len(batches)]), np.mean(losses[-len(batches):])
    acc_after = _top1_accuracy(model.eval(), test_batch)
    assert last < 0.5 * first, (first, last)
    # 40 items: chance is 2.5%; the planted map is learned and holds on unseen users.
    assert acc_before < 0.2 and acc_after > 0.8, (acc_before, acc_after)


def test_hstu_backbone_options_nest_under_hstu():
    """The HSTU layer takes LUM's own sizes and `hstu`'s options; config errors name the nested key."""
    tokens, vocab = _planted(4, seed=0)
    enc = token_encoder_config_from_tokens(tokens, vocab, dim=8, d_model=12)
    lookup = ItemFeatureLookup.from_tokens(tokens, vocab["item_id"])
    options = HSTUAttentionConfig(dv=2, normaliser="length", num_time_buckets=9)
    lum = LUM(LUMConfig(d_model=12, num_heads=3, dropout=0.1, max_len=20, backbone="hstu", hstu=options), enc, lookup)
    layer = lum.backbone.config
    assert (layer.d_model, layer.num_heads, layer.dropout, layer.max_len) == (12, 3, 0.1, 20)
    assert (layer.dqk, layer.dv, layer.normaliser, layer.num_time_buckets) == (4, 2, "length", 9)
    with pytest.raises(ValueError, match="HSTUAttentionConfig: normaliser must be"):
        LUMConfig(hstu=HSTUAttentionConfig(normaliser="max"))
    with pytest.raises(ConfigError, match=r"model_config\.hstu\.dqk.*expected an integer"):
        build_model("lum", {"backbone": "hstu", "hstu": {"dqk": "wide"}}, None, None, None, 20)
    with pytest.raises(ConfigError, match=r"unknown config key 'model_config\.hstu_normaliser'"):
        build_model("lum", {"backbone": "hstu", "hstu_normaliser": "length"}, None, None, None, 20)
