"""Split protocols (data.protocol): which events train, select and test; the name in results.json; the metrics at every K."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from lumrec.config import ConfigError, load_config
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.metrics import RetrievalMetrics, target_ranks
from lumrec.pipelines.pretrain import DataConfig, PretrainConfig, Pretrainer, TrainConfig
from lumrec.pipelines.pretrain_config import PROTOCOLS, split_protocol

KS = (5, 10, 20, 50, 200)


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "data"
    generate(path, SynthConfig(num_users=40, num_items=30, num_categories=3, num_queries=4, num_days=2))
    return str(path)


def _config(synth_path: str, out, **data) -> PretrainConfig:
    """A tiny SASRec run of one epoch (the real model, small)."""
    return PretrainConfig(
        model="sasrec", out=str(out), data=DataConfig(path=synth_path, max_len=16, **data),
        train=TrainConfig(epochs=1, rows_per_batch=8, num_negatives=8, checkpoint_every_steps=50, log_every_steps=50),
        model_config={"d_model": 8, "num_blocks": 1, "dropout": 0.0, "max_len": 16},
    )


def _last_items(offsets: np.ndarray, item_id: np.ndarray, back: int) -> np.ndarray:
    """The item `back` events before the end of each sequence (back=0: its last event)."""
    return item_id[offsets[1:] - 1 - back]


# protocol -> (events at the end of each history that training never sees, validates, tests)
EXPECTED = {"strict": (2, True, True), "published-ml1m": (1, False, True), "all": (0, False, False)}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_each_protocol_trains_selects_and_tests_its_events(synth_path, tmp_path, protocol):
    held_out, validates, tests = EXPECTED[protocol]
    trainer = Pretrainer(_config(synth_path, tmp_path / protocol, protocol=protocol))
    assert trainer.cfg.data.train_excludes_last == held_out
    assert (trainer.validates, trainer.tests) == (validates, tests)
    split = trainer.split
    # Validation ends with each user's second-last event, test with the last; both read the history before them.
    test_items = split.test.item_id
    assert (_last_items(split.valid.offsets, split.valid.item_id, 0) == _last_items(split.test.offsets, test_items, 1)).all()
    assert (np.diff(split.test.offsets) == np.diff(split.valid.offsets) + 1).all()
    # Training: every user's events but the last `held_out` (SASRec: one token per event).
    tokens = trainer.loader.tokens
    if held_out:
        assert list(tokens.user_ids) == list(split.test.user_ids)
        assert (np.diff(tokens.offsets) == np.diff(split.test.offsets) - held_out).all()
        assert (_last_items(tokens.offsets, tokens.item_id, 0) == _last_items(split.test.offsets, test_items, held_out)).all()
    else:  # every event of every user trains, short histories too
        assert tokens.num_tokens >= split.test.offsets[-1]
    result = trainer.run()
    saved = json.loads((tmp_path / protocol / "results.json").read_text())
    assert saved["protocol"] == result["protocol"] == protocol
    assert bool(saved["history"]) == validates and (saved["best_epoch"] >= 0) == validates
    assert bool(saved["test"]) == tests
    if tests:
        assert set(saved["test"]) == {f"hr@{k}" for k in KS} | {f"ndcg@{k}" for k in KS} | {"mrr"}


def test_train_excludes_last_alone_names_its_protocol():
    assert [split_protocol(DataConfig(train_excludes_last=n)) for n in (2, 1, 0)] == ["strict", "published-ml1m", "all"]
    assert DataConfig().train_excludes_last == 2 and split_protocol(DataConfig()) == "strict"
    assert DataConfig(protocol="all", train_excludes_last=0).train_excludes_last == 0  # both set, agreeing


def test_inconsistent_keys_are_refused_naming_both(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: sasrec\ndata: {protocol: published-ml1m, train_excludes_last: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert str(path) in str(err.value)
    assert "data.protocol" in str(err.value) and "data.train_excludes_last" in str(err.value)
    path.write_text("model: sasrec\ndata: {protocol: loo}\n")
    with pytest.raises(ConfigError, match="data.protocol.*strict"):
        load_config(PretrainConfig, path)
    path.write_text("model: sasrec\ndata: {protocol: published-ml1m}\n")
    assert load_config(PretrainConfig, path).data.train_excludes_last == 1


def test_a_run_refuses_protocol_and_train_excludes_last_set_apart(synth_path, tmp_path):
    cfg = _config(synth_path, tmp_path / "x", protocol="strict")
    cfg.data.train_excludes_last = 1  # set after the config was built
    with pytest.raises(ValueError, match="data.train_excludes_last"):
        Pretrainer(cfg)


def test_benchmark_warns_against_a_published_figure_of_the_other_protocol():
    bench = load_benchmark("ml1m_retrieval")
    strict = PretrainConfig(model="hstu")
    published = PretrainConfig(model="hstu", data=DataConfig(protocol="published-ml1m"))
    warning = bench.published_protocol_warning("hstu", strict)
    assert warning is not None and "'strict'" in warning and "'published-ml1m'" in warning
    assert bench.published_protocol_warning("hstu", published) is None
    assert bench.published_protocol_warning("lum-const", strict) is None  # nothing published to compare with
    for model, (_, config_file, _) in bench.RUNS.items():  # the shipped recipes match the published split
        assert bench.published_protocol_warning(model, load_config(PretrainConfig, bench.REPO / config_file)) is None


def _reference(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray) -> dict[str, float]:
    """HR@K / NDCG@K / MRR by plain numpy: rank = candidates scoring at least the target's, minus itself."""
    scores = np.where(exclude, -np.inf, scores.astype(np.float32))
    target = scores[np.arange(len(targets)), targets]
    ranks = (scores >= target[:, None]).sum(1) - 1
    out = {f"hr@{k}": float(np.mean(ranks < k)) for k in KS}
    out.update({f"ndcg@{k}": float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))) for k in KS})
    out["mrr"] = float(np.mean(1.0 / (ranks + 1.0)))
    return out


def test_metrics_match_a_numpy_reference_at_every_k():
    rng = np.random.default_rng(0)
    batches, users, items = 4, 50, 400
    scores = rng.normal(size=(batches, users, items))
    scores[:, :, 100:110] = 0.0  # ties count against the target
    targets = rng.integers(1, items, size=(batches, users))
    exclude = rng.random((batches, users, items)) < 0.1
    exclude[:, :, 0] = True
    exclude[np.arange(batches)[:, None], np.arange(users)[None, :], targets] = False
    metrics, old = RetrievalMetrics(), RetrievalMetrics(ks=(10, 50, 200), ndcg_ks=(10, 200))  # old: the former K set
    for b in range(batches):
        ranks = target_ranks(torch.from_numpy(scores[b]), torch.from_numpy(targets[b]), torch.from_numpy(exclude[b]))
        metrics.update(ranks)
        old.update(ranks)
    out = metrics.compute()
    expected = _reference(scores.reshape(-1, items), targets.reshape(-1), exclude.reshape(-1, items))
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    for key, value in old.compute().items():  # more K values leave the others' values bit for bit
        assert out[key] == value, key
    for name in ("hr", "ndcg"):
        values = [out[f"{name}@{k}"] for k in KS]
        assert values == sorted(values) and 0.0 < values[0] < values[-1] <= 1.0
