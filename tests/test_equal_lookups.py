"""Lookups padded to one stride (modules/layers/equal_lookups.py): empty bags change no real row and no gradient.

The 2-rank runs that need the padding (row-wise pooled tables) are in tests/test_pretrain_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.layers.equal_lookups import pad_kjt_stride, set_lookup_group
from lumrec.modules.layers.token_encoder import FeatureTableConfig, ItemFeatureLookup, TokenEncoderConfig
from lumrec.modules.retrieval.hstu_retrieval import HSTURetrieval, hstu_preset
from lumrec.modules.retrieval.lum import LUM, LUMConfig
from lumrec.modules.retrieval.sasrec import SASRec, SASRecConfig


def _collection(seed: int) -> EmbeddingBagCollection:
    torch.manual_seed(seed)
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=13, feature_names=["a", "c"], pooling=PoolingType.SUM),
        EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=7, feature_names=["b"], pooling=PoolingType.MEAN),
    ])


def _random_kjt(g: torch.Generator, stride: int, weighted: bool) -> KeyedJaggedTensor:
    keys = ["a", "b", "c"]
    lengths = torch.randint(0, 4, (len(keys) * stride,), generator=g, dtype=torch.int32)
    sizes = lengths.view(len(keys), stride).sum(1).tolist()
    values = torch.cat([torch.randint(0, 13 if k != "b" else 7, (n,), generator=g) for k, n in zip(keys, sizes)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights, stride=stride)


@pytest.mark.parametrize("seed", range(6))
def test_padded_lookup_equals_plain_lookup_rows_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    stride = int(torch.randint(1, 9, (1,), generator=g))
    extra = int(torch.randint(0, 6, (1,), generator=g))
    kjt = _random_kjt(g, stride, weighted=False)
    padded = pad_kjt_stride(kjt, stride + extra)
    assert padded.stride() == stride + extra and torch.equal(padded.values(), kjt.values())
    lengths = padded.lengths().view(3, stride + extra)  # every key keeps its bags, then `extra` empty ones
    assert torch.equal(lengths[:, :stride], kjt.lengths().view(3, stride)) and not bool(lengths[:, stride:].any())
    grads = []
    for source, rows in ((kjt, None), (padded, stride)):
        ebc = _collection(0)
        out = ebc(source).to_dict()
        out = out if rows is None else {k: v[:rows] for k, v in out.items()}
        upstream = torch.Generator().manual_seed(seed + 100)
        loss = sum((v * torch.randn(v.shape, generator=upstream)).sum() for v in out.values())
        loss.backward()
        grads.append(({k: v.detach() for k, v in out.items()}, {n: p.grad for n, p in ebc.named_parameters()}))
    (out0, grad0), (out1, grad1) = grads
    for key in out0:
        assert torch.equal(out0[key], out1[key]), key
    for name in grad0:
        assert torch.equal(grad0[name], grad1[name]), name


def test_a_rank_without_bags_pads_to_empty_bags():
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.zeros(0, dtype=torch.int64),
                            lengths=torch.zeros(0, dtype=torch.int32), stride=0)
    padded = pad_kjt_stride(kjt, 3)
    assert padded.stride() == 3 and padded.lengths().tolist() == [0] * 6 and padded.values().numel() == 0


def test_weighted_kjt_keeps_its_weights():
    kjt = _random_kjt(torch.Generator().manual_seed(1), 4, weighted=True)
    padded = pad_kjt_stride(kjt, 6)
    assert torch.equal(padded.weights(), kjt.weights())


def test_pad_refuses_a_smaller_stride():
    kjt = _random_kjt(torch.Generator().manual_seed(2), 4, weighted=False)
    assert pad_kjt_stride(kjt, 4) is kjt
    with pytest.raises(ValueError, match="smaller than the KJT's 4"):
        pad_kjt_stride(kjt, 3)


def test_set_lookup_group_reaches_every_pretraining_model_table_owner():
    sasrec = SASRec(SASRecConfig(d_model=8, max_len=8), num_items=6)
    hstu = HSTURetrieval(hstu_preset("hstu", hstu=dict(d_model=8, dqk=4, dv=4, max_len=8)), num_items=6)
    enc = TokenEncoderConfig([FeatureTableConfig("t_s", 3, 4, ["cond_scenario"]), FeatureTableConfig("t_i", 10, 4, ["item_id"])],
                             ["cond_scenario"], ["item_id"], d_model=8)
    lum = LUM(LUMConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=16, max_len=8), enc, ItemFeatureLookup(10))
    marker = object()
    for model, owners in ((sasrec, ["input"]), (hstu, ["input"]), (lum, ["encoder"])):
        assert set_lookup_group(model, marker) == owners
        assert all(model.get_submodule(name).lookup_group is marker for name in owners)
        assert set_lookup_group(model, None) == owners and model.get_submodule(owners[0]).lookup_group is None
