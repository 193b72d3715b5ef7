"""`lumrec retrieve` (two-tower, step 3): Recall@K against a plain reference, LUM input widths, exact resume, errors."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_rank_pipeline import DAYS, DIM, make_data, write_store  # noqa: E402 - shared tiny data and knowledge

from lumrec.config import ConfigError, load_config
from lumrec.knowledge import load_knowledge
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.modules.lum_join import RankLUMConfig
from lumrec.pipelines.rank_config import RankTrainConfig
from lumrec.pipelines.retrieve import RetrieveConfig, Retriever, TwoTowerSizes, register_retrieve, run_retrieve


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    data = make_data(root)
    store = root / "store"
    for i, day in enumerate(DAYS[:-1]):
        write_store(store, day, seed=i)
    return data, str(store)


def config(data: str, out, lum: bool, store: str = "", **train) -> RetrieveConfig:
    t = dict(epochs=2, batch_size=32, eval_batch_size=64, max_history=20, lr=3e-3, progress=False)
    t.update(train)
    return RetrieveConfig(
        data=data, out=str(out),
        samples=RankingSampleConfig(protocol="impressions", first_day=DAYS[1], test_fraction=0.3, valid_fraction=0.3),
        sizes=TwoTowerSizes(embedding_dim=8, output_dim=8, user_mlp=[16], item_mlp=[16]),
        lum=RankLUMConfig(store=store, conditions=["scenario=1", "scenario=2"]) if lum else None,
        train=RankTrainConfig(**t),
    )


def reference_recall(job: Retriever, split: str, k: int) -> float:
    """Per test positive: is its item among the k best-scoring items (ties against it)? A plain loop."""
    hits = []
    with torch.no_grad():
        for batch in job.samples.iter_batches(split, 1000, None, job.train.max_history, history_keys=job.history_keys):
            lum_user = job.lum.user_features(batch.user_id, batch.day) if job.lum else None
            users = job.model.user_embeddings(batch.sparse_features, lum=lum_user)
            for b in range(len(batch)):
                as_of = job.lum.as_of(int(batch.day[b])) if job.lum else None
                items = job._catalogue(as_of, job.lum is not None)
                scores = items @ users[b]
                target = int(batch.item_id[b])
                better = sum(1 for i in range(1, job.num_items) if i != target and scores[i] >= scores[target])
                hits.append(float(better < k))
    return float(np.mean(hits))


@pytest.mark.parametrize("lum", [False, True])
def test_recall_matches_reference_and_results_json(world, tmp_path, lum):
    data, store = world
    cfg = config(data, tmp_path / "run", lum, store)
    job = Retriever(cfg)
    result = job.run()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == result["test"]
    assert set(result["test"]) == {"recall@10", "recall@50", "count"} and result["test"]["count"] == job.counts["test"]["samples"]
    # Only positives are pairs.
    assert (job.samples.label > 0).all() and job.counts["test"]["samples"] > 10
    job.model.eval()
    for k in (10, 50):
        assert job.evaluate("test")[f"recall@{k}"] == pytest.approx(reference_recall(job, "test", k), abs=1e-9)
    # The catalogue has 49 items, so every target is in the top 50; top 10 is a proper subset.
    assert result["test"]["recall@50"] == 1.0 and 0.0 < result["test"]["recall@10"] < 1.0


def test_lum_widens_both_towers(world, tmp_path):
    data, store = world
    base = Retriever(config(data, tmp_path / "a", False))
    with_lum = Retriever(config(data, tmp_path / "b", True, store))
    user_b, item_b = base.input_widths
    user_l, item_l = with_lum.input_widths
    assert user_l - user_b == 2 * DIM + 2 and item_l - item_b == DIM + 1
    # The user tower's LUM input for a day-D sample is the o_q of partition D-1.
    batch = with_lum.samples.batch(np.arange(len(with_lum.samples)))
    feats = with_lum.lum.user_features(batch.user_id, batch.day)
    rows = torch.from_numpy(np.array(batch.ds) == DAYS[2])
    expect, _ = load_knowledge(store, DAYS[1]).user_vectors(batch.user_id[rows], "scenario", torch.tensor([[1, 2]]).expand(int(rows.sum()), 2))
    torch.testing.assert_close(feats[rows, : 2 * DIM], expect.reshape(-1, 2 * DIM), rtol=0, atol=0)


def test_resumed_run_gives_the_same_final_metrics(world, tmp_path):
    data, store = world
    straight = run_retrieve(config(data, tmp_path / "a", True, store, epochs=3))
    partial = run_retrieve(config(data, tmp_path / "b", True, store, epochs=3), max_epochs=1)
    assert partial["stopped"] == "max_epochs"
    resumed = run_retrieve(config(data, tmp_path / "b", True, store, epochs=3))
    drop = lambda r: {k: v for k, v in r.items() if k != "train_minutes"}  # noqa: E731
    assert drop(resumed) == drop(straight)


def test_cli_and_errors(world, tmp_path):
    data, store = world
    path = tmp_path / "retrieve.yaml"
    path.write_text(
        f"data: {data}\nout: {tmp_path / 'cli'}\nsamples:\n  protocol: impressions\n  test_fraction: 0.25\n  valid_fraction: 0.25\n"
        "sizes:\n  embedding_dim: 4\n  output_dim: 8\ntrain:\n  epochs: 1\n  progress: false\n"
    )
    parser = argparse.ArgumentParser()
    register_retrieve(parser.add_subparsers())
    args = parser.parse_args(["retrieve", str(path), "train.batch_size=64"])
    assert args.func(args) == 0
    assert "recall@10" in json.loads((tmp_path / "cli" / "results.json").read_text())["test"]
    path.write_text("sizes:\n  tower_dim: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'sizes.tower_dim'"):
        load_config(RetrieveConfig, path)
    path.write_text("lum:\n  stor: x\n")
    with pytest.raises(ConfigError, match="unknown config key 'lum.stor'"):
        load_config(RetrieveConfig, path)
    bad = config(data, tmp_path / "x", True, store)
    bad.lum.conditions = []
    bad.lum.candidate_condition_feature = "category_id"
    with pytest.raises(ValueError, match="lum.conditions: the user tower needs at least one fixed condition"):
        Retriever(bad)
    with pytest.raises(ValueError, match="ks must include 10"):
        Retriever(RetrieveConfig(data=data, out=str(tmp_path / "x"), ks=[5]))
    bad_hist = config(data, tmp_path / "x", False)
    bad_hist.sizes.history_keys = ["hist_action"]
    with pytest.raises(ValueError, match="sizes.history_keys: 'hist_action' is not supported"):
        Retriever(bad_hist)


def test_job_start_line_and_tensorboard_scalars(world, tmp_path, caplog):
    data, _ = world
    with caplog.at_level(logging.INFO, logger="lumrec"):
        job = Retriever(config(data, tmp_path / "tb", False, epochs=1, log_every_steps=2))
        job.run()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("retrieve: "))
    assert line.startswith(f"retrieve: {job.counts['train']['samples']:,} train samples, ")
    assert f"{sum(p.numel() for p in job.model.parameters()):,} parameters, device cpu" in line
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/recall@10", "test/recall@10"} <= set(events.Tags()["scalars"])
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
