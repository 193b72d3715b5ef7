"""Warm start: a LUM-fed ranker from its no-LUM predecessor predicts the same, then learns; token encoder from DLRM tables."""

from __future__ import annotations

import doctest
from typing import Callable

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.checkpoint import CheckpointManager
from lumrec.config import ConfigError, from_dict
from lumrec.data.tokens import CONDITION, ITEM
from lumrec.modules.ranking.din import DIN, DINConfig
from lumrec.modules.ranking.base import EmbeddingMLP, EmbeddingMLPConfig, RankingBatch, RankingTrain, TableConfig
from lumrec.modules.ranking.sim import SIM, SIMConfig
from lumrec.modules.layers.token_encoder import TokenEncoder
import lumrec.modules.warm_start as warm_start_mod
from lumrec.modules.warm_start import (
    WarmStartConfig,
    WarmStartError,
    copy_table_weights,
    embedding_tables,
    load_source_state,
    token_encoder_config_from_tables,
    warm_start,
    warm_start_from,
)

USERS, ITEMS, CATS, D, DENSE, LUM = 12, 30, 5, 4, 3, 6
KEYS = ["user_id", "item_id", "category_id", "hist_item_id", "hist_category_id"]


def ranking_batch(n: int, seed: int, lum_dim: int = 0, max_hist: int = 6) -> RankingBatch:
    """Random ids (history lengths 0, 1 and max included), dense features, labels and optional LUM features."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_hist + 1, (n,), generator=g)
    lengths[:3] = torch.tensor([0, 1, max_hist])
    hist_items = torch.randint(0, ITEMS, (int(lengths.sum()),), generator=g)
    one = torch.ones(n, dtype=torch.int64)
    values = torch.cat([torch.randint(0, USERS, (n,), generator=g), torch.randint(0, ITEMS, (n,), generator=g),
                        torch.randint(0, CATS, (n,), generator=g), hist_items, hist_items % CATS])
    kjt = KeyedJaggedTensor.from_lengths_sync(KEYS, values, torch.cat([one, one, one, lengths, lengths]).to(torch.int32))
    lum = torch.randn(n, lum_dim, generator=g) if lum_dim else None
    return RankingBatch(kjt, torch.randint(0, 2, (n,), generator=g).float(), torch.rand(n, DENSE, generator=g), lum)


def embedding_mlp(lum_dim: int) -> nn.Module:
    tables = [TableConfig("t_user", USERS, D, ["user_id"]), TableConfig("t_item", ITEMS, D, ["item_id", "hist_item_id"], "mean"),
              TableConfig("t_cat", CATS, D, ["category_id", "hist_category_id"], "mean")]
    return EmbeddingMLP(EmbeddingMLPConfig(tables, dense_dim=DENSE, lum_dim=lum_dim, mlp=[16, 8]))


def _behaviour_kwargs(lum_dim: int) -> dict:
    return dict(
        sequence_tables=[TableConfig("t_item", ITEMS, D, ["item_id", "hist_item_id"]),
                         TableConfig("t_cat", CATS, D, ["category_id", "hist_category_id"])],
        candidate_keys=["item_id", "category_id"], history_keys=["hist_item_id", "hist_category_id"],
        context_tables=[TableConfig("t_user", USERS, D, ["user_id"])], dense_dim=DENSE, lum_dim=lum_dim,
        attention_mlp=[8], mlp=[8],
    )


def din(lum_dim: int) -> nn.Module:
    return DIN(DINConfig(**_behaviour_kwargs(lum_dim), max_history=4))


def sim(lum_dim: int) -> nn.Module:
    return SIM(SIMConfig(**_behaviour_kwargs(lum_dim), max_search_len=3, short_len=2))


def train_steps(train: nn.Module, batches: list, steps: int = 3, lr: float = 0.01) -> None:
    """A few Adam steps, so the source weights are not the fresh initialisation."""
    opt = torch.optim.Adam(train.parameters(), lr=lr)
    for i in range(steps):
        loss = train(batches[i % len(batches)])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()


def sgd_step(train: nn.Module, batch, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(train.parameters(), lr=lr)
    loss = train(batch)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Only the summation order of the widened matmul differs (its extra terms are exact zeros).
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build", [embedding_mlp, din, sim], ids=["embedding_mlp", "din", "sim"])
def test_ranker_with_lum_inputs_starts_where_the_old_one_was(build: Callable[[int], nn.Module]) -> None:
    torch.manual_seed(0)
    old = build(0)
    train_steps(RankingTrain(old), [ranking_batch(16, seed) for seed in range(3)])
    torch.manual_seed(1)  # a different fresh init, so copying is what makes them agree
    new = build(LUM)
    report = warm_start(new, old.state_dict())

    in_old = old.over_arch.in_features
    assert [(w.name, w.zero_columns) for w in report.widened] == [("over_arch.mlp._mlp.0._linear.weight", (in_old, in_old + LUM))]
    assert report.skipped == [] and report.missing == [] and report.untouched == []
    assert sorted(report.copied + [w.name for w in report.widened]) == sorted(new.state_dict())
    first = new.over_arch.mlp._mlp[0]._linear.weight
    assert torch.equal(first[:, in_old:], torch.zeros(first.shape[0], LUM))
    assert torch.equal(first[:, :in_old], old.over_arch.mlp._mlp[0]._linear.weight)

    batch = ranking_batch(10, seed=7, lum_dim=LUM)
    with torch.no_grad():
        want = old(batch.sparse_features, batch.dense_features)
        for seed in range(3):  # any LUM values: their columns are zero
            lum = torch.randn(10, LUM, generator=torch.Generator().manual_seed(seed)) * 10
            close(new(batch.sparse_features, batch.dense_features, lum), want)

    sgd_step(RankingTrain(new), batch)
    assert bool((first[:, in_old:] != 0).any()), "the zero LUM columns must be trainable"
    with torch.no_grad():
        assert not torch.allclose(new(batch.sparse_features, batch.dense_features, batch.lum_features), want, atol=1e-4)


# -- torchrec's own DLRM ----------------------------------------------------------------------------------------

DLRM_KEYS = ["user_id", "item_id", "category_id", "scenario"]
DLRM_ROWS = {"user_id": USERS, "item_id": ITEMS, "category_id": CATS, "scenario": 3}


def torchrec_dlrm(dense_in: int) -> DLRM:
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=8, num_embeddings=DLRM_ROWS[k], feature_names=[k]) for k in DLRM_KEYS]
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=dense_in,
                dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])


def dlrm_batch(n: int, seed: int, dense_in: int):
    from torchrec.datasets.utils import Batch

    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, DLRM_ROWS[k], (n,), generator=g) for k in DLRM_KEYS])
    kjt = KeyedJaggedTensor.from_lengths_sync(DLRM_KEYS, values, torch.ones(n * len(DLRM_KEYS), dtype=torch.int32))
    return Batch(dense_features=torch.rand(n, dense_in, generator=g), sparse_features=kjt,
                 labels=torch.randint(0, 2, (n,), generator=g).float())


@pytest.fixture(scope="module")
def trained_dlrm() -> DLRMTrain:
    torch.manual_seed(0)
    train = DLRMTrain(torchrec_dlrm(DENSE))
    train_steps(train, [dlrm_batch(16, seed, DENSE) for seed in range(3)])
    return train


def check_dlrm_equal(old: DLRM, new: DLRM) -> None:
    """LUM features appended to the dense input (as lum_dense_input does) change nothing yet."""
    batch = dlrm_batch(9, seed=11, dense_in=DENSE)
    with torch.no_grad():
        want = old(batch.dense_features, batch.sparse_features)
        lum = torch.randn(9, LUM, generator=torch.Generator().manual_seed(3))
        close(new(torch.cat([batch.dense_features, lum], 1), batch.sparse_features), want)


def test_torchrec_dlrm_with_wider_dense_input(trained_dlrm: DLRMTrain) -> None:
    torch.manual_seed(1)
    new = torchrec_dlrm(DENSE + LUM)
    report = warm_start(new, trained_dlrm.model.state_dict())
    assert [(w.name, w.source_shape, w.target_shape, w.zero_columns) for w in report.widened] == [
        ("dense_arch.model._mlp.0._linear.weight", (16, DENSE), (16, DENSE + LUM), (DENSE, DENSE + LUM))
    ]
    assert report.skipped == [] and report.missing == []
    check_dlrm_equal(trained_dlrm.model, new)
    batch = dlrm_batch(9, seed=12, dense_in=DENSE + LUM)
    sgd_step(DLRMTrain(new), batch)
    assert bool((new.dense_arch.model._mlp[0]._linear.weight[:, DENSE:] != 0).any())


def test_name_map_reads_a_dlrm_train_state_dict_into_a_plain_dlrm(trained_dlrm: DLRMTrain) -> None:
    source = trained_dlrm.state_dict()
    assert all(k.startswith("model.") for k in source)
    torch.manual_seed(1)
    new = torchrec_dlrm(DENSE + LUM)
    with pytest.raises(WarmStartError, match=r"model\.dense_arch\.model\._mlp\.0\._linear\.weight: no target tensor"):
        warm_start(new, source)  # unmapped names have no target: strict says which
    report = warm_start(new, source, WarmStartConfig(name_map={r"model\.": ""}))
    assert report.widened[0].source_name == "model.dense_arch.model._mlp.0._linear.weight"
    assert report.widened[0].name == "dense_arch.model._mlp.0._linear.weight"  # the inner ".model." is kept
    check_dlrm_equal(trained_dlrm.model, new)
    # The other way: a plain DLRM's names into a DLRMTrain (prefix added with a capture group).
    torch.manual_seed(2)
    wrapped = DLRMTrain(torchrec_dlrm(DENSE + LUM))
    report = warm_start(wrapped, trained_dlrm.model.state_dict(), WarmStartConfig(name_map={r"(.*)": r"model.\1"}))
    assert report.missing == [] and len(report.widened) == 1
    check_dlrm_equal(trained_dlrm.model, wrapped.model)


# -- sources on disk and errors --------------------------------------------------------------------------------------


def test_sources_checkpoint_folder_and_torch_save_file(tmp_path, trained_dlrm: DLRMTrain) -> None:
    old = trained_dlrm.model
    opt = torch.optim.Adam(old.parameters())
    root = tmp_path / "ckpt"
    step_dir = CheckpointManager(root).save(7, {"model": old.state_dict(), "optim": opt.state_dict()})
    torch.save(old.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": old.state_dict(), "step": 3}, tmp_path / "nested.pt")
    for source in (root, step_dir, tmp_path / "plain.pt", tmp_path / "nested.pt"):
        state = load_source_state(source)
        assert sorted(state) == sorted(old.state_dict()), source
        torch.manual_seed(5)
        new = torchrec_dlrm(DENSE + LUM)
        report = warm_start_from(new, WarmStartConfig(source=str(source)))
        assert len(report.widened) == 1 and not report.skipped
        check_dlrm_equal(old, new)


def test_bad_sources_name_the_path(tmp_path) -> None:
    target = torchrec_dlrm(DENSE)
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(WarmStartError, match=str(missing)):
        warm_start_from(target, WarmStartConfig(source=str(missing)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(WarmStartError, match=str(garbage)):
        warm_start_from(target, WarmStartConfig(source=str(garbage)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WarmStartError, match=f"{empty}: not a checkpoint folder"):
        load_source_state(empty)
    step_dir = CheckpointManager(tmp_path / "ckpt").save(1, {"model": target.state_dict()})
    data = next(p for p in step_dir.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(WarmStartError, match=f"{step_dir}.*SHA-256"):
        load_source_state(tmp_path / "ckpt")
    with pytest.raises(WarmStartError, match="no tensors under 'weights'"):
        load_source_state(CheckpointManager(tmp_path / "ok").save(1, {"model": target.state_dict()}), checkpoint_key="weights")
    with pytest.raises(ConfigError, match="source"):
        warm_start_from(target, WarmStartConfig())


def test_strict_shape_mismatch_names_the_tensor_and_copies_nothing() -> None:
    torch.manual_seed(0)
    old = embedding_mlp(0)
    cfg = EmbeddingMLPConfig([TableConfig("t_user", USERS + 5, D, ["user_id"]),  # more rows: not a widening
                              TableConfig("t_item", ITEMS, D, ["item_id", "hist_item_id"], "mean"),
                              TableConfig("t_cat", CATS, D, ["category_id", "hist_category_id"], "mean")],
                             dense_dim=DENSE, lum_dim=LUM, mlp=[16, 8])
    new = EmbeddingMLP(cfg)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    name = "sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
    with pytest.raises(WarmStartError, match=rf"{name}: shape \[{USERS}, {D}\] in the source vs \[{USERS + 5}, {D}\]"):
        warm_start(new, old.state_dict())
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())

    report = warm_start(new, old.state_dict(), WarmStartConfig(strict_shapes=False))
    assert [(s.source_name, s.target_name) for s in report.skipped] == [(name, name)]
    assert report.untouched == [name] and len(report.widened) == 1
    assert torch.equal(new.state_dict()[name], before[name])

    report = warm_start(new, old.state_dict(), WarmStartConfig(exclude=[r"\.t_user\."]))
    assert [(s.source_name, s.reason) for s in report.skipped] == [(name, "excluded")]


def test_non_linear_growth_is_a_mismatch_and_unexpected_tensors_are_reported() -> None:
    src = nn.ModuleDict({"emb": nn.Embedding(5, 4), "old_head": nn.Linear(4, 1)})
    dst = nn.ModuleDict({"emb": nn.Embedding(5, 8), "new_head": nn.Linear(4, 1)})
    report = warm_start(dst, src.state_dict(), WarmStartConfig(strict_shapes=False))
    assert report.copied == [] and report.widened == []
    assert {s.source_name: s.target_name for s in report.skipped} == {"emb.weight": "emb.weight", "old_head.weight": None,
                                                                      "old_head.bias": None}
    assert sorted(report.missing) == ["new_head.bias", "new_head.weight"]
    with pytest.raises(WarmStartError, match="old_head.weight: no target tensor"):
        warm_start(dst, src.state_dict())
    with pytest.raises(WarmStartError, match="both map to 'head.weight'"):
        two = {"a.weight": torch.zeros(1, 4), "b.weight": torch.zeros(1, 4)}
        warm_start(nn.ModuleDict({"head": nn.Linear(4, 1)}), two, WarmStartConfig(name_map={r"[ab]\.": "head."}))


def test_widen_at_inserts_new_columns_inside_the_input() -> None:
    torch.manual_seed(0)
    old, new = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(6, 3))
    report = warm_start(new, old.state_dict(), WarmStartConfig(widen_at={r"^0\.weight$": 1}))
    assert report.widened[0].zero_columns == (1, 3)
    x = torch.randn(5, 4)
    inserted = torch.cat([x[:, :1], torch.randn(5, 2), x[:, 1:]], 1)
    close(new(inserted), old(x))
    with pytest.raises(WarmStartError, match="past the source's 4 input columns"):
        warm_start(new, old.state_dict(), WarmStartConfig(widen_at={"weight": 9}))


def test_config_from_yaml_mapping_and_bad_patterns() -> None:
    cfg = from_dict(WarmStartConfig, {"source": "/x", "name_map": {"model\\.": ""}, "exclude": ["loss"], "strict_shapes": False})
    assert cfg.target_name("model.dense_arch.model.w") == "dense_arch.model.w" and cfg.excluded("loss_fn.w")
    with pytest.raises(ConfigError, match=r"name_map\['\(bad'\]"):
        WarmStartConfig(name_map={"(bad": ""})
    with pytest.raises(ConfigError, match=r"exclude\[1\]"):
        WarmStartConfig(exclude=["ok", "[bad"])
    with pytest.raises(ConfigError, match="unknown config key 'strict'"):
        from_dict(WarmStartConfig, {"strict": True})


# -- feature warm-up: LUM's token encoder from the DLRM's tables ----------------------------------------------------


def test_token_encoder_reuses_dlrm_tables_and_weights(trained_dlrm: DLRMTrain) -> None:
    dlrm = trained_dlrm.model
    cfg = token_encoder_config_from_tables(embedding_tables(dlrm), ["item_id", "category_id"], ["scenario", "category_id"], d_model=8)
    assert [(t.name, t.num_embeddings, t.embedding_dim, t.feature_names) for t in cfg.tables] == [
        ("t_item_id", ITEMS, 8, ["item_id"]),
        ("t_category_id", CATS, 8, ["category_id", "cond_category_id"]),
        ("t_scenario", 3, 8, ["cond_scenario"]),
    ]  # t_user_id: no token feature uses it
    assert cfg.condition_keys == ["cond_scenario", "cond_category_id"] and cfg.item_keys == ["item_id", "category_id"]
    torch.manual_seed(3)
    encoder = TokenEncoder(cfg)
    assert copy_table_weights(trained_dlrm, encoder) == ["t_item_id", "t_category_id", "t_scenario"]
    dlrm_bags = dlrm.sparse_arch.embedding_bag_collection.embedding_bags
    enc_bags = encoder.embedding_bag_collection.embedding_bags
    for name in ("t_item_id", "t_category_id", "t_scenario"):
        assert torch.equal(enc_bags[name].weight, dlrm_bags[name].weight)

    # Tokens [c(scenario 2, category 4), i(item 7, category 1), c(scenario 0, no category), i(item 0, category 0)].
    per_key = {"cond_scenario": [[2], [], [0], []], "cond_category_id": [[4], [], [], []],
               "item_id": [[], [7], [], [0]], "category_id": [[], [1], [], [0]]}
    lengths = torch.tensor([len(v) for k in cfg.keys for v in per_key[k]], dtype=torch.int32)
    values = torch.tensor([i for k in cfg.keys for v in per_key[k] for i in v])
    kjt = KeyedJaggedTensor(keys=cfg.keys, values=values, lengths=lengths, stride=4)
    out = encoder(kjt, token_type=torch.tensor([CONDITION, ITEM, CONDITION, ITEM]))
    w = {k: dlrm_bags[cfg.table_of(k).name].weight for k in cfg.keys}
    zero = torch.zeros(8)
    with torch.no_grad():
        want = torch.stack([
            encoder.condition_proj(torch.cat([w["cond_scenario"][2], w["cond_category_id"][4]])),
            encoder.item_proj(torch.cat([w["item_id"][7], w["category_id"][1]])),
            encoder.condition_proj(torch.cat([w["cond_scenario"][0], zero])),
            encoder.item_proj(torch.cat([w["item_id"][0], w["category_id"][0]])),
        ])
    close(out.detach(), want)


def test_token_encoder_from_our_table_configs_and_errors() -> None:
    model = din(0)  # sequence tables also serve hist_* keys; context table t_user
    tables = model.config.sequence_tables + model.config.context_tables
    cfg = token_encoder_config_from_tables(tables, ["item_id", "category_id"], [], d_model=8)
    assert [(t.name, t.feature_names) for t in cfg.tables] == [
        ("t_item", ["item_id"]), ("t_cat", ["category_id"]), ("t_const", ["cond_const"])
    ]
    encoder = TokenEncoder(cfg)
    assert copy_table_weights(model, encoder) == ["t_item", "t_cat"]  # from the DIN's EmbeddingCollection
    assert torch.equal(encoder.embedding_bag_collection.embedding_bags["t_item"].weight,
                       model.sequence_arch.embedding_collection.embeddings["t_item"].weight)

    with pytest.raises(ValueError, match="condition feature 'query_id' has no table"):
        token_encoder_config_from_tables(tables, ["item_id"], ["query_id"], d_model=8)
    other = TokenEncoder(token_encoder_config_from_tables(
        [TableConfig("t_item", ITEMS + 1, D, ["item_id"])], ["item_id"], [], d_model=8))
    with pytest.raises(ValueError, match=r"table 't_item' is \[30, 4\] in the DLRM but \[31, 4\]"):
        copy_table_weights(model, other)
    with pytest.raises(ValueError, match="no table names in common"):
        copy_table_weights(torchrec_dlrm(DENSE), encoder)


def test_doctests() -> None:
    assert doctest.testmod(warm_start_mod, raise_on_error=True).attempted > 0
