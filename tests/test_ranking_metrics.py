"""Ranking metrics against pairwise-count / per-sample references and torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from lumrec.ranking_metrics import RankingMetrics, auc, calibration, log_loss, normalized_entropy


def _pairwise_auc(p: list[float], y: list[int]) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, 0.5 on a tie."""
    pos = [s for s, t in zip(p, y) if t == 1]
    neg = [s for s, t in zip(p, y) if t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auc_matches_pairwise_reference_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 300, (1,), generator=g))
    # Few distinct values: many ties, within and across classes.
    probs = torch.randint(0, 7, (n,), generator=g).float() / 6
    labels = torch.randint(0, 2, (n,), generator=g)
    labels[0], labels[1] = 0, 1  # both classes present
    expected = _pairwise_auc(probs.tolist(), labels.tolist())
    assert auc(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert auc(probs, labels) == pytest.approx(float(binary_auroc(probs, labels)), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_torchmetrics_on_continuous_scores(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(5000, generator=g)
    labels = (torch.rand(5000, generator=g) < probs).long()
    assert auc(probs, labels) == pytest.approx(float(binary_auroc(probs, labels)), abs=1e-6)


def test_auc_edge_values():
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1])) == 0.0
    assert auc(torch.full((10,), 0.3), torch.tensor([0, 1] * 5)) == 0.5  # constant model


def test_ne_log_loss_and_calibration_match_per_sample_reference():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(400, generator=g).clamp(0.01, 0.99)
    probs[0], probs[1] = 0.0, 1.0  # clipped, not infinite
    labels = (torch.rand(400, generator=g) < 0.3).float()
    labels[0], labels[1] = 1.0, 0.0  # the two confident misses
    ll = 0.0
    for p, y in zip(probs.tolist(), labels.tolist()):
        p = min(max(p, 1e-7), 1 - 1e-7)
        ll -= y * math.log(p) + (1 - y) * math.log(1 - p)
    ll /= 400
    rate = labels.double().mean().item()
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert log_loss(probs, labels) == pytest.approx(ll, rel=1e-9)
    assert normalized_entropy(probs, labels) == pytest.approx(ll / entropy, rel=1e-9)
    assert calibration(probs, labels) == pytest.approx(probs.double().sum().item() / labels.sum().item(), rel=1e-9)
    # Predicting the base rate for everyone is NE 1 and perfectly calibrated.
    base = torch.full((400,), rate)
    assert normalized_entropy(base, labels) == pytest.approx(1.0, rel=1e-6)
    assert calibration(base, labels) == pytest.approx(1.0, rel=1e-6)


def test_streaming_accumulator_equals_one_shot():
    g = torch.Generator().manual_seed(7)
    probs = torch.rand(1000, generator=g)
    labels = (torch.rand(1000, generator=g) < probs).long()
    m = RankingMetrics()
    for lo in range(0, 1000, 137):
        m.update(probs[lo : lo + 137], labels[lo : lo + 137])
    out = m.compute()
    assert out["count"] == 1000
    assert out["auc"] == pytest.approx(auc(probs, labels), abs=1e-12)
    assert out["ne"] == pytest.approx(normalized_entropy(probs, labels), rel=1e-12)
    assert out["log_loss"] == pytest.approx(log_loss(probs, labels), rel=1e-12)
    assert out["calibration"] == pytest.approx(calibration(probs, labels), rel=1e-12)
    assert out["ctr"] == pytest.approx(labels.float().mean().item())
    m.reset()
    with pytest.raises(ValueError, match="no samples"):
        m.compute()


def test_degenerate_input_errors():
    with pytest.raises(ValueError, match="all 3 labels are 1"):
        auc(torch.tensor([0.1, 0.2, 0.3]), torch.ones(3))
    with pytest.raises(ValueError, match="NE is undefined: all 2 labels are 0"):
        normalized_entropy(torch.tensor([0.1, 0.2]), torch.zeros(2))
    with pytest.raises(ValueError, match="calibration is undefined"):
        calibration(torch.tensor([0.1, 0.2]), torch.zeros(2))
    with pytest.raises(ValueError, match="1 NaN"):
        auc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 1\].*sigmoid"):
        auc(torch.tensor([-2.0, 3.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="3 values but labels has 2"):
        auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        auc(torch.zeros(0), torch.zeros(0))
    m = RankingMetrics()
    m.update(torch.tensor([0.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"batch 1.*NaN"):
        m.update(torch.tensor([float("nan")]), torch.tensor([0]))
    with pytest.raises(ValueError, match="all 1 labels are 1"):
        m.compute()
