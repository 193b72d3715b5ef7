"""RowwiseAdamW against a float64 row-by-row reference, in backward on EBCs, and sharded under DMP."""

from __future__ import annotations

import inspect
import io
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import _apply_optimizer_in_backward

from lumrec.optim import EmbeddingOptimConfig, RowwiseAdamW, build_dense_optimizer, fused_params_for

# ------------------------------------------------------------------------------ reference


def reference_run(w0, grads, lr, betas, eps, wd, mode):
    """Apply the documented formula row by row in float64 Python loops; return weights per step.

    `grads` is a list (one per step) of lists of (row, [values]) with duplicates allowed.
    """
    rows, dim = len(w0), len(w0[0])
    w = [list(map(float, r)) for r in w0]
    m = [[0.0] * dim for _ in range(rows)]
    v = [0.0] * rows
    row_t = [0] * rows
    b1, b2 = betas
    history = []
    for step, pairs in enumerate(grads, start=1):
        summed: dict[int, list[float]] = {}
        for r, vals in pairs:
            acc = summed.setdefault(r, [0.0] * dim)
            for d in range(dim):
                acc[d] += vals[d]
        for r, g in summed.items():
            if all(x == 0.0 for x in g):
                continue  # a zero gradient row is not touched
            row_t[r] += 1
            t = row_t[r] if mode == "row" else step
            for d in range(dim):
                m[r][d] = b1 * m[r][d] + (1 - b1) * g[d]
            v[r] = b2 * v[r] + (1 - b2) * sum(x * x for x in g) / dim
            v_hat = v[r] / (1 - b2**t)
            for d in range(dim):
                m_hat = m[r][d] / (1 - b1**t)
                w[r][d] -= lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * w[r][d])
        history.append([row[:] for row in w])
    return history


def random_problem(seed, steps=6):
    """Random table and per-step sparse gradients with duplicate ids and long-untouched rows."""
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(6, 30, (1,), generator=g))
    dim = int(torch.randint(1, 9, (1,), generator=g))
    w0 = torch.randn(rows, dim, generator=g)
    grads = []
    for step in range(steps):
        # Early steps draw from the first half only, so the second half stays untouched for a while.
        hi = rows // 2 if step < steps // 2 else rows
        n = int(torch.randint(1, 2 * rows, (1,), generator=g))
        ids = torch.randint(0, hi, (n,), generator=g)
        ids[: min(3, n)] = ids[0]  # guaranteed duplicates
        vals = torch.randn(n, dim, generator=g)
        if step == 1:
            # One id present in the batch with an all-zero gradient: must count as untouched.
            ids = torch.cat([ids, torch.tensor([rows - 1])])
            vals = torch.cat([vals, torch.zeros(1, dim)])
        grads.append((ids, vals))
    return w0, grads


def as_grad(ids, vals, shape, kind):
    """The gradient an embedding lookup would produce: uncoalesced sparse COO, or dense."""
    sp = torch.sparse_coo_tensor(ids.unsqueeze(0), vals, shape)
    return sp if kind == "sparse" else sp.to_dense()


# ------------------------------------------------------------------------ formula / rows


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["global", "row"])
def test_matches_float64_reference_and_keeps_untouched_rows(seed, kind, wd, mode):
    lr, betas, eps = 0.03, (0.8, 0.95), 1e-6
    w0, grads = random_problem(seed)
    p = torch.nn.Parameter(w0.clone())
    opt = RowwiseAdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, bias_correction=mode)
    ref = reference_run(
        w0.double().tolist(),
        [list(zip(ids.tolist(), vals.double().tolist())) for ids, vals in grads],
        lr, betas, eps, wd, mode,
    )
    for step, (ids, vals) in enumerate(grads):
        before_w = p.detach().clone()
        st = opt.state.get(p, {})
        before_m = st["exp_avg"].clone() if st else torch.zeros_like(w0)
        before_v = st["exp_avg_sq_row"].clone() if st else torch.zeros(w0.shape[0])
        p.grad = as_grad(ids, vals, w0.shape, kind)
        opt.step()
        opt.zero_grad()
        touched = torch.zeros(w0.shape[0], dtype=torch.bool)
        dense_g = as_grad(ids, vals, w0.shape, "dense")
        touched[dense_g.ne(0).any(1)] = True
        st = opt.state[p]
        # Untouched rows: weight, first and second moment bit-identical.
        assert torch.equal(p.detach()[~touched], before_w[~touched])
        assert torch.equal(st["exp_avg"][~touched], before_m[~touched])
        assert torch.equal(st["exp_avg_sq_row"][~touched], before_v[~touched])
        assert touched.any() and not torch.equal(p.detach()[touched], before_w[touched])
        torch.testing.assert_close(p.detach().double(), torch.tensor(ref[step], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert st["exp_avg"].device.type == "cpu" and st["row_step"].dtype == torch.int64
    assert float(st["step"]) == len(grads)


def test_zero_gradient_id_in_sparse_batch_is_untouched():
    p = torch.nn.Parameter(torch.randn(4, 3))
    w0 = p.detach().clone()
    opt = RowwiseAdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2, 1]]), torch.tensor([[1.0, 0, 0], [0, 0, 0], [-1.0, 0, 0]]), (4, 3))
    opt.step()
    # Row 1's duplicates cancel and row 2 is zero: nothing may move, not even by weight decay.
    assert torch.equal(p.detach(), w0)
    assert int(opt.state[p]["row_step"].sum()) == 0


def test_dense_and_sparse_embedding_modules_train_alike():
    torch.manual_seed(3)
    dense = torch.nn.EmbeddingBag(25, 6, mode="sum", sparse=False)
    sparse = torch.nn.EmbeddingBag(25, 6, mode="sum", sparse=True)
    sparse.weight.data.copy_(dense.weight.data)
    init = dense.weight.detach().clone()
    opts = [RowwiseAdamW(m.parameters(), lr=0.05, weight_decay=0.01) for m in (dense, sparse)]
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        ids = torch.randint(0, 12, (20,), generator=g)
        offsets = torch.tensor([0, 5, 11, 11, 17])
        coef = torch.randn(5, 6, generator=g)
        for m, o in zip((dense, sparse), opts):
            (m(ids, offsets) * coef).sum().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(dense.weight, sparse.weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(dense.weight[12:], init[12:]) and torch.equal(sparse.weight[12:], init[12:])
    assert not torch.equal(dense.weight[:12], init[:12])


def test_flat_segments_equal_separate_tables():
    torch.manual_seed(5)
    a, b = torch.randn(7, 3), torch.randn(5, 4)
    flat = torch.nn.Parameter(torch.cat([torch.zeros(2), a.flatten(), b.flatten()]))
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    kw = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.02)
    opt_flat = RowwiseAdamW([flat], segments=[(2, 7, 3), (23, 5, 4)], **kw)
    opt_ab = RowwiseAdamW([pa, pb], **kw)
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        ga, gb = torch.randn(7, 3, generator=g), torch.randn(5, 4, generator=g)
        ga[torch.randint(0, 7, (3,), generator=g)] = 0
        flat.grad = torch.cat([torch.zeros(2), ga.flatten(), gb.flatten()])
        pa.grad, pb.grad = ga, gb
        opt_flat.step()
        opt_ab.step()
    assert torch.equal(flat.detach()[:2], torch.zeros(2))
    torch.testing.assert_close(flat.detach()[2:23].view(7, 3), pa.detach(), rtol=0, atol=0)
    torch.testing.assert_close(flat.detach()[23:].view(5, 4), pb.detach(), rtol=0, atol=0)


def test_bad_layouts_and_settings_raise():
    with pytest.raises(ValueError, match="2-D"):
        RowwiseAdamW([torch.nn.Parameter(torch.zeros(10))])
    with pytest.raises(ValueError, match="does not fit"):
        RowwiseAdamW([torch.nn.Parameter(torch.zeros(10))], segments=[(4, 2, 4)])
    with pytest.raises(ValueError, match="bias_correction"):
        RowwiseAdamW([torch.nn.Parameter(torch.zeros(2, 2))], bias_correction="per_step")
    with pytest.raises(ValueError, match="betas"):
        RowwiseAdamW([torch.nn.Parameter(torch.zeros(2, 2))], betas=(0.9, 1.0))


# ---------------------------------------------------------------------------- checkpoints


def _train(p, opt, grads):
    for ids, vals in grads:
        p.grad = as_grad(ids, vals, p.shape, "sparse")
        opt.step()


@pytest.mark.parametrize("mode", ["global", "row"])
def test_state_dict_round_trip_resumes_same_trajectory(mode):
    w0, grads = random_problem(7, steps=8)
    kw = dict(lr=0.02, weight_decay=0.01, bias_correction=mode)
    p_full = torch.nn.Parameter(w0.clone())
    _train(p_full, RowwiseAdamW([p_full], **kw), grads)

    p1 = torch.nn.Parameter(w0.clone())
    opt1 = RowwiseAdamW([p1], **kw)
    _train(p1, opt1, grads[:4])
    buf = io.BytesIO()
    torch.save({"w": p1.detach(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    p2 = torch.nn.Parameter(ckpt["w"].clone())
    opt2 = RowwiseAdamW([p2], lr=1.0, bias_correction=mode)  # hyper-parameters come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    st = opt2.state[p2]
    assert st["row_step"].dtype == torch.int64 and st["exp_avg"].dtype == torch.float32
    assert opt2.param_groups[0]["lr"] == kw["lr"]
    _train(p2, opt2, grads[4:])
    assert torch.equal(p2.detach(), p_full.detach())


def test_bf16_weight_keeps_fp32_state_through_checkpoint():
    p = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    opt = RowwiseAdamW([p], lr=0.01)
    p.grad = torch.randn(6, 4).to(torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    opt2 = RowwiseAdamW([p], lr=0.01)
    opt2.load_state_dict(sd)
    for key in ("exp_avg", "exp_avg_sq_row"):
        assert opt2.state[p][key].dtype == torch.float32
        assert torch.equal(opt2.state[p][key], sd["state"][0][key])


# ------------------------------------------------------------------------------- factory


def test_fused_params_for_cuda_maps_onto_fbgemm_partial_rowwise_adam():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen,
        WeightDecayMode,
    )

    fp = fused_params_for(torch.device("cuda"), 0.01, (0.8, 0.95), 1e-7, 0.02, fused=True)  # as with fbgemm's CUDA build
    assert fp == {
        "optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM,
        "learning_rate": 0.01,
        "beta1": 0.8,
        "beta2": 0.95,
        "eps": 1e-7,
        "weight_decay": 0.02,
        "weight_decay_mode": WeightDecayMode.DECOUPLE,
    }
    # Every key must be a constructor argument of the fbgemm TBE torchrec builds from fused_params.
    accepted = set(inspect.signature(SplitTableBatchedEmbeddingBagsCodegen.__init__).parameters)
    assert set(fp) <= accepted


def test_fused_params_for_cpu_builds_our_optimizer():
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    fp = fused_params_for("cpu", 0.01, (0.8, 0.95), 1e-7, 0.02)
    assert fp["optimizer_class"] is RowwiseAdamW
    assert fp["compute_kernel"] == EmbeddingComputeKernel.DENSE.value
    opt = fp["optimizer_class"]([torch.nn.Parameter(torch.zeros(3, 2))], **fp["optimizer_kwargs"])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (0.01, (0.8, 0.95), 1e-7, 0.02)
    with pytest.raises(ValueError, match="betas"):
        fused_params_for("cpu", 0.01, (0.8, 1.5))


def test_build_dense_optimizer():
    cfg = EmbeddingOptimConfig(lr=0.003, beta1=0.85, weight_decay=0.1)
    lin = torch.nn.Linear(3, 2)
    opt = build_dense_optimizer(lin.parameters(), cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.003, (0.85, 0.999), 0.1)


# ------------------------------------------------------------------- torchrec integration

FEATS = ["f1", "f3", "f2", "f4"]
DIMS = {"f1": 8, "f3": 8, "f2": 4, "f4": 8}
ROWS = {"f1": 20, "f3": 20, "f2": 30, "f4": 12}
KW = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
BATCH, STEPS = 3, 4


def _tables():
    from torchrec import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=20, feature_names=["f1", "f3"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=30, feature_names=["f2"]),
        EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=12, feature_names=["f4"]),
    ]


def _make_ebc():
    from torchrec import EmbeddingBagCollection

    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=_tables(), device=torch.device("cpu"))


def _batches(world):
    """STEPS x world local KJTs; ids stay in the lower half of each table so rows stay untouched."""
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        per_rank = []
        for _ in range(world):
            lengths, values = [], []
            for f in FEATS:
                ln = torch.randint(0, 4, (BATCH,), generator=g)
                lengths.append(ln)
                values.append(torch.randint(0, ROWS[f] // 2, (int(ln.sum()),), generator=g))
            per_rank.append(
                KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=torch.cat(values), lengths=torch.cat(lengths))
            )
        out.append(per_rank)
    return out


def _global_batch(kjts):
    """The local batches of all ranks as one batch (rank 0's samples first), as DMP sees them together."""
    from torchrec import KeyedJaggedTensor

    lengths, values = [], []
    for f in FEATS:
        for k in kjts:
            lengths.append(k[f].lengths())
            values.append(k[f].values())
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=torch.cat(values), lengths=torch.cat(lengths))


def _coef(world):
    return torch.randn(world * BATCH, sum(DIMS.values()), generator=torch.Generator().manual_seed(11))


def _loss(pooled, coef):
    """Weighted sum of pooled embeddings, by feature name (sharded output orders keys differently)."""
    total, col = 0, 0
    for f in FEATS:
        total = total + (pooled[f] * coef[:, col : col + DIMS[f]]).sum()
        col += DIMS[f]
    return total


def _unsharded_reference(world):
    ebc = _make_ebc()
    _apply_optimizer_in_backward(RowwiseAdamW, ebc.parameters(), KW)
    coef = _coef(world)
    for per_rank in _batches(world):
        _loss(ebc(_global_batch(per_rank)).to_dict(), coef).backward()
    return {k: v.detach().clone() for k, v in ebc.state_dict().items()}


def _ec_tables():
    from torchrec import EmbeddingConfig

    return [
        EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=20, feature_names=["f1", "f3"]),
        EmbeddingConfig(name="t2", embedding_dim=4, num_embeddings=30, feature_names=["f2"]),
        EmbeddingConfig(name="t3", embedding_dim=4, num_embeddings=12, feature_names=["f4"]),
    ]


def _make_module(kind):
    from torchrec import EmbeddingCollection

    if kind == "ebc":
        return _make_ebc()
    torch.manual_seed(0)
    return EmbeddingCollection(tables=_ec_tables(), device=torch.device("cpu"))


def _module_loss(kind, out, coef):
    if kind == "ebc":
        return _loss(out.to_dict(), coef)
    # Unpooled (sequence) output: squared values make each row's gradient depend on the row.
    w = coef[0, :4]
    return sum((jt.values().square() * w).sum() for jt in out.values())


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_apply_optimizer_in_backward_on_unsharded_module_equals_explicit_step(kind):
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    in_bwd, explicit = _make_module(kind), _make_module(kind)
    with pytest.warns(DeprecationWarning):  # torchrec's wrapper forwards to torch's private API
        apply_optimizer_in_backward(RowwiseAdamW, in_bwd.parameters(), dict(KW))
    opt = RowwiseAdamW(explicit.parameters(), **KW)
    init = {k: v.clone() for k, v in explicit.state_dict().items()}
    coef = _coef(1)
    for (kjt,) in _batches(1):
        _module_loss(kind, in_bwd(kjt), coef).backward()
        _module_loss(kind, explicit(kjt), coef).backward()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in in_bwd.parameters())
    for k, v in explicit.state_dict().items():
        assert torch.equal(in_bwd.state_dict()[k], v), k
        rows = v.shape[0]
        assert torch.equal(v[rows // 2 :], init[k][rows // 2 :]), "never-looked-up rows moved"
        assert not torch.equal(v, init[k])


def test_sharder_helper_gives_each_collection_its_sharder():
    from lumrec.optim.sharding import RowwiseAdamWEmbeddingCollectionSharder, rowwise_adamw_sharder_for

    # Sharded sequence tables are checked against unsharded ones in tests/test_sharding_scale.py.
    assert isinstance(rowwise_adamw_sharder_for(_make_module("ec")), RowwiseAdamWEmbeddingCollectionSharder)
    with pytest.raises(ValueError, match="EmbeddingBagCollection or EmbeddingCollection"):
        rowwise_adamw_sharder_for(torch.nn.Linear(2, 2))


def _run_sharded(rank, world, init_file, out_dir, preapply=True):
    """One rank: shard the EBC with the DENSE kernel + RowwiseAdamW in backward, train, save shards.

    preapply: the kwargs come from apply_optimizer_in_backward on the unsharded tables; otherwise
    from the sharder's own optimizer_kwargs.
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from lumrec.optim.sharding import dense_kernel_sharding_plan, rowwise_adamw_sharder_for

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        init = _make_ebc().state_dict()
        module = _make_ebc()
        if preapply:
            _apply_optimizer_in_backward(RowwiseAdamW, module.parameters(), dict(KW))
        sharder = rowwise_adamw_sharder_for(module, None if preapply else dict(KW))
        plan = ShardingPlan({"": dense_kernel_sharding_plan(module, world, sharder, {"t2": "row_wise"})})
        dmp = DistributedModelParallel(module=module, device=torch.device("cpu"), plan=plan, sharders=[sharder])
        assert sharder.attached_optimizers, "no DENSE kernel got RowwiseAdamW"
        # DMP initialises shards on its own; start them from the same weights as the reference.
        for key, sharded in dmp.state_dict().items():
            full = init[key]
            for sh in sharded.local_shards():
                (r0, c0), (nr, nc) = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                sh.tensor.detach().copy_(full[r0 : r0 + nr, c0 : c0 + nc])
        coef = _coef(world)[rank * BATCH : (rank + 1) * BATCH]
        for per_rank in _batches(world):
            _loss(dmp(per_rank[rank]).to_dict(), coef).backward()
        shards = {
            key: [(list(sh.metadata.shard_offsets), sh.tensor.detach().clone()) for sh in sharded.local_shards()]
            for key, sharded in dmp.state_dict().items()
        }
        torch.save(shards, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _compare_with_reference(world, out_dir):
    ref = _unsharded_reference(world)
    seen_rows = {k: 0 for k in ref}
    for rank in range(world):
        for key, shards in torch.load(os.path.join(out_dir, f"rank{rank}.pt")).items():
            for (r0, c0), t in shards:
                expected = ref[key][r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]]
                # Sharded pooling sums in another order: allow float32 rounding, nothing more.
                torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6)
                seen_rows[key] += t.shape[0]
    assert seen_rows == {k: v.shape[0] for k, v in ref.items()}


def test_dmp_sharded_one_process_matches_unsharded(tmp_path):
    # Kwargs given to the sharder here (no apply_optimizer_in_backward before DMP).
    _run_sharded(0, 1, str(tmp_path / "pg_init"), str(tmp_path), preapply=False)
    _compare_with_reference(1, str(tmp_path))


def test_dmp_sharded_two_processes_matches_unsharded(tmp_path):
    # spawn, not fork: after other tests the parent holds thread pools and gloo state that a
    # forked child can deadlock on (seen in the full suite); spawned ranks start clean.
    ctx = mp.start_processes(
        _run_sharded,
        args=(2, str(tmp_path / "pg_init"), str(tmp_path), True),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            pytest.fail("2-process DMP run did not finish in 120 s")
    _compare_with_reference(2, str(tmp_path))


def test_stock_sharder_rejects_our_optimizer_class(tmp_path):
    """Documents why our sharder exists: torchrec cannot map RowwiseAdamW to an fbgemm type."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_init'}", rank=0, world_size=1)
    try:
        ebc = _make_ebc()
        _apply_optimizer_in_backward(RowwiseAdamW, ebc.parameters(), dict(KW))
        sharder = EmbeddingBagCollectionSharder()
        per_table = {n: table_wise(rank=0, compute_kernel="dense") for n in ("t1", "t2", "t3")}
        plan = construct_module_sharding_plan(ebc, per_table, sharder=sharder, local_size=1, world_size=1, device_type="cpu")
        with pytest.raises(ValueError, match="EmbOptimType"):
            DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), sharders=[sharder])
    finally:
        dist.destroy_process_group()
