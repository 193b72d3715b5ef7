"""Row-sparse gradients of torchrec's DENSE kernel: bit for bit against fbgemm's dense gradient, and under DMP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torch.distributed.optim import _apply_optimizer_in_backward

from lumrec.optim import RowwiseAdamW
from lumrec.optim.dense_lookup import TorchDenseLookup
from lumrec.optim.sparse_kernel_grads import sparse_dense_kernel_gradients

KW = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)


def _tbe(pooling, seed):
    if pooling == PoolingMode.NONE:
        specs, ftm = [(20, 4), (30, 4), (12, 4)], [0, 0, 1, 2]
    else:
        specs, ftm = [(20, 8), (30, 4), (0, 4), (12, 8)], [0, 0, 1, 3]  # an empty table too
    tbe = DenseTableBatchedEmbeddingBagsCodegen(specs, feature_table_map=ftm, pooling_mode=pooling, use_cpu=True)
    if pooling == PoolingMode.NONE:
        tbe.__class__ = TorchDenseLookup  # fbgemm's CPU op pools anyway (lumrec.optim.dense_lookup)
    with torch.no_grad():
        tbe.weights.normal_(generator=torch.Generator().manual_seed(seed))
    return tbe, specs, ftm


def _lookups(specs, ftm, seed, steps=3, batch=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 25, (len(ftm) * batch,), generator=g)
        ids = [torch.randint(0, max(1, specs[ftm[i // batch]][0] // 2), (int(n),), generator=g) for i, n in enumerate(lengths)]
        out.append((torch.cat(ids), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])))
    return out


def _train(pooling, sparse, seed, twice):
    tbe, specs, ftm = _tbe(pooling, seed)
    segments = [(int(tbe.weights_physical_offsets[t]), r, d) for t, (r, d) in enumerate(specs)]
    opt = RowwiseAdamW([tbe.weights], segments=segments, **KW)
    if sparse:
        assert sparse_dense_kernel_gradients(tbe) == 1
    g = torch.Generator().manual_seed(seed + 100)
    for ids, offsets in _lookups(specs, ftm, seed):
        out = tbe(ids, offsets)
        loss = (out * torch.randn(out.shape, generator=g)).sum()
        if twice:  # a second lookup of the same rows in the same step (candidates beside a history)
            out2 = tbe(ids.flip(0), offsets)
            loss = loss + (out2 * torch.randn(out2.shape, generator=g)).sum()
        loss.backward()
        assert tbe.weights.grad.is_sparse == sparse
        opt.step()
        opt.zero_grad()
    return tbe.weights.detach().clone(), opt.state[tbe.weights]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("pooling", [PoolingMode.SUM, PoolingMode.NONE])
def test_sparse_kernel_gradient_trains_bit_for_bit_like_dense(pooling, twice, seed):
    w_dense, st_dense = _train(pooling, False, seed, twice)
    w_sparse, st_sparse = _train(pooling, True, seed, twice)
    assert torch.equal(w_dense, w_sparse)
    for key in ("exp_avg", "exp_avg_sq_row", "row_step"):
        assert torch.equal(st_dense[key], st_sparse[key]), key


def test_sparse_gradient_lists_only_looked_up_rows():
    tbe, specs, ftm = _tbe(PoolingMode.SUM, 0)
    sparse_dense_kernel_gradients(tbe)
    ids, offsets = _lookups(specs, ftm, 0, steps=1)[0]
    tbe(ids, offsets).sum().backward()
    grad = tbe.weights.grad
    # Features 0 and 1 read table 0 (dim 8), feature 2 table 1 (dim 4), feature 3 table 3 (dim 8); 5 bags each.
    def distinct(first, last):
        return ids[offsets[first * 5] : offsets[last * 5]].unique().numel()
    assert grad._nnz() == distinct(0, 2) * 8 + distinct(2, 3) * 4 + distinct(3, 4) * 8 < tbe.weights.numel()
    with torch.no_grad():  # evaluation keeps fbgemm's forward, no autograd
        assert not tbe(ids, offsets).requires_grad


def test_flat_sparse_gradient_of_partial_rows_is_scattered():
    flat = torch.nn.Parameter(torch.randn(2 + 7 * 3))
    ref = torch.nn.Parameter(flat.detach().clone())
    opts = [RowwiseAdamW([p], segments=[(2, 7, 3)], **KW) for p in (flat, ref)]
    elements = torch.tensor([5, 6, 12, 3])  # rows 1 (two elements) and 3 (one), plus padding element 3 of row 0
    values = torch.tensor([1.0, -2.0, 0.5, 0.25])
    flat.grad = torch.sparse_coo_tensor(elements.unsqueeze(0), values, (23,))
    ref.grad = flat.grad.to_dense()
    for o in opts:
        o.step()
    assert torch.equal(flat.detach(), ref.detach())


def test_dmp_one_process_sparse_kernel_gradients_equal_dense(tmp_path):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from lumrec.optim.sharding import dense_kernel_sharding_plan, rowwise_adamw_sharder_for
    from test_optim import _batches, _loss, _coef, _make_ebc, KW as OPT_KW

    results = []
    for sparse in (False, True):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'pg_{sparse}'}", rank=0, world_size=1)
        try:
            module = _make_ebc()
            _apply_optimizer_in_backward(RowwiseAdamW, module.parameters(), dict(OPT_KW))
            sharder = rowwise_adamw_sharder_for(module)
            plan = ShardingPlan({"": dense_kernel_sharding_plan(module, 1, sharder, {"t2": "row_wise"})})
            dmp = DistributedModelParallel(module=module, device=torch.device("cpu"), plan=plan, sharders=[sharder])
            init = _make_ebc().state_dict()
            for key, sharded in dmp.state_dict().items():
                for sh in sharded.local_shards():
                    sh.tensor.detach().copy_(init[key])
            if sparse:
                assert sparse_dense_kernel_gradients(dmp) >= 1
            coef = _coef(1)
            for (kjt,) in _batches(1):
                _loss(dmp(kjt).to_dict(), coef).backward()
            results.append({k: v.local_shards()[0].tensor.detach().clone() for k, v in dmp.state_dict().items()})
        finally:
            dist.destroy_process_group()
    for key, value in results[0].items():
        assert torch.equal(results[1][key], value), key
        assert not torch.equal(value, _make_ebc().state_dict()[key]), "the tables did not train"
