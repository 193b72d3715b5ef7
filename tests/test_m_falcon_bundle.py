"""HSTU served end to end: `lumrec export` of an HSTU rank run writes an M-FALCON bundle whose scores equal one
pass per candidate of the trained model (1e-5), loaded through load_bundle and checked on its parity example."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_export import copy_with_wrong_parity  # noqa: E402 - shared test helpers
from test_rank_pipeline import trained_lum_run  # noqa: E402

from lumrec.checkpoint import CheckpointManager, load_verified_weights
from lumrec.modules.serving.bundle import BundleError, RequestError, load_bundle
from lumrec.modules.serving.export import RankerServing
from lumrec.modules.serving.m_falcon_bundle import MFalconBundle
from lumrec.pipelines import export as export_job
from lumrec.pipelines.rank import Ranker

CONTEXT, CANDIDATES, HISTORY = ["user_id", "scenario", "query_id"], ["item_id", "category_id"], ["hist_item_id", "hist_category_id"]


@pytest.fixture(scope="module")
def hstu_bundle(tmp_path_factory):
    """A tiny HSTU rank run with LUM features and item statistics, exported; the trained eager model beside it."""
    root = tmp_path_factory.mktemp("mfalcon")
    ranker = trained_lum_run(root, "hstu")
    summary = export_job.export_run(root / "run", root / "bundle")
    best = CheckpointManager(root / "run" / "best")
    load_verified_weights(best.step_dir(best.newest_valid()[0]), ranker.model)
    ranker.model.eval()
    return root / "bundle", ranker, summary


def test_an_hstu_run_exports_to_an_m_falcon_bundle_that_checks_itself(hstu_bundle):
    out, ranker, summary = hstu_bundle
    manifest = json.loads((out / "serving.json").read_text())
    assert manifest["kind"] == "hstu_m_falcon" and manifest["model"] == "hstu" and manifest["timestamps"] is True
    assert sorted(p.name for p in out.iterdir()) == ["items.npz", "model.pt", "parity.pt", "serving.json"]
    assert summary["parity_max_error"] <= 1e-5 and manifest["parity_max_error"] <= 1e-5
    bundle = load_bundle(out)
    assert isinstance(bundle, MFalconBundle) and bundle.uses_lum and bundle.parity_error <= 1e-5


@pytest.mark.parametrize("seed, batch, history", [(0, 1, 0), (1, 5, 1), (2, 13, 9), (3, 40, 30)])
def test_scores_equal_one_pass_per_candidate_of_the_trained_model(hstu_bundle, seed, batch, history):
    """The bundle's M-FALCON path against the eager model on the per-candidate batch RankerServing builds."""
    out, ranker, _ = hstu_bundle
    bundle = load_bundle(out, check=False)
    wrapper = RankerServing(ranker.model, CONTEXT, CANDIDATES, HISTORY, dense_dim=1, lum_dim=ranker.lum.output_dim,
                            timestamps=True).eval()
    inputs = wrapper.example(batch=batch, history=history, seed=seed, vocab=ranker.vocab)
    with torch.no_grad():
        expected = wrapper(*inputs)
    assert float((bundle._forward(inputs) - expected).abs().max()) <= 1e-5


def test_requests_are_read_as_a_ranker_bundle_reads_them(hstu_bundle):
    out, _, _ = hstu_bundle
    bundle = load_bundle(out, check=False, max_candidates=4)
    result = bundle.score(3, [1, 2, 5], context={"scenario": 1}, history=[4, 7], history_ts=[100, 200], request_ts=300)
    assert len(result.scores) == 3 and all(0.0 < p < 1.0 for p in result.scores) and result.knowledge_missing
    same = bundle.score(3, [5, 2, 1], context={"scenario": 1}, history=[4, 7], history_ts=[100, 200], request_ts=300)
    assert np.allclose(same.scores[::-1], result.scores, atol=1e-6)  # a candidate's score does not depend on the others
    with pytest.raises(RequestError, match="candidates: 5 candidates; at most 4"):
        bundle.score(3, [1, 2, 3, 4, 5])


def test_damaged_weights_or_parity_are_refused_naming_the_file(hstu_bundle, tmp_path):
    out, _, _ = hstu_bundle
    copy = copy_with_wrong_parity(out, tmp_path / "copy")
    with pytest.raises(BundleError, match="parity.pt: M-FALCON differs"):
        load_bundle(copy)
    (copy / "model.pt").write_bytes(b"not a state dict")
    with pytest.raises(BundleError, match="model.pt: cannot load"):
        load_bundle(copy, check=False)


def test_lumrec_serve_answers_with_the_m_falcon_bundle(hstu_bundle):
    """The endpoint serves an HSTU bundle as any other: over HTTP, the scores of the bundle's own `score`."""
    import httpx

    from lumrec.pipelines.serve import running_server
    from lumrec.pipelines.serving_app import ServeConfig, create_app

    out, _, _ = hstu_bundle
    body = {"user_id": 3, "candidates": [1, 2, 5], "context": {"scenario": 1}, "history": [4, 7], "history_ts": [100, 200],
            "request_ts": 300}
    expected = load_bundle(out, check=False).score(3, [1, 2, 5], context={"scenario": 1}, history=[4, 7], history_ts=[100, 200],
                                                   request_ts=300)
    with running_server(create_app(ServeConfig(bundle=str(out)))) as server:
        answer = httpx.post(server.url + "/rank", json=body, timeout=30)
        bad = httpx.post(server.url + "/rank", json={**body, "candidates": [10**6]}, timeout=30)
    assert answer.status_code == 200 and np.allclose(answer.json()["scores"], expected.scores, atol=1e-6)
    assert answer.json()["model_version"] == json.loads((out / "serving.json").read_text())["version"]
    assert bad.status_code == 422 and bad.json()["field"] == "candidates[0]"
