"""`lumrec rank` (step 3): results, LUM input width, exact resume, the point-in-time rule for knowledge, config errors."""

from __future__ import annotations

import argparse
import doctest
import importlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from lumrec.comparison import comparison_table, summarize_seeds
from lumrec.config import ConfigError, load_config
from lumrec.data.dataset import Dataset, day_bounds
from lumrec.knowledge import load_knowledge, write_knowledge
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.data.ranking_samples import build_ranking_samples
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.modules.lum_features import LUMFeatureModule, candidates_kjt
from lumrec.modules.lum_join import LUMJoin, RankLUMConfig
from lumrec.pipelines.rank import Ranker, register_rank, run_rank
from lumrec.pipelines.rank_config import RankConfig, RankModelConfig, RankTrainConfig

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
CONDITIONS = ["scenario=1", "scenario=2"] + [f"category_id={c}" for c in range(1, 5)]
DIM = 4


def make_data(root) -> str:
    """Tiny synthetic logs: 60 users, 50 items, 4 categories, 4 days."""
    path = root / "data"
    generate(path, SynthConfig(seed=3, num_users=60, num_items=50, num_categories=4, num_queries=8, num_days=4,
                               impressions_per_user_day=10))
    return str(path)


def write_store(store, day: str, scale: float = 1.0, seed: int = 0) -> None:
    """A knowledge partition for `day`: random o_q for users 1..60 under CONDITIONS and e_i for items 1..50, times `scale`."""
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(1, 61)
    write_knowledge(store, day, f"test-{day}", users, CONDITIONS, torch.randn(60, len(CONDITIONS), DIM, generator=g) * scale,
                    torch.arange(1, 51), torch.randn(50, DIM, generator=g) * scale)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    data = make_data(root)
    store = root / "store"
    for i, day in enumerate(DAYS[:-1]):
        write_store(store, day, seed=i)
    return root, data, str(store)


def lum_config(store: str, **kw) -> RankLUMConfig:
    base = dict(store=store, conditions=["scenario=1", "scenario=2"], candidate_condition_feature="category_id")
    base.update(kw)
    return RankLUMConfig(**base)


def rank_config(data: str, out, model: str = "sim", lum: RankLUMConfig | None = None, **train) -> RankConfig:
    t = dict(epochs=2, batch_size=64, eval_batch_size=256, max_history=20, progress=False)
    t.update(train)
    return RankConfig(
        data=data, out=str(out), model=model,
        samples=RankingSampleConfig(protocol="impressions", first_day=DAYS[1], test_fraction=0.3, valid_fraction=0.3),
        sizes=RankModelConfig(embedding_dim=8, mlp=[16], attention_mlp=[8], item_stats=["f_ctr_7d"],
                              backbones={"sim": {"max_search_len": 8, "short_len": 4}}),
        lum=lum, train=RankTrainConfig(**t),
    )


def trained_lum_run(root, model: str) -> Ranker:
    """A tiny `model` run with LUM features (a store per day but the last) and item statistics, trained one epoch under root/run."""
    data = make_data(root)
    store = root / "store"
    for i, day in enumerate(DAYS[:-1]):
        write_store(store, day, seed=i)
    ranker = Ranker(rank_config(data, root / "run", model, lum_config(str(store)), epochs=1))
    ranker.run()
    return ranker


@pytest.mark.parametrize("model", ["mlp", "din", "sim"])
def test_results_json_and_lum_changes_input_width(world, tmp_path, model):
    _, data, store = world
    base = run_rank(rank_config(data, tmp_path / "base", model, epochs=1))
    with_lum = run_rank(rank_config(data, tmp_path / "lum", model, lum_config(store), epochs=1))
    written = json.loads((tmp_path / "lum" / "results.json").read_text())
    assert written["test"] == with_lum["test"]
    for result in (base, with_lum):
        for key in ("auc", "ne", "calibration", "log_loss"):
            assert np.isfinite(result["test"][key]) and np.isfinite(result["valid"][key])
        assert 0.0 <= result["test"]["auc"] <= 1.0 and result["test"]["count"] > 0
    # LUM features: 3 o_q + e_i (4 wide each), 3 similarities, 4 missing flags.
    assert with_lum["lum_dim"] == 4 * DIM + 3 + 4
    assert with_lum["input_width"] - base["input_width"] == with_lum["lum_dim"] and base["lum_dim"] == 0
    assert not base["lum"] and with_lum["lum"]
    # Same samples in both (the comparison is on the same data).
    assert base["samples"] == with_lum["samples"]


@pytest.mark.parametrize("model", ["mlp", "sim", "hstu"])
def test_item_list_keys_widen_the_input_by_one_pooled_table(world, tmp_path, model):
    """sizes.list_keys: the candidate's category_ids and the history's bag of them, one mean-pooled table."""
    _, data, store = world
    base = rank_config(data, tmp_path / "base", model, epochs=1)
    listed = rank_config(data, tmp_path / "lists", model, lum_config(store), epochs=1)
    listed.sizes.list_keys = ["category_ids", "hist_category_ids"]
    a, b = run_rank(base), run_rank(listed)
    assert b["input_width"] - a["input_width"] == b["lum_dim"] + 2 * 8
    assert np.isfinite(b["test"]["auc"]) and b["samples"] == a["samples"]


def test_item_list_key_errors_name_the_key(world, tmp_path):
    _, data, _ = world
    cfg = rank_config(data, tmp_path / "x", "sim")
    cfg.sizes.list_keys = ["brand_ids"]
    with pytest.raises(ValueError, match="no vocabulary for list column 'brand_ids'"):
        run_rank(cfg)
    cfg.sizes.list_keys = ["category_ids", "category_ids"]
    with pytest.raises(ValueError, match="sizes.list_keys repeat"):
        run_rank(cfg)
    cfg.sizes.list_keys = ["category_id"]
    with pytest.raises(ValueError, match="column 'category_id' of the items table .* is not a list column"):
        run_rank(cfg)


def _strip(result: dict) -> dict:
    """What must match between runs (train timing excluded)."""
    return {k: v for k, v in result.items() if k != "train_minutes"}


def test_resumed_run_gives_the_same_final_metrics(world, tmp_path):
    _, data, store = world
    straight = run_rank(rank_config(data, tmp_path / "a", "sim", lum_config(store), epochs=3, checkpoint_every_steps=4))
    # Killed after epoch 1, then rerun: resumes from the epoch-boundary checkpoint.
    partial = run_rank(rank_config(data, tmp_path / "b", "sim", lum_config(store), epochs=3, checkpoint_every_steps=4), max_epochs=1)
    assert partial["stopped"] == "max_epochs" and partial["epoch"] == 1
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = run_rank(rank_config(data, tmp_path / "b", "sim", lum_config(store), epochs=3, checkpoint_every_steps=4))
    assert _strip(resumed) == _strip(straight)
    # Killed mid-epoch (step 6 of 7 per epoch; checkpoint at step 4 and at the kill), then rerun.
    mid = run_rank(rank_config(data, tmp_path / "c", "sim", lum_config(store), epochs=3, checkpoint_every_steps=4), max_steps=6)
    assert mid["stopped"] == "max_steps" and mid["step"] == 6
    again = run_rank(rank_config(data, tmp_path / "c", "sim", lum_config(store), epochs=3, checkpoint_every_steps=4))
    assert _strip(again) == _strip(straight)
    # Resuming checkpoints of another experiment is refused, naming what differs.
    with pytest.raises(ValueError, match=r"holds checkpoints of a run with another config \(lum\.features: \[.*\] -> \['sim'\]\)"):
        run_rank(rank_config(data, tmp_path / "c", "sim", lum_config(store, features=["sim"]), epochs=3, checkpoint_every_steps=4))
    # A run folder written before keys existed (its config.json lacks them) resumes with them at their defaults.
    old = run_rank(rank_config(data, tmp_path / "d", "sim", lum_config(store), epochs=3, checkpoint_every_steps=4), max_steps=6)
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    for key in ("device", "precision", "activation_checkpointing"):
        del saved["train"][key]
    (tmp_path / "d" / "config.json").write_text(json.dumps(saved))
    assert old["step"] == 6 and _strip(run_rank(rank_config(data, tmp_path / "d", "sim", lum_config(store), epochs=3,
                                                            checkpoint_every_steps=4))) == _strip(straight)


def test_knowledge_of_the_sample_day_is_never_used(world, tmp_path):
    _, data, _ = world
    store = tmp_path / "store"
    write_store(store, DAYS[1], seed=1)
    write_store(store, DAYS[2], scale=1e4, seed=2)  # poisoned: every vector 1e4 times larger
    cfg = lum_config(str(store), features=["oq", "item", "missing"])
    join = LUMJoin(cfg)
    samples = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", test_fraction=0.25, valid_fraction=0.25))
    batch = samples.batch(np.arange(len(samples)))
    feats = join(batch)
    ds = np.array(batch.ds)
    on = {day: torch.from_numpy(ds == day) for day in DAYS}
    assert all(bool(m.any()) for m in on.values())
    # Day 3 (the poisoned partition's own day) reads day 2's clean partition, exactly.
    rows = on[DAYS[2]]
    assert feats[rows].abs().max() < 100
    clean = LUMFeatureModule(join.feature_config, load_knowledge(store, DAYS[1]))
    kjt = candidates_kjt(batch.item_id[rows], condition_values=batch.category_id[rows])
    torch.testing.assert_close(feats[rows], clean(batch.user_id[rows], kjt).values(), rtol=0, atol=0)
    # Days 1 and 2 have no knowledge before them: zeros, every missing flag set.
    for day in DAYS[:2]:
        width = join.output_dim - 4
        assert not feats[on[day], :width].any() and bool((feats[on[day], width:] == 1).all())
    # Control: the day after the poisoned partition does see it (the check has power).
    assert feats[on[DAYS[3]]].abs().max() > 100


def _view(data: str, out, keep_per_user: dict[int, int]) -> str:
    """A knowledge view: a copy of the behaviours with only each user's first `keep_per_user[u]` events."""
    src = Dataset(data)
    view = Dataset(out)
    table = src.read_days("behaviours")
    keep, seen = [], {}
    for u in table.column("user_id").to_pylist():
        seen[u] = seen.get(u, 0) + 1
        keep.append(seen[u] <= keep_per_user.get(u, 0))
    table = table.filter(pa.array(keep))
    for day in src.days("behaviours"):
        part = table.filter(pa.compute.equal(table.column("ds"), day)).drop(["ds"])
        if part.num_rows:
            view.write_day("behaviours", day, part)
    view.write_meta(src.read_meta())
    return str(out)


def test_one_store_for_every_sample_needs_each_sample_after_its_users_history(world, tmp_path):
    _, data, _ = world
    store = tmp_path / "store"
    last = DAYS[-1]
    write_store(store, last)
    samples = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", first_day=last, test_fraction=0.5,
                                                              split_mode="quantile", valid_fraction=0.0))
    with pytest.raises(ValueError, match=r"lum.as_of_ds=2026-01-04: \d+ sample\(s\) are on or before that day .*lum.history_data"):
        LUMJoin(lum_config(str(store), as_of_ds=last), samples)
    # A view holding only events before each user's first sample: allowed (the single-day protocol).
    beh = Dataset(data).read_days("behaviours")
    first_ts = {}
    for u, ts in zip(samples.user_id.tolist(), samples.ts.tolist()):
        first_ts[u] = min(first_ts.get(u, ts), ts)
    counts = {}
    for u, ts in zip(beh.column("user_id").to_pylist(), beh.column("ts").to_pylist()):
        if ts < first_ts.get(u, np.iinfo(np.int64).max):
            counts[u] = counts.get(u, 0) + 1
    good = _view(data, tmp_path / "good", counts)
    LUMJoin(lum_config(str(store), as_of_ds=last, history_data=good), samples)
    # The full data as "view": some user's history reaches past their sample -> refused, naming it.
    with pytest.raises(ValueError, match=r"not after their user's knowledge history \(e.g. sample \d+: user \d+"):
        LUMJoin(lum_config(str(store), as_of_ds=last, history_data=data), samples)
    # A store day before every sample needs no view.
    early = build_ranking_samples(data, RankingSampleConfig(protocol="impressions", first_day=last, split_mode="quantile"))
    write_store(store, DAYS[2])
    assert (early.ts >= day_bounds(last)[0]).all()
    LUMJoin(lum_config(str(store), as_of_ds=DAYS[2]), early)


def test_bad_config_keys_and_values_name_the_key(world, tmp_path):
    _, data, store = world
    path = tmp_path / "rank.yaml"
    for text, key in (
        ("train:\n  epochz: 3\n", "train.epochz"),
        ("lum:\n  store: x\n  conditionz: []\n", "lum.conditionz"),
        ("samples:\n  protocoll: impressions\n", "samples.protocoll"),
        ("sizes:\n  mlp_layers: [4]\n", "sizes.mlp_layers"),
        ("sizes:\n  backbones: {sim: {short_lenn: 3}}\n", "sizes.backbones.sim.short_lenn"),
        ("modell: sim\n", "modell"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
            load_config(RankConfig, path)
    with pytest.raises(ValueError, match="model: unknown ranking model 'xgb'"):
        run_rank(rank_config(data, tmp_path / "x", "xgb"))
    for text, message in (
        ("sizes:\n  backbones: {simm: {}}\n", r"sizes.backbones: unknown ranking model\(s\) \['simm'\]; registered: \[.*'sim'"),
        ("sizes:\n  backbones: {hstu: {hstu: {num_headz: 2}}}\n", r"sizes.backbones.hstu: hstu: unknown HSTUConfig key\(s\) \['num_headz'\]"),
        ("sizes:\n  backbones: {din: {max_search_len: 3}}\n", "unknown config key 'sizes.backbones.din.max_search_len'; valid keys here: \\[\\]"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(RankConfig, path)
    with pytest.raises(ValueError, match=r"lum.conditions: \['scenario=9'\] not in the knowledge"):
        run_rank(rank_config(data, tmp_path / "x", "sim", lum_config(store, conditions=["scenario=9"])))
    with pytest.raises(ValueError, match="lum.conditions: condition 'scenario' must look like feature=value"):
        run_rank(rank_config(data, tmp_path / "x", "sim", lum_config(store, conditions=["scenario"])))
    with pytest.raises(ValueError, match="lum.candidate_condition_feature: 'region' is not a sample column"):
        run_rank(rank_config(data, tmp_path / "x", "sim", lum_config(store, candidate_condition_feature="region")))
    with pytest.raises(ValueError, match="lum: LUMFeatureConfig.features: unknown feature group 'cosine'"):
        run_rank(rank_config(data, tmp_path / "x", "sim", lum_config(store, features=["cosine"])))
    with pytest.raises(FileNotFoundError, match="holds no complete knowledge partition"):
        run_rank(rank_config(data, tmp_path / "x", "sim", lum_config(str(tmp_path / "empty"))))
    with pytest.raises(ValueError, match="lum.as_of_ds: .* has no complete partition as_of_ds=2030-01-01"):
        run_rank(rank_config(data, tmp_path / "x", "sim", lum_config(store, as_of_ds="2030-01-01")))
    bad_sizes = rank_config(data, tmp_path / "x", "sim")
    bad_sizes.sizes.context_keys = ["region"]
    with pytest.raises(ValueError, match="sizes.context_keys: 'region' is not a context key"):
        run_rank(bad_sizes)
    bad_stats = rank_config(data, tmp_path / "x", "mlp")
    bad_stats.sizes.item_stats = ["f_nope"]
    with pytest.raises(ValueError, match=r"sizes.item_stats: column\(s\) \['f_nope'\] not in"):
        run_rank(bad_stats)
    with pytest.raises(ValueError, match="train.batch_size must be >= 1"):
        run_rank(rank_config(data, tmp_path / "x", "sim", batch_size=0))


def test_cli_and_comparison_table(world, tmp_path):
    _, data, store = world
    config = tmp_path / "rank.yaml"
    config.write_text(
        f"data: {data}\nout: {tmp_path / 'cli'}\nmodel: mlp\n"
        "samples:\n  protocol: impressions\n  test_fraction: 0.25\n  valid_fraction: 0.25\n"
        f"lum:\n  store: {store}\n  conditions: ['scenario=2']\n  features: [oq, sim]\n"
        "train:\n  epochs: 1\n  batch_size: 128\n  progress: false\n"
    )
    parser = argparse.ArgumentParser()
    register_rank(parser.add_subparsers())
    args = parser.parse_args(["rank", str(config), "sizes.embedding_dim=4", "sizes.mlp=[8]"])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert result["lum_dim"] == DIM + 1 and result["model"] == "mlp"

    runs = {"base": [{"test": {"auc": 0.70, "ne": 0.9}}, {"test": {"auc": 0.72, "ne": 0.8}}],
            "lum": [{"test": {"auc": 0.75, "ne": 0.85}}, {"test": {"auc": 0.76, "ne": 0.75}}], "hstu": []}
    summary = summarize_seeds(runs)
    assert summary["lum"]["delta_auc_mean"] == pytest.approx(0.045) and summary["lum"]["delta_auc_std"] == pytest.approx(0.00707, abs=1e-5)
    assert summary["base"]["auc_std"] == pytest.approx(0.01414, abs=1e-5) and summary["hstu"] == {"status": "not run"}
    table = comparison_table(summary, {"lum": "Base+LUM"})
    assert "Base+LUM" in table and "+0.0450 ± 0.0071" in table and "not run" in table


@pytest.mark.parametrize("module", ["lumrec.comparison", "lumrec.data.ranking.features", "lumrec.pipelines.rank_config"])
def test_doctests(module):
    assert doctest.testmod(importlib.import_module(module)).failed == 0


def test_hstu_ranker_precision_and_activation_checkpointing(world, tmp_path):
    """train.activation_checkpointing recomputes the HSTU layers in backward: the same run bit for bit; train.precision=bf16
    runs the forward in bfloat16 autocast: a different, finite run close to fp32's; a model without a stack is refused."""
    _, data, _ = world
    plain = run_rank(rank_config(data, tmp_path / "plain", "hstu", epochs=1))
    checkpointed = run_rank(rank_config(data, tmp_path / "ckpt", "hstu", epochs=1, activation_checkpointing=True))
    assert checkpointed["history"] == plain["history"] and checkpointed["test"] == plain["test"]
    bf16 = run_rank(rank_config(data, tmp_path / "bf16", "hstu", epochs=1, precision="bf16"))
    assert bf16["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    assert bf16["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], abs=0.02)
    assert np.isfinite(bf16["test"]["auc"]) and abs(bf16["test"]["auc"] - plain["test"]["auc"]) < 0.05
    with pytest.raises(ValueError, match=r"train.activation_checkpointing is on but model 'din' has no HSTU or transformer stack"):
        run_rank(rank_config(data, tmp_path / "din", "din", epochs=1, activation_checkpointing=True))
    with pytest.raises(ValueError, match=r"train.precision"):
        rank_config(data, tmp_path / "x", "hstu", precision="fp8")
