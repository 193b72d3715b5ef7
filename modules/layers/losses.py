"""Contrastive next-item losses: InfoNCE over in-batch and sampled negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class InfoNCEConfig:
    """Negatives and similarity of the next-(condition-)item loss."""

    temperature: float = 0.05
    # Uniform over the item vocabulary; 0 = in-batch only; -1 = every item (full softmax: no
    # sampling bias, affordable for catalogs of a few thousand items such as ML-1M).
    num_sampled_negatives: int = 128
    in_batch_negatives: bool = True
    l2_normalize: bool = True
    # Leave the items a query's own sequence already holds out of its negatives (whichever kind),
    # so training ranks the candidates an `exclude_seen` evaluation ranks (its target always stays).
    exclude_seen: bool = False


class _MatmulCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `q @ c.T` (targets are column indices) without a [Q, N] log-softmax.

    The forward exponentiates the logits in place and keeps them with their row sums; the
    backward scales them into probabilities in place. Against `F.cross_entropy(q @ c.T, t)` this
    skips the log-softmax output, the zero-filled one-hot gradient and the softmax-backward
    pass: the [Q, N] passes that dominate a full-softmax step on CPU. With `logit_bound` (known
    |logit| <= bound, e.g. 1/temperature for l2-normalised vectors) the row-max pass is skipped
    too: exp(logit - bound) can neither overflow nor vanish for bound <= 40. `masked` (row, column)
    pairs get exp = 0: out of that row's softmax, and no gradient through them.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, logit_bound: float | None,
                masked: torch.Tensor | None) -> torch.Tensor:
        logits = q @ c.T
        target_logits = logits.gather(1, targets.view(-1, 1)).squeeze(1)
        if logit_bound is not None and logit_bound <= 40.0:
            shift = torch.full_like(target_logits, logit_bound)
        else:
            shift = logits.max(dim=1).values
        exp = logits.sub_(shift.view(-1, 1)).exp_()  # in place: the logits are not needed again
        if masked is not None:
            exp[masked[0], masked[1]] = 0.0
        row_sum = exp.sum(dim=1)
        loss = (row_sum.log() + shift - target_logits).mean()
        ctx.save_for_backward(q, c, targets, exp, row_sum)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, c, targets, exp, row_sum = ctx.saved_tensors
        scale = grad / len(targets)
        probs = exp.mul_((scale / row_sum).view(-1, 1))  # in place: the graph is used once
        probs[torch.arange(len(targets), device=targets.device), targets] -= scale
        grad_q = probs @ c if ctx.needs_input_grad[0] else None
        grad_c = probs.T @ q if ctx.needs_input_grad[1] else None
        return grad_q, grad_c, None, None, None


def matmul_cross_entropy(
    q: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor, logit_bound: float | None = None,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(q @ candidates.T, targets)`, faster and leaner for large candidate sets.

    `logit_bound`: a promise that every |logit| <= bound (it skips the row-max pass).
    `masked`: [2, P] (row, column) pairs whose logit is -inf (never a row's target).
    """
    if torch.is_autocast_enabled(q.device.type):
        # Under bf16 autocast the loss still runs in float32: a softmax over many candidates needs its
        # precision, and the backward (outside autocast) multiplies the saved tensors as they are.
        with torch.autocast(q.device.type, enabled=False):
            return matmul_cross_entropy(q.float(), candidates.float(), targets, logit_bound, masked)
    if q.dtype != candidates.dtype:
        raise TypeError(f"matmul_cross_entropy: q is {q.dtype} but candidates are {candidates.dtype}")
    if masked is not None and bool((masked[1] == targets[masked[0]]).any()):
        raise ValueError("matmul_cross_entropy: a masked pair is its row's target")
    return _MatmulCrossEntropy.apply(q, candidates, targets, logit_bound, masked)


def gather_ids(ids: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """Every rank's 1-D int64 `ids` concatenated in rank order, and where this rank's start in it.

    Ranks may hold different numbers of ids (zero too): sizes are gathered first, then the ids
    padded to the largest. Ids need no gradient, so a plain all_gather suffices.
    """
    world = dist.get_world_size(group)
    size = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s) for s in sizes_t]
    width = max(sizes)
    if width == 0:  # the same decision on every rank: nobody has ids
        return ids.new_zeros(0), 0
    padded = ids.new_zeros(width)
    padded[: ids.numel()] = ids
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def seen_columns(seen: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """[2, P'] (query, column): the `seen` (query, item id) pairs whose item is among the sorted, unique `candidate_ids`."""
    if candidate_ids.numel() == 0:
        return seen.new_zeros(2, 0)
    cols = torch.searchsorted(candidate_ids, seen[1]).clamp_(max=candidate_ids.numel() - 1)
    hit = candidate_ids[cols] == seen[1]
    return torch.stack([seen[0][hit], cols[hit]])


def _no_query_loss(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """A zero loss that still reaches the queries and candidates (every parameter keeps a gradient, zero)."""
    return queries.sum() * 0.0 + candidates.sum() * 0.0


class InfoNCELoss(torch.nn.Module):
    """Softmax cross-entropy of each query's target item against in-batch and sampled negatives.

    With a `process_group` of N > 1 ranks (data-parallel training with sharded tables), each rank
    passes its own queries and the loss stays the mean over them, while: in-batch negatives are
    the targets of every rank (the ids are gathered; each rank embeds the global candidate set,
    so a query sees the candidates it would see in one process), and every rank makes the same
    candidate lookups even without queries, because a sharded table lookup is a collective.
    Sampled negatives must be drawn from a generator seeded alike on every rank.

    Example::

        >>> loss = InfoNCELoss(InfoNCEConfig(num_sampled_negatives=4), num_items=10)
        >>> q = torch.randn(3, 8); table = torch.randn(10, 8)
        >>> out = loss(q, torch.tensor([1, 2, 2]), table.__getitem__, torch.Generator().manual_seed(0))
        >>> out.dim()
        0
    """

    def __init__(self, config: InfoNCEConfig, num_items: int, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config = config
        self.num_items = num_items  # ids 1..num_items-1 are real items; 0 is padding
        self.process_group = process_group

    @property
    def collective(self) -> bool:
        """True when the loss runs on several ranks (see the class docstring)."""
        return self.process_group is not None and dist.get_world_size(self.process_group) > 1

    def forward(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        embed_items,
        generator: torch.Generator | None = None,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean loss over queries [Q, d] with target ids [Q]; `embed_items(ids)` gives [n, d].

        `seen`: [2, P] (query, item id) pairs left out of that query's negatives (`exclude_seen`).
        """
        cfg = self.config
        if queries.shape[0] == 0 and not self.collective:
            return queries.sum() * 0.0
        seen = seen if cfg.exclude_seen else None
        if cfg.num_sampled_negatives < 0:
            return self._full_softmax(queries, targets, embed_items, seen)
        sampled = None
        if cfg.num_sampled_negatives > 0:
            sampled = torch.randint(
                1, self.num_items, (cfg.num_sampled_negatives,), generator=generator, device=targets.device
            )
        if cfg.in_batch_negatives:
            return self._in_batch(queries, targets, sampled, embed_items, seen)
        if sampled is None:
            raise ValueError("InfoNCE needs negatives: enable in_batch_negatives or num_sampled_negatives > 0")
        return self._sampled_only(queries, targets, sampled, embed_items, seen)

    def _logit_bound(self) -> float | None:
        """Unit vectors bound every logit by 1/temperature (plus rounding slack); None if unnormalised."""
        return 1.0 / self.config.temperature + 1e-3 if self.config.l2_normalize else None

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.l2_normalize else x

    def _in_batch(self, queries, targets, sampled, embed_items, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Candidates = unique(in-batch targets + sampled); each id appears once, so a query's
        own target is exactly its positive column and plain cross-entropy is the InfoNCE loss.
        A query's `seen` items among the candidates are left out of its softmax."""
        batch_targets, first = gather_ids(targets, self.process_group) if self.collective else (targets, 0)
        ids = batch_targets if sampled is None else torch.cat([batch_targets, sampled])
        if ids.numel() == 0:  # no query on any rank and no sampled negative: nothing to look up anywhere
            return queries.sum() * 0.0
        uniq, inverse = torch.unique(ids, return_inverse=True)
        cand = self._normalize(embed_items(uniq))
        if queries.shape[0] == 0:
            return _no_query_loss(queries, cand)
        # Scale the [Q, d] queries, not the [Q, U] logits: one pass over the small matrix.
        q = self._normalize(queries) / self.config.temperature
        masked = None if seen is None else seen_columns(seen, uniq)
        return matmul_cross_entropy(q, cand, inverse[first : first + targets.numel()], self._logit_bound(), masked)

    def _full_softmax(self, queries, targets, embed_items, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of each target against every real item (ids 1..num_items-1), less its `seen` pairs."""
        cand = self._normalize(embed_items(torch.arange(1, self.num_items, device=targets.device)))
        if queries.shape[0] == 0:
            return _no_query_loss(queries, cand)
        masked = None if seen is None else torch.stack([seen[0], seen[1] - 1])  # item id -> candidate column
        return matmul_cross_entropy(self._normalize(queries) / self.config.temperature, cand, targets - 1, self._logit_bound(),
                                    masked)

    def _sampled_only(self, queries, targets, sampled, embed_items, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Positive plus K shared sampled negatives; a sampled id equal to the target, or among the query's `seen`, is masked."""
        sampled = torch.unique(sampled)  # same candidate set semantics as the in-batch path
        q = self._normalize(queries) / self.config.temperature
        if self.collective:
            # One lookup for positives and negatives: the same number of (collective) table
            # lookups on every rank, whatever its number of queries.
            both = self._normalize(embed_items(torch.cat([targets, sampled])))
            if queries.shape[0] == 0:
                return _no_query_loss(queries, both)
            pos_emb, neg_emb = both[: targets.numel()], both[targets.numel() :]
        else:
            pos_emb, neg_emb = self._normalize(embed_items(targets)), self._normalize(embed_items(sampled))
        pos = (q * pos_emb).sum(-1, keepdim=True)  # [Q, 1]
        neg = q @ neg_emb.T  # [Q, K]
        out = sampled.view(1, -1) == targets.view(-1, 1)
        if seen is not None:
            rows, cols = seen_columns(seen, sampled)
            out[rows, cols] = True
        neg = neg.masked_fill(out, float("-inf"))
        logits = torch.cat([pos, neg], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))
