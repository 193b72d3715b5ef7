"""Ranking backbones (Embedding+MLP, DIN, SIM): jagged ops vs padded/per-sequence references, shapes, gradients, learning; their registry."""

from __future__ import annotations

import doctest
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import lumrec.modules.ranking.din as din_mod
import lumrec.modules.ranking.builder as ranker_builder_mod
import lumrec.modules.ranking.base as ranking_mod
import lumrec.modules.ranking.registry as ranking_registry_mod
import lumrec.modules.ranking.sim as sim_mod
from lumrec.config import ConfigError

from lumrec.modules.ranking.din import (
    DIN,
    DINConfig,
    DINTrain,
    SequenceArch,
    TargetAttentionArch,
    compact,
    keep_most_recent,
    target_attention_padded_reference,
)
from lumrec.modules.ops import lengths_to_offsets
from lumrec.modules.ranking.builder import RankModelConfig, build_ranker
from lumrec.modules.ranking.base import (
    EmbeddingMLP,
    EmbeddingMLPConfig,
    EmbeddingMLPTrain,
    LogitArch,
    PooledSparseArch,
    RankerParts,
    RankingBatch,
    RankingTrain,
    TableConfig,
    dense_part,
)
from lumrec.modules.ranking.registry import ranker_spec, register_ranker, unregister_ranker
from lumrec.modules.ranking.sim import SIM, SIMConfig, SIMTrain, hard_search_mask
from lumrec.ranking_metrics import auc

NUM_USERS, NUM_ITEMS, NUM_CATS = 40, 64, 8
KEYS = ["user_id", "item_id", "category_id", "hist_item_id", "hist_category_id"]
D = 8


def category_of(items: torch.Tensor) -> torch.Tensor:
    return items % NUM_CATS + 1


def planted_batch(n: int, seed: int, max_hist: int = 30, lum_dim: int = 0) -> RankingBatch:
    """label = 1 iff the candidate's category occurs in the history (histories drawn from 3 of 8 categories)."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(1, NUM_USERS, (n,), generator=g)
    items = torch.randint(1, NUM_ITEMS, (n,), generator=g)
    lengths = torch.randint(0, max_hist + 1, (n,), generator=g)
    hist_items, labels = [], []
    for b in range(n):
        cats = torch.randperm(NUM_CATS, generator=g)[:3]
        # An item of category c+1 is c + NUM_CATS * k (k >= 0, id >= 1).
        k = torch.randint(0, NUM_ITEMS // NUM_CATS - 1, (int(lengths[b]),), generator=g)
        chosen = cats[torch.randint(0, 3, (int(lengths[b]),), generator=g)]
        h = chosen + NUM_CATS * (k + 1)
        hist_items.append(h)
        labels.append(float(bool((category_of(h) == category_of(items[b])).any())))
    hist = torch.cat(hist_items) if hist_items else torch.zeros(0, dtype=torch.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        KEYS,
        torch.cat([users, items, category_of(items), hist, category_of(hist)]),
        torch.cat([torch.ones(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64), lengths, lengths]),
    )
    lum = torch.randn(n, lum_dim, generator=g) if lum_dim else None
    return RankingBatch(kjt, torch.tensor(labels), dense_features=torch.randn(n, 2, generator=g), lum_features=lum)


def sequence_tables() -> list[TableConfig]:
    return [
        TableConfig("t_item", NUM_ITEMS, D, ["item_id", "hist_item_id"]),
        TableConfig("t_cat", NUM_CATS + 1, D, ["category_id", "hist_category_id"]),
    ]


def make_model(kind: str, lum_dim: int = 0):
    context = [TableConfig("t_user", NUM_USERS, D, ["user_id"])]
    common = dict(dense_dim=2, lum_dim=lum_dim, mlp=[32, 16])
    if kind == "mlp":
        tables = context + [
            TableConfig("t_item", NUM_ITEMS, D, ["item_id"]),
            TableConfig("t_cat", NUM_CATS + 1, D, ["category_id"]),
            TableConfig("t_hist_cat", NUM_CATS + 1, D, ["hist_category_id"], pooling="sum"),
            TableConfig("t_hist_item", NUM_ITEMS, D, ["hist_item_id"], pooling="mean"),
        ]
        model = EmbeddingMLP(EmbeddingMLPConfig(tables, **common))
        return model, EmbeddingMLPTrain(model)
    seq = dict(sequence_tables=sequence_tables(), candidate_keys=["item_id", "category_id"],
               history_keys=["hist_item_id", "hist_category_id"], context_tables=context, attention_mlp=[16], **common)
    if kind == "din":
        model = DIN(DINConfig(**seq))
        return model, DINTrain(model)
    model = SIM(SIMConfig(**seq, max_search_len=8, short_len=3))
    return model, SIMTrain(model)


# -- jagged ops vs references -------------------------------------------------------------------


def _random_jagged(seed: int, batch: int, max_len: int, dim: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    lengths[0], lengths[1], lengths[2] = 0, 1, max_len
    offsets = lengths_to_offsets(lengths)
    history = torch.randn(int(lengths.sum()), dim, generator=g, dtype=dtype)
    target = torch.randn(batch, dim, generator=g, dtype=dtype)
    return target, history, offsets


@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_attention_jagged_matches_padded_reference(normalize, seed):
    torch.manual_seed(seed)
    arch = TargetAttentionArch(6, [10, 5], normalize=normalize).double()
    target, history, offsets = _random_jagged(seed, batch=9, max_len=7, dim=6)
    target.requires_grad_(True)
    history.requires_grad_(True)
    out = arch(target, history, offsets)
    ref = target_attention_padded_reference(arch, target, history, offsets)
    torch.testing.assert_close(out, ref)
    assert torch.all(out[0] == 0)  # empty sequence pools to zeros
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [target, history, *arch.parameters()])
    ref_grads = torch.autograd.grad((ref * w).sum(), [target, history, *arch.parameters()])
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


def test_target_attention_all_empty_and_float32():
    arch = TargetAttentionArch(4, [8])
    out = arch(torch.randn(3, 4), torch.zeros(0, 4), torch.zeros(4, dtype=torch.int64))
    assert out.shape == (3, 4) and torch.all(out == 0)
    target, history, offsets = _random_jagged(5, batch=6, max_len=5, dim=4, dtype=torch.float32)
    torch.testing.assert_close(arch(target, history, offsets), target_attention_padded_reference(arch, target, history, offsets))


def _hard_search_reference(cand: list[int], hist: list[int], lengths: list[int], cap: int) -> list[bool]:
    keep, start = [], 0
    for b, n in enumerate(lengths):
        seq = hist[start : start + n]
        matched = [j for j in range(n) if seq[j] == cand[b]]
        chosen = set(matched[-cap:])  # the most recent `cap` matches
        keep += [j in chosen for j in range(n)]
        start += n
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_hard_search_and_recent_mask_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    batch, cap = 12, int(torch.randint(1, 5, (1,), generator=g))
    lengths = torch.randint(0, 15, (batch,), generator=g)
    lengths[0], lengths[1] = 0, 1
    offsets = lengths_to_offsets(lengths)
    hist = torch.randint(0, 4, (int(lengths.sum()),), generator=g)
    cand = torch.randint(0, 4, (batch,), generator=g)
    mask = hard_search_mask(cand, hist, offsets, cap)
    assert mask.tolist() == _hard_search_reference(cand.tolist(), hist.tolist(), lengths.tolist(), cap)
    recent = keep_most_recent(offsets, cap)
    expected, start = [], 0
    for n in lengths.tolist():
        expected += [j >= n - cap for j in range(n)]
        start += n
    assert recent.tolist() == expected
    values, new_offsets = compact(hist, offsets, mask)
    start, ref_values, ref_lengths = 0, [], []
    for b, n in enumerate(lengths.tolist()):
        kept = [hist[start + j].item() for j in range(n) if mask[start + j]]
        ref_values += kept
        ref_lengths.append(len(kept))
        start += n
    assert values.tolist() == ref_values
    assert new_offsets.tolist() == lengths_to_offsets(torch.tensor(ref_lengths)).tolist()


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "din", "sim"])
def test_forward_shapes_and_gradients_flow(kind):
    torch.manual_seed(0)
    model, train = make_model(kind)
    batch = planted_batch(16, seed=1)
    loss, logits = train(batch)
    assert logits.shape == (16,) and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    named = dict(model.named_parameters())
    for name, p in named.items():
        assert p.grad is not None, name
    tables = {n: p for n, p in named.items() if "embedding" in n}
    untouched = [n for n, p in tables.items() if float(p.grad.abs().sum()) == 0]
    assert tables and not untouched, untouched
    # Inference: the model alone, same logits.
    torch.testing.assert_close(model(batch.sparse_features, batch.dense_features), logits)


@pytest.mark.parametrize("kind", ["mlp", "din", "sim"])
def test_lum_features_on_off_changes_input_width(kind):
    torch.manual_seed(0)
    without, _ = make_model(kind, lum_dim=0)
    with_lum, train = make_model(kind, lum_dim=6)
    assert with_lum.in_features == without.in_features + 6
    batch = planted_batch(8, seed=2, lum_dim=6)
    kt = KeyedTensor.from_tensor_list(["lum_oq_candidate", "lum_sim_candidate"], [batch.lum_features[:, :5], batch.lum_features[:, 5:]])
    torch.testing.assert_close(with_lum(batch.sparse_features, batch.dense_features, kt), train(batch)[1])
    owner = type(with_lum).__name__
    with pytest.raises(ValueError, match=f"{owner}: LUM features of width 6 are required"):
        with_lum(batch.sparse_features, batch.dense_features)
    with pytest.raises(ValueError, match=r"LUM features must be \[8, 6\], got \(8, 5\)"):
        with_lum(batch.sparse_features, batch.dense_features, batch.lum_features[:, :5])
    with pytest.raises(ValueError, match="got LUM features but the model was built without them"):
        without(batch.sparse_features, batch.dense_features, batch.lum_features)


@pytest.mark.parametrize("kind", ["mlp", "din", "sim"])
def test_models_learn_planted_rule(kind):
    torch.manual_seed(0)
    model, train = make_model(kind)
    opt = torch.optim.Adam(train.parameters(), lr=0.01)
    data = [planted_batch(128, seed=100 + s) for s in range(20)]
    for step in range(240):
        loss, _ = train(data[step % len(data)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = planted_batch(1000, seed=7)
    with torch.no_grad():
        logits = model(test.sparse_features, test.dense_features)
    score = auc(torch.sigmoid(logits), test.labels)
    assert score > 0.8, f"{kind}: AUC {score:.3f}"


def test_config_and_input_errors_name_the_key():
    tables = sequence_tables()
    with pytest.raises(ValueError, match="'item_id' \\(table 't_item'\\) and history key 'hist_category_id'"):
        DINConfig(tables, ["item_id", "category_id"], ["hist_category_id", "hist_item_id"])
    with pytest.raises(ValueError, match="share one embedding_dim"):
        DINConfig([tables[0], TableConfig("t_cat", 9, 4, ["category_id", "hist_category_id"])], ["item_id"], ["hist_item_id"])
    with pytest.raises(ValueError, match=r"\['category_id', 'hist_category_id'\] are neither candidate nor history keys"):
        DINConfig(tables, ["item_id"], ["hist_item_id"])
    with pytest.raises(ValueError, match="pooling must be 'sum' or 'mean'"):
        TableConfig("t", 10, 4, ["x"], pooling="max")
    with pytest.raises(ValueError, match="SIMConfig: short_len must be >= 1"):
        SIMConfig(tables, ["item_id", "category_id"], ["hist_item_id", "hist_category_id"], short_len=0)
    arch = SequenceArch(DINConfig(tables, ["item_id", "category_id"], ["hist_item_id", "hist_category_id"]))
    one = torch.ones(2, dtype=torch.int64)
    bad = KeyedJaggedTensor.from_lengths_sync(
        ["item_id", "category_id", "hist_item_id", "hist_category_id"], torch.ones(7, dtype=torch.int64),
        torch.cat([one, torch.tensor([2, 0]), one, one]),
    )
    with pytest.raises(ValueError, match="candidate key 'category_id' must have exactly one id per sample"):
        arch(bad)
    bad = KeyedJaggedTensor.from_lengths_sync(
        ["item_id", "category_id", "hist_item_id", "hist_category_id"], torch.ones(7, dtype=torch.int64),
        torch.cat([one, one, torch.tensor([2, 0]), one]),
    )
    with pytest.raises(ValueError, match="history key 'hist_category_id' has different lengths"):
        arch(bad)
    with pytest.raises(ValueError, match=r"SequenceArch: sparse features have no key\(s\) \['hist_category_id'\]"):
        arch(KeyedJaggedTensor.from_lengths_sync(
            ["item_id", "category_id", "hist_item_id"], torch.ones(4, dtype=torch.int64), torch.tensor([1, 1, 1, 1, 0, 0])
        ))


# -- the registry of ranking backbones ------------------------------------------------------------


@dataclass
class TinyOptions:
    width: int = 4


class TinyRanker(nn.Module):
    """The least a backbone needs: pooled tables ++ dense ++ LUM -> one hidden layer -> logit."""

    def __init__(self, parts: RankerParts, width: int) -> None:
        super().__init__()
        tables = parts.context_tables + parts.pooled_item_tables()
        self.sparse_arch = PooledSparseArch(EmbeddingBagCollection(tables=[t.to_torchrec() for t in tables]))
        self.widths = (parts.dense_dim, parts.lum_dim)
        self.over_arch = LogitArch(self.sparse_arch.out_features + sum(self.widths), [width])

    @property
    def in_features(self) -> int:
        return self.over_arch.in_features

    def forward(self, sparse_features, dense_features=None, lum_features=None):
        batch = sparse_features.stride()
        parts = [self.sparse_arch(sparse_features)]
        for x, width, name in zip((dense_features, lum_features), self.widths, ("dense features", "LUM features")):
            part = dense_part(x, width, name, batch, "TinyRanker")
            if part is not None:
                parts.append(part)
        return self.over_arch(torch.cat(parts, dim=1))


@pytest.fixture
def tiny_backbone():
    """A backbone registered with one decorator, as a file in modules/ would; removed afterwards."""

    @register_ranker("test_tiny", options=TinyOptions)
    def build_tiny(parts: RankerParts, options: TinyOptions) -> TinyRanker:
        return TinyRanker(parts, options.width)

    yield build_tiny
    unregister_ranker("test_tiny")


VOCAB = {"user_id": NUM_USERS, "item_id": NUM_ITEMS, "category_id": NUM_CATS + 1}


def test_a_registered_backbone_is_built_and_trained_by_name(tiny_backbone):
    sizes = RankModelConfig(embedding_dim=D, backbones={"test_tiny": {"width": 3}})
    torch.manual_seed(0)
    model, train = build_ranker("test_tiny", sizes, VOCAB, dense_dim=2, lum_dim=5)
    assert isinstance(model, TinyRanker) and isinstance(train, RankingTrain)
    # Pooled keys user_id, item_id, hist_item_id, category_id, hist_category_id (width D each), then dense and LUM.
    assert model.in_features == 5 * D + 2 + 5 and model.over_arch.logit.in_features == 3
    loss, logits = train(planted_batch(16, seed=1, lum_dim=5))
    loss.backward()
    assert logits.shape == (16,) and all(p.grad is not None for p in model.parameters())
    assert ranker_spec("test_tiny").builder is tiny_backbone and not ranker_spec("test_tiny").timestamps
    # Its options default when the config has none, and unknown keys name themselves.
    assert build_ranker("test_tiny", RankModelConfig(embedding_dim=D), VOCAB)[0].over_arch.logit.in_features == 4
    with pytest.raises(ConfigError, match=r"unknown config key 'sizes.backbones.test_tiny.widht'; valid keys here: \['width'\]"):
        RankModelConfig(backbones={"test_tiny": {"widht": 3}})


def test_unknown_model_errors_list_the_registered_backbones(tiny_backbone):
    with pytest.raises(ValueError, match="model: unknown ranking model 'nope'; choose from") as err:
        build_ranker("nope", RankModelConfig(), VOCAB)
    assert all(f"'{name}'" in str(err.value) for name in ("din", "hstu", "mlp", "sim", "test_tiny"))
    with pytest.raises(ConfigError, match=r"sizes.backbones: unknown ranking model\(s\) \['nope'\]"):
        RankModelConfig(backbones={"nope": {}})

    def other(parts, options):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="ranking model 'test_tiny' is registered twice"):
        register_ranker("test_tiny", options=TinyOptions)(other)


def test_built_in_backbones_are_found_without_importing_their_files():
    """The registry imports each file under modules/ that registers a backbone: no list of them to edit."""
    code = ("import sys; from lumrec.modules.ranking.registry import ranker_names, ranker_spec; "
            "assert 'lumrec.modules.ranking.sim' not in sys.modules; print(ranker_names(), ranker_spec('hstu').timestamps)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "['din', 'hstu', 'mlp', 'sim'] True"


@pytest.mark.parametrize("module", [ranking_registry_mod, ranker_builder_mod, ranking_mod, din_mod, sim_mod], ids=lambda m: m.__name__)
def test_doctests(module):
    assert doctest.testmod(module).failed == 0
