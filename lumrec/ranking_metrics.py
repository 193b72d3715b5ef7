"""Ranking (CTR) metrics: AUC with ties, normalized entropy, calibration, and a streaming accumulator.

All take predicted click probabilities `probs` and binary `labels` (0/1) of the same length.

- AUC: the probability that a random positive scores above a random negative, ties counted 0.5
  (Mann-Whitney U with mid-ranks), computed from one sort.
- NE: log loss divided by the entropy of the base rate `p = mean(labels)`, so that predicting the
  base rate for everyone scores exactly 1 and lower is better (He et al., ADKDD'14).
- Calibration: `sum(probs) / sum(labels)` (1 = as many clicks predicted as observed).

Degenerate input is an error, never a silent NaN: no samples, all labels equal (AUC and NE are
undefined), NaN or out-of-range probabilities, labels other than 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["auc", "log_loss", "normalized_entropy", "calibration", "RankingMetrics"]

# Probabilities are clipped to [EPS, 1 - EPS] inside log loss so that a confident miss costs a
# large but finite amount (same role as sklearn's clipping).
EPS = 1e-7


def _as_flat(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def _checked(probs: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float64 CPU copies of `probs`, `labels` after checking them; errors name `what`."""
    p, y = _as_flat(probs), _as_flat(labels)
    if p.numel() != y.numel():
        raise ValueError(f"{what}: probs has {p.numel()} values but labels has {y.numel()}")
    if p.numel() == 0:
        raise ValueError(f"{what}: no samples")
    nan = int(torch.isnan(p).sum())
    if nan:
        raise ValueError(f"{what}: probs contain {nan} NaN value(s)")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError(
            f"{what}: probs must be probabilities in [0, 1], got range [{float(p.min())}, {float(p.max())}]"
            " (apply a sigmoid to logits first)"
        )
    if bool(((y != 0) & (y != 1)).any()):
        bad = y[(y != 0) & (y != 1)][:3].tolist()
        raise ValueError(f"{what}: labels must be 0 or 1, got e.g. {bad}")
    return p, y


def _check_both_classes(y: torch.Tensor, what: str) -> None:
    positives = int(y.sum())
    if positives == 0 or positives == y.numel():
        raise ValueError(f"{what} is undefined: all {y.numel()} labels are {int(y[0])}")


def _auc(p: torch.Tensor, y: torch.Tensor) -> float:
    """AUC of checked float64 inputs with both classes present."""
    order = torch.argsort(p)
    sorted_p, sorted_y = p[order], y[order]
    _, inverse, counts = torch.unique_consecutive(sorted_p, return_inverse=True, return_counts=True)
    # 1-based mid-rank of each group of equal scores: a tie contributes half a win either way.
    ends = torch.cumsum(counts, 0).double()
    mid_ranks = ends - (counts.double() - 1.0) / 2.0
    ranks = mid_ranks[inverse]
    pos = sorted_y.sum()
    neg = sorted_y.numel() - pos
    u = ranks[sorted_y == 1].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve, ties counted as half; needs both labels present."""
    p, y = _checked(probs, labels, "AUC")
    _check_both_classes(y, "AUC")
    return _auc(p, y)


def _log_loss(p: torch.Tensor, y: torch.Tensor) -> float:
    p = p.clamp(EPS, 1.0 - EPS)
    return float(-(y * p.log() + (1.0 - y) * (1.0 - p).log()).mean())


def _entropy(rate: float) -> float:
    r = torch.tensor(rate, dtype=torch.float64)
    return float(-(r * r.log() + (1.0 - r) * (1.0 - r).log()))


def log_loss(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-7, 1 - 1e-7])."""
    p, y = _checked(probs, labels, "log loss")
    return _log_loss(p, y)


def normalized_entropy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Log loss divided by the entropy of the base rate (1 = no better than predicting the CTR)."""
    p, y = _checked(probs, labels, "NE")
    _check_both_classes(y, "NE")
    return _log_loss(p, y) / _entropy(float(y.mean()))


def calibration(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """sum(probs) / sum(labels): predicted over observed clicks."""
    p, y = _checked(probs, labels, "calibration")
    clicks = float(y.sum())
    if clicks == 0:
        raise ValueError(f"calibration is undefined: all {y.numel()} labels are 0")
    return float(p.sum()) / clicks


@dataclass
class RankingMetrics:
    """Streaming AUC / NE / log loss / calibration over batches (exact: keeps every prediction for AUC).

    Example::

        >>> m = RankingMetrics()
        >>> m.update(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))
        >>> m.update(torch.tensor([0.4, 0.4]), torch.tensor([1, 0]))
        >>> round(m.compute()["auc"], 3)
        0.875
    """

    count: int = 0
    _probs: list[torch.Tensor] = field(default_factory=list, repr=False)
    _labels: list[torch.Tensor] = field(default_factory=list, repr=False)

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predicted probabilities and 0/1 labels (checked now, so a bad batch is named)."""
        p, y = _checked(probs, labels, f"RankingMetrics.update (batch {len(self._probs)})")
        self._probs.append(p)
        self._labels.append(y)
        self.count += p.numel()

    def reset(self) -> None:
        """Forget every batch."""
        self.count = 0
        self._probs.clear()
        self._labels.clear()

    def compute(self) -> dict[str, float]:
        """auc, ne, log_loss, calibration, ctr (base rate), mean_prob and count over every batch seen."""
        if self.count == 0:
            raise ValueError("RankingMetrics: no samples were added")
        p, y = torch.cat(self._probs), torch.cat(self._labels)
        _check_both_classes(y, "RankingMetrics (AUC and NE)")
        ctr = float(y.mean())
        loss = _log_loss(p, y)
        return {
            "auc": _auc(p, y),
            "ne": loss / _entropy(ctr),
            "log_loss": loss,
            "calibration": float(p.sum()) / float(y.sum()),
            "ctr": ctr,
            "mean_prob": float(p.mean()),
            "count": float(self.count),
        }
