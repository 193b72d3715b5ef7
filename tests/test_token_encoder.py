"""TokenEncoder: exact pooled sums, shared tables, meta-device build, candidates embedded like in-sequence items."""

from __future__ import annotations

import doctest

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import lumrec.modules.layers.token_encoder as token_encoder_mod
from lumrec.data.batches import make_jagged_batch
from lumrec.data.packing import pack_sequences
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import CONDITION, ITEM, JaggedIds, TokenConfig, build_lum_tokens
from lumrec.data.validate import DataValidationError
from lumrec.modules.layers.token_encoder import (
    FeatureTableConfig,
    ItemFeatureLookup,
    TokenEncoder,
    TokenEncoderConfig,
    token_encoder_config_from_dataset,
    token_encoder_config_from_tokens,
)

NUM_ITEMS, NUM_CATS = 30, 6
VOCAB = {"item_id": NUM_ITEMS, "category_id": NUM_CATS, "scenario": 3, "query_id": 11}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning OpenMP workers slow ~30x when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sequences(lengths: list[int], seed: int = 0) -> UserSequences:
    """Hand-made events: each item has one fixed category (as in a real catalogue)."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    item = rng.integers(1, NUM_ITEMS, n)
    return UserSequences(
        user_ids=np.arange(len(lengths), dtype=np.int64) + 1,
        offsets=offsets_from_lengths(np.asarray(lengths)),
        item_id=item.astype(np.int64),
        ts=np.arange(n, dtype=np.int64) * 60,
        action=np.ones(n, dtype=np.int32),
        scenario=rng.integers(1, 3, n).astype(np.int32),
        query_id=rng.integers(0, 11, n).astype(np.int64),
        category_id=(item % (NUM_CATS - 1) + 1).astype(np.int64),
    )


def _item_lists() -> dict[str, JaggedIds]:
    """A multi-valued item feature `category_ids`: 0..2 categories per item."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 3, NUM_ITEMS).astype(np.int32)
    return {"category_ids": JaggedIds(lengths, rng.integers(1, NUM_CATS, int(lengths.sum())))}


def _tokens(lengths=(3, 1, 4, 2), **cfg):
    cfg.setdefault("condition_features", ["scenario", "category_id"])
    cfg.setdefault("item_features", ["item_id", "category_id", "category_ids"])
    return build_lum_tokens(_sequences(list(lengths)), TokenConfig(**cfg), item_lists=_item_lists())


def _batch(tokens, max_len=16, dense=None):
    plan = pack_sequences(tokens.offsets, tokens.token_type, max_len)
    return make_jagged_batch(tokens, plan, dense)


def test_doctests():
    assert doctest.testmod(token_encoder_mod, raise_on_error=True).attempted > 0


def test_pooled_sums_and_projections_are_exact():
    cfg = TokenEncoderConfig(
        tables=[
            FeatureTableConfig("t_a", 5, 4, ["cond_a"]),
            FeatureTableConfig("t_b", 7, 8, ["item_id", "tags"]),
        ],
        condition_keys=["cond_a"],
        item_keys=["item_id", "tags"],
        d_model=6,
    )
    enc = TokenEncoder(cfg)
    with torch.no_grad():
        ta = enc.embedding_bag_collection.embedding_bags["t_a"].weight
        tb = enc.embedding_bag_collection.embedding_bags["t_b"].weight
        ta.copy_(torch.arange(20, dtype=torch.float32).view(5, 4))
        tb.copy_(torch.arange(56, dtype=torch.float32).view(7, 8) * 0.5)
    # tokens: [c(a=2), i(item 3, tags {1, 4}), c(a={1, 4} multi), i(item 6, tags none)]
    kjt = KeyedJaggedTensor(
        keys=["cond_a", "item_id", "tags"],
        values=torch.tensor([2, 1, 4, 3, 6, 1, 4]),
        lengths=torch.tensor([1, 0, 2, 0, 0, 1, 0, 1, 0, 2, 0, 0], dtype=torch.int32),
        stride=4,
    )
    pooled = enc.pooled(kjt)
    torch.testing.assert_close(pooled["cond_a"][0], ta[2])
    torch.testing.assert_close(pooled["cond_a"][2], ta[1] + ta[4])
    assert torch.all(pooled["cond_a"][[1, 3]] == 0)
    torch.testing.assert_close(pooled["item_id"][1], tb[3])
    torch.testing.assert_close(pooled["tags"][1], tb[1] + tb[4])
    assert torch.all(pooled["tags"][3] == 0)

    token_type = torch.tensor([CONDITION, ITEM, CONDITION, ITEM])
    out = enc(kjt, token_type)
    expect_c = enc.condition_proj(torch.stack([ta[2], ta[1] + ta[4]]))
    expect_i = enc.item_proj(torch.stack([torch.cat([tb[3], tb[1] + tb[4]]), torch.cat([tb[6], torch.zeros(8)])]))
    torch.testing.assert_close(out[[0, 2]], expect_c)
    torch.testing.assert_close(out[[1, 3]], expect_i)
    # KJT keys in another order (or with extra keys) select the same features.
    reordered = kjt.permute([2, 0, 1])
    torch.testing.assert_close(enc(reordered, token_type), out)


def test_shared_table_between_item_and_condition_category():
    tokens = _tokens()
    cfg = token_encoder_config_from_tokens(tokens, VOCAB, dim=8, d_model=16)
    tables = {t.name: t for t in cfg.tables}
    # category_id, cond_category_id and the list feature category_ids all use the category vocabulary.
    assert sorted(tables) == ["t_category_id", "t_item_id", "t_scenario"]
    assert sorted(tables["t_category_id"].feature_names) == ["category_id", "category_ids", "cond_category_id"]
    assert tables["t_category_id"].num_embeddings == NUM_CATS and tables["t_item_id"].num_embeddings == NUM_ITEMS
    enc = TokenEncoder(cfg)
    kjt = KeyedJaggedTensor(
        keys=cfg.keys,
        values=torch.tensor([3, 3]),
        lengths=torch.tensor([0, 1, 0, 1, 0], dtype=torch.int32),  # cond_scenario, cond_category_id, item_id, category_id, category_ids
        stride=1,
    )
    pooled = enc.pooled(kjt)
    torch.testing.assert_close(pooled["cond_category_id"], pooled["category_id"])
    # Both keys train the same rows.
    (pooled["cond_category_id"].sum() + 2 * pooled["category_id"].sum()).backward()
    grad = enc.embedding_bag_collection.embedding_bags["t_category_id"].weight.grad
    assert torch.all(grad[3] == 3.0) and torch.all(grad[torch.arange(NUM_CATS) != 3] == 0)


def test_per_source_dims_explicit_torchrec_tables_and_config_errors():
    cfg = token_encoder_config_from_dataset(
        VOCAB, ["cond_scenario"], ["item_id"], {"cond_scenario": "scenario", "item_id": "item_id"},
        dim={"scenario": 4, "item_id": 12}, d_model=8,
    )
    assert [(t.name, t.embedding_dim) for t in cfg.tables] == [("t_scenario", 4), ("t_item_id", 12)]
    assert TokenEncoder(cfg).item_proj.in_features == 12
    # An existing DLRM's EmbeddingBagConfig is reused as is.
    dlrm_table = EmbeddingBagConfig(name="t_cat", num_embeddings=9, embedding_dim=8, feature_names=["cond_cat", "cat"], pooling=PoolingType.SUM)
    explicit = TokenEncoderConfig(
        [FeatureTableConfig.from_torchrec(dlrm_table), FeatureTableConfig("t_item", 5, 4, ["item_id"])],
        ["cond_cat"], ["item_id", "cat"], d_model=8,
    )
    assert explicit.table_of("cat").name == "t_cat" and explicit.feature_dim(["item_id", "cat"]) == 12
    # YAML-style mappings are accepted for tables.
    assert TokenEncoderConfig([dict(name="t", num_embeddings=3, embedding_dim=4, feature_names=["c", "i"])], ["c"], ["i"]).tables[0].name == "t"

    with pytest.raises(ValueError, match="no vocabulary size for source feature 'query_id'"):
        token_encoder_config_from_dataset({"item_id": 5}, ["cond_query_id"], ["item_id"], {"cond_query_id": "query_id", "item_id": "item_id"}, 4, 8)
    with pytest.raises(ValueError, match="key 'cond_x' has no entry in key_sources"):
        token_encoder_config_from_dataset(VOCAB, ["cond_x"], ["item_id"], {"item_id": "item_id"}, 4, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        FeatureTableConfig("t_odd", 10, 6, ["x"])
    with pytest.raises(ValueError, match=r"no table looks up key\(s\) \['cat'\]"):
        TokenEncoderConfig([FeatureTableConfig("t", 3, 4, ["c", "i"])], ["c"], ["i", "cat"])
    with pytest.raises(ValueError, match="looked up by tables 't' and 'u'"):
        TokenEncoderConfig([FeatureTableConfig("t", 3, 4, ["c", "i"]), FeatureTableConfig("u", 3, 4, ["i"])], ["c"], ["i"])
    with pytest.raises(ValueError, match="names key 'zz'"):
        TokenEncoderConfig([FeatureTableConfig("t", 3, 4, ["c", "i", "zz"])], ["c"], ["i"])
    with pytest.raises(ValueError, match="SUM pooling"):
        FeatureTableConfig.from_torchrec(EmbeddingBagConfig(name="m", num_embeddings=3, embedding_dim=4, feature_names=["x"], pooling=PoolingType.MEAN))


def test_bad_batches_raise_named_errors():
    cfg = TokenEncoderConfig([FeatureTableConfig("t_c", 3, 4, ["cond_c"]), FeatureTableConfig("t_i", 5, 4, ["item_id"])], ["cond_c"], ["item_id"], d_model=8)
    enc = TokenEncoder(cfg)
    ok = KeyedJaggedTensor(keys=["cond_c", "item_id"], values=torch.tensor([1, 4]), lengths=torch.tensor([1, 0, 0, 1], dtype=torch.int32), stride=2)
    assert enc(ok, torch.tensor([0, 1])).shape == (2, 8)
    too_big = KeyedJaggedTensor(keys=["cond_c", "item_id"], values=torch.tensor([1, 5]), lengths=torch.tensor([1, 0, 0, 1], dtype=torch.int32), stride=2)
    with pytest.raises(ValueError, match=r"key 'item_id' has ids in \[5, 5\] but table 't_i' has 5 rows"):
        enc(too_big, torch.tensor([0, 1]))
    missing = KeyedJaggedTensor(keys=["item_id"], values=torch.tensor([4]), lengths=torch.tensor([0, 1], dtype=torch.int32), stride=2)
    with pytest.raises(ValueError, match=r"KJT lacks key\(s\) \['cond_c'\]"):
        enc(missing, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="stride 2 != number of tokens 3"):
        enc(ok, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="token_type must be 0"):
        enc(ok, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="dense_dim=0"):
        enc(ok, torch.tensor([0, 1]), dense=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"item_id: ids must be in \[0, 5\)"):
        enc.embed_items(torch.tensor([5]), ItemFeatureLookup(5))


def test_meta_device_build_then_materialise():
    tokens = _tokens()
    cfg = token_encoder_config_from_tokens(tokens, VOCAB, dim=8, d_model=16)
    torch.manual_seed(0)
    real = TokenEncoder(cfg)
    meta = TokenEncoder(cfg, table_device="meta")
    assert all(p.device.type == "meta" for p in meta.embedding_bag_collection.parameters())
    assert meta.item_proj.weight.device.type == "cpu"  # only the tables wait for sharding

    meta.to_empty(device="cpu")
    meta.reset_parameters()
    for table in cfg.tables:
        weight = meta.embedding_bag_collection.embedding_bags[table.name].weight
        bound = (1.0 / table.num_embeddings) ** 0.5  # torchrec's default uniform init
        assert weight.abs().max() <= bound and weight.std() > bound / 4
    batch = _batch(tokens)
    out = meta(batch.kjt, batch.token_type)
    assert out.shape == (batch.num_tokens, 16) and torch.isfinite(out).all()
    # Warm start: loading a trained encoder's weights gives its outputs exactly.
    meta.load_state_dict(real.state_dict())
    torch.testing.assert_close(meta(batch.kjt, batch.token_type), real(batch.kjt, batch.token_type), rtol=0, atol=0)


@pytest.mark.parametrize("with_dense", [False, True])
def test_embed_items_equals_in_sequence_item_tokens(with_dense):
    tokens = _tokens((5, 2, 7, 1, 3))
    dense = np.random.default_rng(3).normal(size=(NUM_ITEMS, 3)).astype(np.float32) if with_dense else None
    cfg = token_encoder_config_from_tokens(tokens, VOCAB, dim=8, d_model=16, dense_dim=3 if with_dense else 0)
    torch.manual_seed(1)
    enc = TokenEncoder(cfg)
    lookup = ItemFeatureLookup.from_tokens(tokens, NUM_ITEMS, dense=dense)
    batch = _batch(tokens, dense=dense)
    hidden = enc(batch.kjt, batch.token_type, batch.dense)
    item_rows = torch.nonzero(batch.token_type == ITEM).flatten()
    ids = batch.item_id[item_rows]
    torch.testing.assert_close(enc.embed_items(ids, lookup), hidden[item_rows], rtol=1e-6, atol=1e-6)
    # Candidates in another order and repeated embed the same way; the KJT carries every item key.
    perm = torch.flip(ids, [0])
    torch.testing.assert_close(enc.embed_items(perm, lookup), torch.flip(hidden[item_rows], [0]), rtol=1e-6, atol=1e-6)
    kjt = enc.item_kjt(ids[:3], lookup)
    assert kjt.keys() == cfg.keys and kjt.stride() == 3
    assert kjt["category_ids"].lengths().tolist() == _item_lists()["category_ids"].lengths[ids[:3].numpy()].tolist()
    if with_dense:
        with pytest.raises(ValueError, match="no dense features"):
            enc.embed_items(ids, ItemFeatureLookup.from_tokens(tokens, NUM_ITEMS))


def test_item_lookup_from_items_table_matches_from_tokens():
    tokens = _tokens((6, 4, 5))
    lists = _item_lists()["category_ids"]
    seen = np.unique(tokens.item_id[tokens.token_type == ITEM])
    offsets = lists.offsets()
    table = pa.table({
        "item_id": pa.array(seen),
        "category_id": pa.array(seen % (NUM_CATS - 1) + 1),
        "category_ids": pa.array([lists.values[offsets[i]:offsets[i + 1]].tolist() for i in seen], type=pa.list_(pa.int64())),
        "f_ctr": pa.array(seen * 0.01, type=pa.float32()),
    })
    from_table = ItemFeatureLookup.from_items_table(table, ["item_id", "category_id", "category_ids"], NUM_ITEMS, dense_columns=["f_ctr"])
    from_tokens = ItemFeatureLookup.from_tokens(tokens, NUM_ITEMS)
    ids = torch.from_numpy(seen)
    for key in ("category_id", "category_ids"):
        for a, b in zip(from_table.ids(key, ids), from_tokens.ids(key, ids)):
            assert torch.equal(a, b), key
    torch.testing.assert_close(from_table.dense_rows(ids)[:, 0], ids.float() * 0.01)
    assert from_table.state_dict() == {}  # data, not parameters: rebuilt daily, never pinned by a checkpoint
    with pytest.raises(DataValidationError, match="item feature 'brand' is not a column"):
        ItemFeatureLookup.from_items_table(table, ["item_id", "brand"], NUM_ITEMS)
    with pytest.raises(ValueError, match="has no feature 'brand'"):
        from_tokens.ids("brand", ids)
    with pytest.raises(ValueError, match="has 4 rows, expected num_items=30"):
        ItemFeatureLookup(NUM_ITEMS, {"category_id": np.zeros(4, dtype=np.int64)})


def test_embed_conditions_equals_condition_tokens():
    tokens = _tokens((4, 3))
    cfg = token_encoder_config_from_tokens(tokens, VOCAB, dim=8, d_model=16)
    enc = TokenEncoder(cfg)
    batch = _batch(tokens)
    hidden = enc(batch.kjt, batch.token_type)
    rows = torch.nonzero(batch.token_type == CONDITION).flatten()
    per_key = batch.kjt.to_dict()
    conditions = {k: per_key[k].values() for k in cfg.condition_keys}  # one id per condition token
    torch.testing.assert_close(enc.embed_conditions(conditions), hidden[rows], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="condition key 'cond_scenario' missing"):
        enc.embed_conditions({"cond_category_id": torch.tensor([2])})
    # No condition features: the constant condition is filled in.
    const_tokens = _tokens((2, 2), condition_features=[])
    const_enc = TokenEncoder(token_encoder_config_from_tokens(const_tokens, VOCAB, dim=8, d_model=16))
    cb = _batch(const_tokens)
    expect = const_enc(cb.kjt, cb.token_type)[0]
    torch.testing.assert_close(const_enc.embed_conditions({}, num_tokens=3), expect.expand(3, -1))
