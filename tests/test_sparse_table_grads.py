"""Row-sparse table gradients + RowwiseAdamW: against a dense reference, and bit for bit against dense gradients."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from torchrec.modules.embedding_configs import PoolingType

from lumrec.optim import RowwiseAdamW
from lumrec.optim.sparse_grads import sparse_table_gradients

FEATS = ["f1", "f2", "f3"]
ROWS = {"t1": 50, "t2": 9}
TABLE_OF = {"f1": "t1", "f3": "t1", "f2": "t2"}  # t1 is looked up by two features
KW = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)


def dense_reference_step(w, m, v, grad, step, lr, betas, eps, wd):
    """Plain row-wise AdamW on full tables (masks, no gathers): the documented formula, one step."""
    b1, b2 = betas
    touched = grad.ne(0).any(dim=1, keepdim=True)
    m_new = torch.where(touched, b1 * m + (1 - b1) * grad, m)
    v_new = torch.where(touched.squeeze(1), b2 * v + (1 - b2) * grad.square().mean(dim=1), v)
    update = m_new / (1 - b1**step) / ((v_new / (1 - b2**step)).sqrt() + eps).unsqueeze(1)
    w_new = torch.where(touched, w - lr * (update + wd * w), w)
    return w_new, m_new, v_new


def _collection(kind, pooling=PoolingType.SUM, weighted=False, seed=0):
    torch.manual_seed(seed)
    if kind == "ebc":
        tables = [EmbeddingBagConfig(name=t, embedding_dim=6, num_embeddings=n, pooling=pooling,
                                     feature_names=[f for f in FEATS if TABLE_OF[f] == t]) for t, n in ROWS.items()]
        return EmbeddingBagCollection(tables=tables, is_weighted=weighted)
    tables = [EmbeddingConfig(name=t, embedding_dim=6, num_embeddings=n,
                              feature_names=[f for f in FEATS if TABLE_OF[f] == t]) for t, n in ROWS.items()]
    return EmbeddingCollection(tables=tables)


def _batches(seed, steps=4, weighted=False):
    """KJTs with many repeated ids, all in the lower half of each table (the upper half is never touched)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = [torch.randint(0, 12, (5,), generator=g) for _ in FEATS]
        values = [torch.randint(0, ROWS[TABLE_OF[f]] // 2, (int(ln.sum()),), generator=g) for f, ln in zip(FEATS, lengths)]
        vals = torch.cat(values)
        weights = torch.rand(vals.numel(), generator=g) if weighted else None
        out.append(KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=vals, lengths=torch.cat(lengths), weights=weights))
    return out


def _loss(kind, module, kjt, seed):
    """A loss whose gradient differs per row; for EBCs a second lookup of t1 (candidate-style ids)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ec":
        return sum((jt.values().square() * torch.randn(jt.values().shape, generator=g).to(jt.values().device)).sum()
                   for jt in module(kjt).values())
    pooled = module(kjt).values()
    loss = (pooled * torch.randn(pooled.shape, generator=g).to(pooled.device)).sum()
    f1 = kjt["f1"]
    second = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATS, values=f1.values(), lengths=torch.cat([f1.lengths(), torch.zeros(2 * f1.lengths().numel(), dtype=f1.lengths().dtype)]),
        weights=f1.weights() if kjt.weights_or_none() is not None else None,
    )
    return loss + (module(second).values() * torch.randn(pooled.shape, generator=g).to(pooled.device)).sum()


def _train(kind, sparse, in_backward, pooling=PoolingType.SUM, weighted=False, seed=0):
    module = _collection(kind, pooling, weighted, seed)
    if sparse:
        assert sparse_table_gradients(module, exact=False) == 2
    opt = None
    if in_backward:
        _apply_optimizer_in_backward(RowwiseAdamW, module.parameters(), dict(KW))
    else:
        opt = RowwiseAdamW(module.parameters(), **KW)
    for i, kjt in enumerate(_batches(seed, weighted=weighted)):
        _loss(kind, module, kjt, seed * 100 + i).backward()
        if opt is not None:
            if sparse:
                assert all(p.grad.is_sparse for p in module.parameters())
            opt.step()
            opt.zero_grad()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("kind,pooling", [("ebc", PoolingType.SUM), ("ec", None)])
def test_sparse_gradients_train_bit_for_bit_like_dense(kind, pooling, in_backward, seed):
    dense = _train(kind, False, in_backward, pooling, seed=seed)
    sparse = _train(kind, True, in_backward, pooling, seed=seed)
    for key, value in dense.items():
        assert torch.equal(sparse[key], value), key


@pytest.mark.parametrize("pooling,weighted", [(PoolingType.MEAN, False), (PoolingType.SUM, True)])
def test_scaled_lookups_agree_up_to_rounding_and_stay_dense_when_exact(pooling, weighted):
    # The dense kernel fuses the mean's 1/n or the per-sample weight into its sum (one rounding fewer).
    dense = _train("ebc", False, False, pooling, weighted)
    sparse = _train("ebc", True, False, pooling, weighted)
    for key, value in dense.items():
        torch.testing.assert_close(sparse[key], value, rtol=1e-5, atol=1e-6)
    assert sparse_table_gradients(_collection("ebc", pooling, weighted)) == 0
    assert sparse_table_gradients(_collection("ebc", PoolingType.SUM, False)) == 2


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_matches_dense_reference_and_untouched_rows_keep_state(seed):
    g = torch.Generator().manual_seed(seed)
    rows, dim = int(torch.randint(20, 200, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])])
    weight = ebc.embedding_bags["t"].weight
    torch.nn.init.normal_(weight, generator=g)
    model = torch.nn.ModuleDict({"tables": ebc})  # found inside a model too
    assert sparse_table_gradients(model) == 1
    opt = RowwiseAdamW([weight], **KW)
    w, m, v = weight.detach().clone().double(), torch.zeros(rows, dim, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    for step in range(1, 6):
        hi = rows // 3 if step < 3 else rows  # the upper rows stay untouched for the first steps
        lengths = torch.randint(0, 8, (6,), generator=g)
        ids = torch.randint(0, hi, (int(lengths.sum()),), generator=g)
        ids[: min(4, ids.numel())] = ids[:1].expand(min(4, ids.numel()))  # repeated ids
        coef = torch.randn(6, dim, generator=g)
        (ebc(KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)).values() * coef).sum().backward()
        grad = weight.grad
        assert grad.is_sparse and grad._nnz() == ids.unique().numel()  # one row per touched id, nothing else
        dense_grad = grad.to_dense().double()
        before = (weight.detach().clone(), opt.state[weight]["exp_avg"].clone() if step > 1 else None)
        opt.step()
        opt.zero_grad()
        w, m, v = dense_reference_step(w, m, v, dense_grad, step, KW["lr"], KW["betas"], KW["eps"], KW["weight_decay"])
        torch.testing.assert_close(weight.detach().double(), w, rtol=1e-5, atol=1e-6)
        state = opt.state[weight]
        torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq_row"].double(), v, rtol=1e-5, atol=1e-9)
        untouched = ~dense_grad.ne(0).any(1)
        assert torch.equal(weight.detach()[untouched], before[0][untouched])
        if before[1] is not None:
            assert torch.equal(state["exp_avg"][untouched], before[1][untouched])


def test_idempotent_and_eval_untouched():
    module = _collection("ec")
    assert sparse_table_gradients(module) == sparse_table_gradients(module) == 2
    kjt = _batches(0, steps=1)[0]
    with torch.no_grad():
        out = module(kjt)
    plain = _collection("ec")
    for key, jt in plain(kjt).items():
        assert torch.equal(out[key].values(), jt.values())


def test_export_traces_a_switched_collection():
    module = _collection("ebc")
    sparse_table_gradients(module)
    kjt = _batches(0, steps=1)[0]
    exported = torch.export.export(module, (kjt,), strict=False)
    assert torch.equal(exported.module()(kjt).values(), module(kjt).values())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_sparse_gradients_on_cuda_train_like_cpu(kind):
    out = {}
    for device in ("cpu", "cuda"):
        module = _collection(kind).to(device)
        sparse_table_gradients(module)
        opt = RowwiseAdamW(module.parameters(), **KW)  # state in host memory, as on CPU
        for i, kjt in enumerate(_batches(0)):
            _loss(kind, module, kjt.to(torch.device(device)), i).backward()
            assert all(p.grad.is_sparse for p in module.parameters())
            opt.step()
            opt.zero_grad()
        out[device] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    for key, value in out["cpu"].items():
        # CUDA sums a row's duplicates in another order: float32 rounding, nothing more.
        torch.testing.assert_close(out["cuda"][key], value, rtol=1e-5, atol=1e-6)
