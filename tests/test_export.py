"""`lumrec export` and serving bundles: exported == eager (1e-5) for every ranker, AOTI packages, scoring, request errors."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rank_pipeline import lum_config, trained_lum_run  # noqa: E402 - shared tiny data

from lumrec.checkpoint import CheckpointManager, load_verified_weights
from lumrec.errors import CheckpointLoadError, UserError
from lumrec.knowledge import NoKnowledge
from lumrec.modules.ranking.builder import RankModelConfig, build_ranker
from lumrec.modules.serving.bundle import BundleError, RequestError, ServingBundle, TwoTowerBundle, load_bundle
from lumrec.modules.serving.export import RankerServing, TowerServing, export_program, load_package
from lumrec.pipelines import export as export_job
from lumrec.pipelines.rank import Ranker
from lumrec.pipelines.rank_config import RankConfig

VOCAB = {"user_id": 40, "item_id": 60, "category_id": 6, "scenario": 3, "query_id": 9}
CONTEXT, CANDIDATES, HISTORY = ["user_id", "scenario", "query_id"], ["item_id", "category_id"], ["hist_item_id", "hist_category_id"]
SHAPES = [(1, 0), (1, 1), (3, 0), (5, 7), (2, 33), (17, 12)]  # (candidates B, history L)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("lum_dim", [0, 5], ids=["base", "lum"])
@pytest.mark.parametrize("model", ["mlp", "din", "sim"])
def test_exported_ranker_equals_eager_on_random_batches(model, lum_dim):
    """The ExportedProgram of each ranker (with item statistics) gives the eager wrapper's scores for any B and L."""
    torch.manual_seed(0)
    sizes = RankModelConfig(embedding_dim=4, mlp=[8], attention_mlp=[4], backbones={"sim": {"max_search_len": 3, "short_len": 2}})
    ranker, _ = build_ranker(model, sizes, VOCAB, dense_dim=2, lum_dim=lum_dim)
    wrapper = RankerServing(ranker, CONTEXT, CANDIDATES, HISTORY, dense_dim=2, lum_dim=lum_dim).eval()
    program = export_program(wrapper, wrapper.example(batch=6, history=4, vocab=VOCAB))
    exported = program.module()
    for i, (b, length) in enumerate(SHAPES):
        inputs = wrapper.example(batch=b, history=length, seed=10 + i, vocab=VOCAB)
        with torch.no_grad():
            eager, got = wrapper(*inputs), exported(*inputs)
        assert got.shape == (b,) and _max_error(got, eager) <= 1e-5, (b, length)


def test_wrapper_builds_the_training_kjt():
    """RankerServing's KJT holds, per key, what a training batch of the same samples holds (the model selects by key)."""
    wrapper = RankerServing(torch.nn.Identity(), ["scenario", "user_id"], CANDIDATES, HISTORY)
    context, cands, hist = torch.tensor([2, 7]), torch.tensor([[4, 5, 6], [1, 1, 2]]), torch.tensor([[9, 8], [3, 3]])
    kjt = wrapper.sparse_features(context, cands, hist, torch.tensor([0]), torch.zeros(2, dtype=torch.int64))
    assert kjt.keys() == ["user_id", "item_id", "category_id", "scenario", "hist_item_id", "hist_category_id"]
    got = {k: (v.lengths().tolist(), v.values().tolist()) for k, v in kjt.to_dict().items()}
    assert got["user_id"] == ([1, 1, 1], [7, 7, 7]) and got["scenario"] == ([1, 1, 1], [2, 2, 2])
    assert got["item_id"] == ([1, 1, 1], [4, 5, 6]) and got["category_id"] == ([1, 1, 1], [1, 1, 2])
    assert got["hist_item_id"] == ([2, 2, 2], [9, 8] * 3) and got["hist_category_id"] == ([2, 2, 2], [3, 3] * 3)


# -- lumrec export of a tiny SIM + LUM + item statistics run ---------------------------------------


def copy_with_wrong_parity(bundle: Path, copy: Path) -> Path:
    """A copy of `bundle` whose parity example expects other scores (0.01 off): what a load must refuse."""
    copy.mkdir()
    for p in bundle.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    saved = torch.load(copy / "parity.pt", weights_only=True)
    saved["outputs"] = saved["outputs"] + 0.01
    torch.save(saved, copy / "parity.pt")
    return copy


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory):
    """A trained tiny SIM run with LUM features and item statistics, exported through the CLI's main()."""
    root = tmp_path_factory.mktemp("export")
    ranker = trained_lum_run(root, "sim")
    out = root / "bundle"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_job.main(argparse.Namespace(run=str(root / "run"), out=str(out), checkpoint="best")) == 0
    summary = json.loads(printed.getvalue().strip().splitlines()[-1])
    # The eager model the bundle was exported from: the run's best weights.
    best = CheckpointManager(root / "run" / "best")
    load_verified_weights(best.step_dir(best.newest_valid()[0]), ranker.model)
    ranker.model.eval()
    return root, ranker, out, summary


def test_export_writes_a_bundle_that_loads_and_checks_parity(rank_run):
    root, ranker, out, summary = rank_run
    assert sorted(p.name for p in out.iterdir()) == ["items.npz", "model.pt2", "parity.pt", "serving.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".bundle.tmp")]
    manifest = json.loads((out / "serving.json").read_text())
    assert summary["bundle"] == str(out) and summary["model"] == "sim" and summary["version"] == manifest["version"]
    assert summary["parity_max_error"] <= 1e-5 and summary["compile_seconds"] > 0 and summary["parameters"] > 0
    assert manifest["context_keys"] == ["user_id", "scenario", "query_id"] and manifest["history_keys"] == HISTORY
    assert manifest["item_stats"]["columns"] == ["f_ctr_7d"] and manifest["lum"]["output_width"] == ranker.lum.output_dim
    assert manifest["checkpoint"]["step"] > 0 and len(manifest["checkpoint"]["digest"]) == 64
    bundle = load_bundle(out)
    assert isinstance(bundle, ServingBundle) and bundle.uses_lum and bundle.lum_dim == ranker.lum.output_dim
    assert bundle.version == manifest["version"] and bundle.parity_error <= 1e-5


def test_package_equals_eager_on_random_batches(rank_run):
    """The AOTInductor package of the SIM + LUM + item statistics model, against the eager wrapper, for any B and L."""
    _, ranker, out, _ = rank_run
    wrapper = RankerServing(ranker.model, CONTEXT, CANDIDATES, HISTORY, dense_dim=1, lum_dim=ranker.lum.output_dim).eval()
    package = load_package(out / "model.pt2")
    vocab = ranker.vocab
    for i, (b, length) in enumerate(SHAPES):
        inputs = wrapper.example(batch=b, history=length, seed=i, vocab=vocab)
        with torch.no_grad():
            eager = wrapper(*inputs)
        assert _max_error(package(*inputs), eager) <= 1e-5, (b, length)


def _training_scores(ranker: Ranker, row: int, items: list[int]) -> tuple[torch.Tensor, object]:
    """Sample `row` with its candidate replaced by each of `items`, batched and scored as training does; its batch."""
    s = ranker.samples
    samples = s.take([row] * len(items))
    category = torch.as_tensor(np.load(_bundle_items(ranker))["category_id"])
    samples = dataclasses.replace(samples, item_id=np.asarray(items, np.int64), category_id=category[items].numpy())
    batch = samples.batch(np.arange(len(items)), ranker.cfg.train.max_history, history_keys=ranker.history_keys)
    with torch.no_grad():
        _, logits = ranker.trainer(ranker.ranking_batch(batch))
    return torch.sigmoid(logits), batch


def _bundle_items(ranker: Ranker) -> Path:
    return Path(ranker.cfg.out).parent / "bundle" / "items.npz"


def test_score_equals_the_eager_model_on_training_built_requests(rank_run):
    """A request scored by the bundle equals the eager model on the training batch of the same samples (1e-5)."""
    _, ranker, out, _ = rank_run
    bundle = load_bundle(out)
    s = ranker.samples
    last_stats_day = max(ranker.stats.tables)  # the bundle serves the latest day's item statistics
    rows = np.flatnonzero((s.day == last_stats_day) & (s.history_length > 0))[:4]
    assert len(rows) >= 2
    for row in rows:
        items = [int(s.item_id[row]), 3, 17, 49, 3]
        expected, batch = _training_scores(ranker, int(row), items)
        hist = batch.history["hist_item_id"].values()[: int(batch.hist_lengths[0])].tolist()
        as_of = ranker.lum.as_of(int(s.day[row]))
        knowledge = ranker.lum.knowledge.source(as_of, candidate_lookups=True)
        context = {"scenario": int(s.scenario[row]), "query_id": int(s.query_id[row])}
        result = bundle.score(int(s.user_id[row]), items, context=context, history=hist, knowledge=knowledge)
        assert _max_error(torch.tensor(result.scores), expected) <= 1e-5
        assert result.knowledge_missing is (as_of is None)


def test_no_knowledge_scores_as_training_did_a_user_without_knowledge(rank_run):
    _, ranker, out, _ = rank_run
    bundle = load_bundle(out, check=False)
    none = bundle.score(5, [1, 2, 3], context={"scenario": 1}, history=[4, 5])
    nothing = bundle.score(5, [1, 2, 3], context={"scenario": 1}, history=[4, 5], knowledge=NoKnowledge(bundle.knowledge_dim))
    assert none.knowledge_missing and nothing.knowledge_missing and none.scores == nothing.scores
    known = bundle.score(5, [1, 2, 3], context={"scenario": 1}, history=[4, 5],
                         knowledge=ranker.lum.knowledge.source(ranker.lum.days[-1], candidate_lookups=True))
    assert not known.knowledge_missing and known.scores != none.scores


def test_concurrent_requests_give_the_scores_of_serial_ones(rank_run):
    _, ranker, out, _ = rank_run
    bundle = load_bundle(out, check=False)
    knowledge = ranker.lum.knowledge.source(ranker.lum.days[-1], candidate_lookups=True)
    g = np.random.default_rng(0)
    requests = [(int(g.integers(1, 60)), g.integers(1, 50, int(g.integers(1, 30))).tolist(), g.integers(1, 50, int(g.integers(0, 25))).tolist())
                for _ in range(24)]
    serial = [bundle.score(u, c, {"scenario": 1}, h, knowledge=knowledge).scores for u, c, h in requests]
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, len(requests), 8):
                u, c, h = requests[i]
                results[i] = bundle.score(u, c, {"scenario": 1}, h, knowledge=knowledge).scores
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [results[i] for i in range(len(requests))] == serial


@pytest.mark.parametrize("kwargs, field, message", [
    ({"context": {"region": 1}}, "context.region", "unknown context key"),
    ({"candidates": [1, -2]}, "candidates[1]", "negative"),
    ({"candidates": [1, 2, 99999]}, "candidates[2]", "item 99999 is not in the model's vocabulary (51 items)"),
    ({"candidates": []}, "candidates", "no candidates"),
    ({"candidates": list(range(1, 6))}, "candidates", "5 candidates; at most 4"),
    ({"candidates": [1, True]}, "candidates[1]", "expected an integer id"),
    ({"history": [1, 500]}, "history[1]", "not in the model's vocabulary"),
    ({"history": [1, 2], "history_ts": [5]}, "history_ts", "1 times for 2 history items"),
    ({"user_id": -1}, "user_id", "negative"),
    ({"user_id": 1000}, "user_id", "not in the model's vocabulary"),
    ({"context": {"scenario": 7}}, "context.scenario", "not in the model's vocabulary (3 values)"),
])
def test_request_errors_name_the_field(rank_run, kwargs, field, message):
    _, _, out, _ = rank_run
    bundle = load_bundle(out, check=False, max_candidates=4)
    request = {"user_id": 3, "candidates": [1, 2], "context": {"scenario": 1}, "history": [4]}
    request.update(kwargs)
    with pytest.raises(RequestError) as info:
        bundle.score(**request)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ") and message in str(info.value)


def test_export_errors_name_the_path_and_leave_nothing(rank_run, tmp_path):
    root, _, out, _ = rank_run
    with pytest.raises(UserError, match="already exists"):
        export_job.export_run(root / "run", out)
    with pytest.raises(UserError, match="config.json: no run config"):
        export_job.export_run(tmp_path, tmp_path / "b")
    # A run whose checkpoints are gone: the error names the folder, and no bundle (or temporary folder) is left.
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "config.json").write_text((root / "run" / "config.json").read_text())
    with pytest.raises(CheckpointLoadError, match="best"):
        export_job.export_run(broken, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # A damaged parity example is caught when the bundle loads.
    with pytest.raises(BundleError, match="parity.pt: the package differs"):
        load_bundle(copy_with_wrong_parity(out, tmp_path / "copy"))


def test_checkpoint_choice_loads_best_or_latest_weights(rank_run):
    """--checkpoint best / latest: the verified weights of best/ or checkpoints/, named by step and digest."""
    root, ranker, _, _ = rank_run
    model = ranker.model
    best = export_job._load_weights(root / "run", model, "best")
    latest = export_job._load_weights(root / "run", model, "latest")
    assert best["which"] == "best" and latest["which"] == "latest"
    assert latest["step"] == CheckpointManager(root / "run" / "checkpoints").latest()
    assert Path(best["folder"]).parent.name == "best" and Path(latest["folder"]).parent.name == "checkpoints"
    export_job._load_weights(root / "run", model, "best")  # leave the fixture's model as it was


# -- two towers ------------------------------------------------------------------------------------


def test_two_tower_bundle_equals_eager_towers(rank_run):
    from lumrec.pipelines.retrieve import RetrieveConfig, TwoTowerSizes, Retriever

    root, ranker, _, _ = rank_run
    cfg = RetrieveConfig(data=ranker.cfg.data, out=str(root / "retrieve"), samples=ranker.cfg.samples,
                         sizes=TwoTowerSizes(embedding_dim=8, output_dim=8, user_mlp=[16], item_mlp=[16]),
                         lum=lum_config(ranker.cfg.lum.store, candidate_condition_feature=None), train=dataclasses.replace(
                             ranker.cfg.train, epochs=1))
    job = Retriever(cfg)
    job.run()
    summary = export_job.export_run(root / "retrieve", root / "towers")
    bundle = load_bundle(root / "towers")
    assert isinstance(bundle, TwoTowerBundle) and bundle.parity_error <= 1e-5 and summary["model"] == "two_tower"
    best = CheckpointManager(root / "retrieve" / "best")
    load_verified_weights(best.step_dir(best.newest_valid()[0]), job.model)
    job.model.eval()
    user = TowerServing(job.model.user_tower, CONTEXT, HISTORY, job.lum.user_width())
    item = TowerServing(job.model.item_tower, ["item_id", "category_id"], [], job.lum.dim + 1)
    for i, (n, length) in enumerate([(1, 0), (4, 3), (9, 20)]):
        for tower, run in ((user, bundle.user_vectors), (item, bundle.item_vectors)):
            inputs = tower.example(n, length if tower is user else 0, seed=i, vocab=job.vocab)
            with torch.no_grad():
                assert _max_error(run(*inputs), tower(*inputs)) <= 1e-5
