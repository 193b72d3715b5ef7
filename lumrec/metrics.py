"""Retrieval metrics: rank each user's target among all items, HR@K and NDCG@K (K = 5, 10, 20, 50, 200) and MRR.

    >>> m = RetrievalMetrics()
    >>> m.update(torch.tensor([0, 7, 30]))  # 0-based ranks of three targets
    >>> m.compute()["hr@5"], m.compute()["hr@10"], m.compute()["hr@50"]
    (0.3333333333333333, 0.6666666666666666, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Each K is its own running sum, so adding a K never changes another K's value.
DEFAULT_KS = (5, 10, 20, 50, 200)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target among all candidates (ties count against the target).

    scores: [B, N] over item ids 0..N-1; targets: [B]; exclude: optional [B, N] bool of items
    never to rank (e.g. padding id 0). Ties are broken pessimistically so that a constant
    model scores HR@K = K/N, not 1.
    """
    scores = scores.float()
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_scores).sum(dim=1) - 1


@dataclass
class RetrievalMetrics:
    """Running HR@K / NDCG@K over batches of target ranks."""

    ks: tuple[int, ...] = DEFAULT_KS
    ndcg_ks: tuple[int, ...] = DEFAULT_KS
    count: int = 0
    _hits: dict[int, float] = field(default_factory=dict)
    _ndcg: dict[int, float] = field(default_factory=dict)
    _mrr: float = 0.0

    def update(self, ranks: torch.Tensor) -> None:
        """Add a batch of 0-based target ranks."""
        ranks = ranks.double()
        self.count += ranks.numel()
        for k in set(self.ks) | set(self.ndcg_ks):
            hit = ranks < k
            self._hits[k] = self._hits.get(k, 0.0) + hit.sum().item()
            gain = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
            self._ndcg[k] = self._ndcg.get(k, 0.0) + gain.sum().item()
        self._mrr += (1.0 / (ranks + 1.0)).sum().item()

    def compute(self) -> dict[str, float]:
        """hr@K, ndcg@K and mrr averaged over all targets seen."""
        if self.count == 0:
            raise ValueError("no targets were evaluated")
        out = {f"hr@{k}": self._hits[k] / self.count for k in self.ks}
        out.update({f"ndcg@{k}": self._ndcg[k] / self.count for k in self.ndcg_ks})
        out["mrr"] = self._mrr / self.count
        return out
