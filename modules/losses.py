"""Contrastive next-item losses: InfoNCE over in-batch and sampled negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class InfoNCEConfig:
    """Negatives and similarity of the next-(condition-)item loss."""

    temperature: float = 0.05
    num_sampled_negatives: int = 128  # uniform over the item vocabulary; 0 = in-batch only
    in_batch_negatives: bool = True
    l2_normalize: bool = True


class InfoNCELoss(torch.nn.Module):
    """Softmax cross-entropy of each query's target item against in-batch and sampled negatives.

    Example::

        >>> loss = InfoNCELoss(InfoNCEConfig(num_sampled_negatives=4), num_items=10)
        >>> q = torch.randn(3, 8); table = torch.randn(10, 8)
        >>> out = loss(q, torch.tensor([1, 2, 2]), table.__getitem__, torch.Generator().manual_seed(0))
        >>> out.dim()
        0
    """

    def __init__(self, config: InfoNCEConfig, num_items: int):
        super().__init__()
        self.config = config
        self.num_items = num_items  # ids 1..num_items-1 are real items; 0 is padding

    def forward(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        embed_items,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean loss over queries [Q, d] with target ids [Q]; `embed_items(ids)` gives [n, d]."""
        cfg = self.config
        if queries.shape[0] == 0:
            return queries.sum() * 0.0
        cand_ids = [targets]
        if cfg.num_sampled_negatives > 0:
            sampled = torch.randint(
                1, self.num_items, (cfg.num_sampled_negatives,), generator=generator, device=targets.device
            )
            cand_ids.append(sampled)
        ids = torch.cat(cand_ids)
        # One embedding pass over unique ids (in-batch targets repeat a lot).
        uniq, inverse = torch.unique(ids, return_inverse=True)
        cand = embed_items(uniq)
        q = queries
        if cfg.l2_normalize:
            q, cand = F.normalize(q, dim=-1), F.normalize(cand, dim=-1)
        logits = q @ cand.T / cfg.temperature  # [Q, U]
        pos_col = inverse[: targets.numel()]
        positive = logits.gather(1, pos_col.view(-1, 1))
        # A candidate equal to a query's own target is not a negative for that query.
        same = uniq.view(1, -1) == targets.view(-1, 1)
        if not cfg.in_batch_negatives:
            in_batch = torch.zeros(uniq.numel(), dtype=torch.bool, device=uniq.device)
            in_batch[pos_col] = True
            if cfg.num_sampled_negatives > 0:
                in_batch[inverse[targets.numel():]] = False
            same = same | in_batch.view(1, -1)
        negatives = logits.masked_fill(same, float("-inf"))
        all_logits = torch.cat([positive, negatives], dim=1)
        return torch.logsumexp(all_logits, dim=1).sub(positive.squeeze(1)).mean()
