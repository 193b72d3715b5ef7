"""Retrieval metrics and InfoNCE against plain per-row references."""

from __future__ import annotations

import math

import pytest
import torch

from lumrec.metrics import RetrievalMetrics, target_ranks
from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_and_metrics_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 20, (64, 50), generator=g).float()  # many ties on purpose
    targets = torch.randint(1, 50, (64,), generator=g)
    exclude = torch.zeros(64, 50, dtype=torch.bool)
    exclude[:, 0] = True
    ranks = target_ranks(scores, targets, exclude)
    metrics = RetrievalMetrics(ks=(1, 10), ndcg_ks=(10,))
    metrics.update(ranks[:30])
    metrics.update(ranks[30:])
    out = metrics.compute()
    hr1 = hr10 = ndcg10 = 0.0
    for b in range(64):
        t = targets[b].item()
        # pessimistic: every other real item scoring >= the target is ranked above it
        rank = sum(1 for i in range(1, 50) if i != t and scores[b, i] >= scores[b, t])
        assert ranks[b].item() == rank
        hr1 += rank < 1
        hr10 += rank < 10
        ndcg10 += 1 / math.log2(rank + 2) if rank < 10 else 0.0
    assert out["hr@1"] == pytest.approx(hr1 / 64)
    assert out["hr@10"] == pytest.approx(hr10 / 64)
    assert out["ndcg@10"] == pytest.approx(ndcg10 / 64)


def test_constant_model_gets_chance_level():
    ranks = target_ranks(torch.zeros(4, 101), torch.tensor([1, 2, 3, 4]), exclude=None)
    assert ranks.tolist() == [100] * 4
    with pytest.raises(ValueError, match="no targets"):
        RetrievalMetrics().compute()


def _reference_infonce(q, targets, table, sampled, temperature, in_batch):
    """Per query: logsumexp over {target} + negatives (sampled, plus other in-batch targets) minus positive."""
    qn = torch.nn.functional.normalize(q, dim=-1)
    tn = torch.nn.functional.normalize(table, dim=-1)
    losses = []
    for i in range(q.shape[0]):
        t = targets[i].item()
        negs = set(sampled.tolist())
        if in_batch:
            negs |= set(targets.tolist())
        negs.discard(t)
        ids = [t] + sorted(negs)
        logits = torch.stack([qn[i] @ tn[j] for j in ids]) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed,in_batch,k", [(0, True, 8), (1, True, 0), (2, False, 8), (3, True, 64)])
def test_infonce_matches_reference(seed, in_batch, k):
    torch.manual_seed(seed)
    table = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    q = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 30, (12,))
    targets[3] = targets[5]  # duplicate targets in the batch
    cfg = InfoNCEConfig(temperature=0.1, num_sampled_negatives=k, in_batch_negatives=in_batch)
    loss_fn = InfoNCELoss(cfg, num_items=30)
    out = loss_fn(q, targets, lambda ids: table[ids], torch.Generator().manual_seed(7))
    sampled = torch.randint(1, 30, (k,), generator=torch.Generator().manual_seed(7)) if k else torch.empty(0, dtype=torch.long)
    ref = _reference_infonce(q, targets, table, sampled, 0.1, in_batch)
    assert out.item() == pytest.approx(ref.item(), rel=1e-10)
    g1 = torch.autograd.grad(out, (q, table))
    g2 = torch.autograd.grad(ref, (q, table))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_infonce_empty_queries():
    loss_fn = InfoNCELoss(InfoNCEConfig(), num_items=10)
    q = torch.zeros(0, 4, requires_grad=True)
    assert loss_fn(q, torch.zeros(0, dtype=torch.long), lambda ids: torch.zeros(len(ids), 4)).item() == 0.0


def test_full_softmax_matches_reference():
    torch.manual_seed(4)
    table = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    q = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 5, 5, 19, 2, 7])
    out = InfoNCELoss(InfoNCEConfig(temperature=0.2, num_sampled_negatives=-1), num_items=20)(q, targets, lambda ids: table[ids])
    everything = torch.arange(1, 20)  # every real item is a candidate; padding id 0 never is
    ref = _reference_infonce(q, targets, table, everything, 0.2, in_batch=False)
    assert out.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(out, (q, table)), torch.autograd.grad(ref, (q, table))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bounded", [False, True])
def test_matmul_cross_entropy_matches_torch(seed, bounded):
    """The fused full-softmax loss equals F.cross_entropy(q @ c.T, t) in value and gradients."""
    from lumrec.modules.layers.losses import matmul_cross_entropy

    g = torch.Generator().manual_seed(seed)
    n_q, n_c, d = (int(x) for x in torch.randint(1, 40, (3,), generator=g))
    temperature = 0.05
    q = torch.nn.functional.normalize(torch.randn(n_q, d, generator=g, dtype=torch.float64), dim=-1) / temperature
    c = torch.nn.functional.normalize(torch.randn(n_c, d, generator=g, dtype=torch.float64), dim=-1)
    q.requires_grad_(True)
    c.requires_grad_(True)
    targets = torch.randint(0, n_c, (n_q,), generator=g)
    bound = 1 / temperature + 1e-3 if bounded else None
    out = matmul_cross_entropy(q, c, targets, bound)
    ref = torch.nn.functional.cross_entropy(q @ c.T, targets)
    torch.testing.assert_close(out, ref)
    upstream = torch.tensor(1.7, dtype=torch.float64)  # a non-unit upstream gradient
    for a, b in zip(torch.autograd.grad(out * upstream, (q, c)), torch.autograd.grad(ref * upstream, (q, c))):
        torch.testing.assert_close(a, b)


def test_matmul_cross_entropy_large_logits_unbounded_is_stable():
    from lumrec.modules.layers.losses import matmul_cross_entropy

    q = torch.tensor([[300.0, 0.0], [0.0, -300.0]], requires_grad=True)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    out = matmul_cross_entropy(q, c, torch.tensor([0, 2]))
    ref = torch.nn.functional.cross_entropy(q @ c.T, torch.tensor([0, 2]))
    torch.testing.assert_close(out, ref)
    assert torch.isfinite(torch.autograd.grad(out, q)[0]).all()
    with pytest.raises(TypeError, match="float64"):
        matmul_cross_entropy(q.double(), c, torch.tensor([0, 2]))


@pytest.mark.parametrize("seed", range(6))
def test_matmul_cross_entropy_with_masked_pairs_matches_torch(seed):
    """Masked (row, column) pairs behave as logits of -inf: same value and gradients as F.cross_entropy."""
    from lumrec.modules.layers.losses import matmul_cross_entropy

    g = torch.Generator().manual_seed(seed)
    n_q, n_c, d = (int(x) for x in torch.randint(2, 40, (3,), generator=g))
    q = torch.randn(n_q, d, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(n_c, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, n_c, (n_q,), generator=g)
    rows = torch.randint(0, n_q, (3 * n_q,), generator=g)
    cols = torch.randint(0, n_c, (3 * n_q,), generator=g)
    keep = cols != targets[rows]  # a row's target is never masked (duplicates are kept: masking twice is masking once)
    masked = torch.stack([rows[keep], cols[keep]])
    out = matmul_cross_entropy(q, c, targets, None, masked)
    logits = (q @ c.T).index_put((masked[0], masked[1]), torch.tensor(float("-inf"), dtype=torch.float64))
    ref = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, c)), torch.autograd.grad(ref, (q, c))):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="masked pair is its row's target"):
        matmul_cross_entropy(q, c, targets, None, torch.stack([torch.tensor([0]), targets[:1]]))


def test_full_softmax_leaves_seen_items_out_of_each_querys_negatives():
    torch.manual_seed(5)
    table = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([4, 9, 2])
    seen = torch.tensor([[0, 0, 2, 2, 2], [1, 7, 3, 11, 1]])  # (query, item id)
    loss_fn = InfoNCELoss(InfoNCEConfig(temperature=0.5, num_sampled_negatives=-1, exclude_seen=True), num_items=12)
    out = loss_fn(q, targets, lambda ids: table[ids], seen=seen)
    unit_q, unit_t = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(table, dim=-1)
    ref = 0.0
    for k in range(3):  # per query: softmax over every real item except its seen ones
        items = [i for i in range(1, 12) if i not in seen[1][seen[0] == k].tolist()]
        logits = unit_q[k] @ unit_t[items].T / 0.5
        ref = ref - torch.log_softmax(logits, 0)[items.index(int(targets[k]))] / 3
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, table)), torch.autograd.grad(ref, (q, table))):
        torch.testing.assert_close(a, b)


def _seen_sets(seen: torch.Tensor, n_queries: int) -> list[set[int]]:
    return [set(seen[1][seen[0] == k].tolist()) for k in range(n_queries)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("in_batch", [True, False])
def test_sampled_and_in_batch_negatives_leave_seen_items_out(seed, in_batch):
    """exclude_seen with in-batch and/or sampled negatives: a per-query softmax over its own candidate list, less its seen items."""
    g = torch.Generator().manual_seed(seed)
    num_items, d, n_q, k = 30, 5, int(torch.randint(2, 12, (1,), generator=g)), 8
    table = torch.randn(num_items, d, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(n_q, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, num_items, (n_q,), generator=g)
    pairs = torch.stack([torch.randint(0, n_q, (4 * n_q,), generator=g), torch.randint(1, num_items, (4 * n_q,), generator=g)])
    seen = pairs[:, pairs[1] != targets[pairs[0]]]  # as seen_item_pairs: never the query's own target
    cfg = InfoNCEConfig(temperature=0.5, num_sampled_negatives=k, in_batch_negatives=in_batch, exclude_seen=True)
    out = InfoNCELoss(cfg, num_items=num_items)(q, targets, lambda ids: table[ids], torch.Generator().manual_seed(seed), seen=seen)
    sampled = torch.randint(1, num_items, (k,), generator=torch.Generator().manual_seed(seed))  # the loss's draw
    unit_q, unit_t = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(table, dim=-1)
    ref = 0.0
    for row, (t, own_seen) in enumerate(zip(targets.tolist(), _seen_sets(seen, n_q))):
        negatives = set(sampled.tolist()) | (set(targets.tolist()) if in_batch else set())
        items = [t, *sorted(negatives - own_seen - {t})]  # the positive first, then each other candidate once
        logits = unit_q[row] @ unit_t[items].T / 0.5
        ref = ref - torch.log_softmax(logits, 0)[0] / n_q
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, table)), torch.autograd.grad(ref, (q, table))):
        torch.testing.assert_close(a, b)
    plain = InfoNCELoss(InfoNCEConfig(temperature=0.5, num_sampled_negatives=k, in_batch_negatives=in_batch), num_items=num_items)
    assert plain(q, targets, lambda ids: table[ids], torch.Generator().manual_seed(seed), seen=seen) > out  # fewer negatives


def test_seen_columns_finds_each_seen_item_among_the_candidates():
    from lumrec.modules.layers.losses import seen_columns

    seen = torch.tensor([[0, 0, 1, 2, 2], [3, 8, 5, 1, 9]])
    cols = seen_columns(seen, torch.tensor([1, 3, 5, 7]))
    assert cols.tolist() == [[0, 1, 2], [1, 2, 0]]  # items 8 and 9 are no candidate (9 is past the last one)
    assert seen_columns(seen, torch.tensor([], dtype=torch.long)).shape == (2, 0)
