"""Tables at any size: meta-built tables whose shards hold the CPU build's rows, sharded sequence
tables (EmbeddingCollection) with RowwiseAdamW under the planner's plan, the PyTorch DENSE-kernel
lookup against fbgemm's, and the table optimizer's device dispatch.

The 2-rank checks (2 ranks == 1 rank, sequence tables included) are the `seq` scenario of
tests/test_distributed.py; here everything runs in one process (a 1-rank gloo group).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

import lumrec.meta_tables as meta_tables
from lumrec.distributed import init_distributed, shard_model
from lumrec.meta_tables import MetaInitError, build_with_meta_tables, init_tape, tables_on_meta
from lumrec.optim import RowwiseAdamW, fused_params_for
from lumrec.optim.dense_lookup import TorchDenseLookup
from rank_spawn import without_rank_env


# ------------------------------------------------------------------- PyTorch DENSE-kernel lookup


@pytest.mark.parametrize("mode", [PoolingMode.SUM, PoolingMode.MEAN, PoolingMode.NONE])
def test_torch_dense_lookup_matches_fbgemm_on_random_shapes(mode):
    g = torch.Generator().manual_seed(int(mode))
    for _ in range(6):
        n_tables = int(torch.randint(1, 4, (1,), generator=g))
        dims = [4] * n_tables if mode == PoolingMode.NONE else torch.randint(1, 6, (n_tables,), generator=g).tolist()
        specs = [(int(torch.randint(1, 9, (1,), generator=g)), d) for d in dims]
        feature_tables = list(range(n_tables)) + torch.randint(0, n_tables, (2,), generator=g).tolist()
        ref = DenseTableBatchedEmbeddingBagsCodegen(specs, feature_table_map=feature_tables, pooling_mode=mode, use_cpu=True)
        mine = DenseTableBatchedEmbeddingBagsCodegen(specs, feature_table_map=feature_tables, pooling_mode=mode, use_cpu=True)
        mine.weights.data.copy_(ref.weights.data)
        mine.__class__ = TorchDenseLookup
        batch = int(torch.randint(1, 4, (1,), generator=g))
        lengths = torch.randint(0, 4, (len(feature_tables) * batch,), generator=g)
        lengths[0] = 0  # an empty bag
        ids = [torch.randint(0, specs[feature_tables[i // batch]][0], (int(n),), generator=g) for i, n in enumerate(lengths)]
        indices, offsets = torch.cat(ids), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        out = mine(indices, offsets)
        if mode == PoolingMode.NONE:  # fbgemm's CPU op pools here: the reference is a plain per-table lookup
            tables = ref.split_embedding_weights()
            feature = torch.repeat_interleave(torch.arange(len(feature_tables) * batch) // batch, lengths)
            expect = torch.stack([tables[feature_tables[f]][i] for f, i in zip(feature.tolist(), indices.tolist())])
        else:
            expect = ref(indices, offsets)
        torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
        if mode != PoolingMode.NONE:
            grad_out = torch.randn(out.shape, generator=g)
            (out * grad_out).sum().backward()
            (expect * grad_out).sum().backward()
            torch.testing.assert_close(mine.weights.grad, ref.weights.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ meta tables


def _tables_and_dense() -> nn.ModuleDict:
    torch.manual_seed(5)
    return nn.ModuleDict({
        "ebc": EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=1001, feature_names=["a"]),
            EmbeddingBagConfig(name="b", embedding_dim=3, num_embeddings=5, feature_names=["b"]),
        ]),
        "ec": EmbeddingCollection(tables=[EmbeddingConfig(name="s", embedding_dim=4, num_embeddings=377, feature_names=["x"])]),
        "after": nn.Linear(3, 3),
    })


def test_meta_tables_give_any_row_range_of_the_cpu_build(monkeypatch):
    monkeypatch.setattr(meta_tables, "_CHUNK", 1000)  # tables larger than a chunk: the streamed paths
    cpu = _tables_and_dense()
    with tables_on_meta():
        meta = _tables_and_dense()
    assert all(p.is_meta for n, p in meta.named_parameters() if not n.startswith("after"))
    assert torch.equal(meta["after"].weight, cpu["after"].weight), "the generator did not advance as on CPU"
    g = torch.Generator().manual_seed(0)
    for name, weight in cpu.named_parameters():
        if name.startswith("after"):
            continue
        tape, rows = init_tape(dict(meta.named_parameters())[name]), weight.shape[0]
        assert [op.name for op in tape.ops][-1] == "uniform_"
        for _ in range(4):
            r0 = int(torch.randint(0, rows, (1,), generator=g))
            r1 = int(torch.randint(r0, rows + 1, (1,), generator=g))
            assert torch.equal(tape.rows(r0, r1), weight[r0:r1]), (name, r0, r1)


def test_normal_draw_count_matches_cpu_for_large_tables(monkeypatch):
    # nn.EmbeddingBag's own normal_ init (overwritten by torchrec's uniform) only advances the generator.
    monkeypatch.setattr(meta_tables, "_CHUNK", 64)
    for rows in (50, 51):  # 400 and 408 elements, above the chunk: a multiple of 16 and not
        def build() -> torch.Tensor:
            torch.manual_seed(1)
            EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=rows, feature_names=["t"])])
            return torch.rand(3)

        with tables_on_meta():
            after_meta = build()
        assert torch.equal(after_meta, build()), rows


@pytest.mark.parametrize("rows", [9, 2003])  # 2003 x 4: above the patched chunk, numel % 16 != 0
def test_truncated_normal_tables_replay_per_row_range(monkeypatch, rows):
    from lumrec.modules.retrieval.sasrec import ItemInputArch

    monkeypatch.setattr(meta_tables, "_CHUNK", 1000)
    # Bounds at +-1 std: many elements are redrawn, over several rounds.
    monkeypatch.setattr("lumrec.modules.retrieval.sasrec.init_item_table",
                        lambda w: nn.init.trunc_normal_(w, mean=0.0, std=0.02, a=-0.02, b=0.02))

    def build() -> tuple[ItemInputArch, torch.Tensor]:
        torch.manual_seed(3)
        arch = ItemInputArch(rows, 4, 5, 0.0)  # its item table: torchrec's uniform init, then truncated normal
        return arch, torch.rand(3)

    cpu, after_cpu = build()
    with tables_on_meta():
        meta, after_meta = build()
    assert torch.equal(after_meta, after_cpu), "the generator did not advance as on CPU"
    weight = cpu.item_table.embedding_bags["item_id"].weight
    tape = init_tape(meta.item_table.embedding_bags["item_id"].weight)
    for r0, r1 in [(0, rows), (1, rows // 2), (rows // 2, rows), (rows - 3, rows), (rows - 5, rows - 4)]:
        assert torch.equal(tape.rows(r0, r1), weight[r0:r1]), (r0, r1)


def test_meta_tables_refuse_inits_they_cannot_replay():
    cfg = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["t"],
                              init_fn=nn.init.orthogonal_)]
    with pytest.raises(MetaInitError, match="did nothing on meta"), tables_on_meta():
        EmbeddingBagCollection(tables=cfg)  # the init_fn is torch's own orthogonal_, which returns early on meta
    with pytest.raises(MetaInitError, match="orthogonal_"), tables_on_meta():
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["t"])])
        nn.init.orthogonal_(ebc.embedding_bags["t"].weight)  # a later init through nn.init: refused by name
    assert EmbeddingBagCollection.__init__.__module__.startswith("torchrec")  # patches undone
    assert nn.init._no_grad_trunc_normal_.__module__ == "torch.nn.init"



def test_a_build_that_cannot_use_meta_tables_is_built_whole_from_the_same_random_state(caplog):
    """build_with_meta_tables: meta where it can; else the whole build again, its other parameters as on CPU."""
    def build(init=None):
        torch.manual_seed(3)
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["t"],
                                                                init_fn=init)])
        return ebc, nn.Linear(3, 2)

    on_meta, dense = build_with_meta_tables(build, "model ok")
    assert on_meta.embedding_bags["t"].weight.is_meta and torch.equal(dense.weight, build()[1].weight)
    with caplog.at_level("INFO", logger="lumrec.meta_tables"):
        whole, dense = build_with_meta_tables(lambda: build(nn.init.orthogonal_), "model odd")
    assert not whole.embedding_bags["t"].weight.is_meta and "model odd: embedding tables built whole" in caplog.text
    cpu_ebc, cpu_dense = build(nn.init.orthogonal_)
    assert torch.equal(whole.embedding_bags["t"].weight, cpu_ebc.embedding_bags["t"].weight)
    assert torch.equal(dense.weight, cpu_dense.weight)

# ------------------------------------------------------------------- sharded sequence tables


class SeqModel(nn.Module):
    """A pooled user table and an unpooled item-sequence table (mean over the sequence), MSE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.users = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10, feature_names=["user_id"])])
        self.items = EmbeddingCollection(tables=[EmbeddingConfig(name="t_hist", embedding_dim=4, num_embeddings=30, feature_names=["hist"])])
        self.head = nn.Linear(8, 1)

    def forward(self, batch: tuple[KeyedJaggedTensor, KeyedJaggedTensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        users, hist, target = batch
        u = self.users(users).to_dict()["user_id"]
        seq = self.items(hist)["hist"]
        lengths, device = seq.lengths().long(), seq.values().device
        sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=seq.values().shape[0])
        pooled = torch.zeros(lengths.numel(), 4, device=device).index_add(0, sample, seq.values()) / lengths.clamp(min=1).unsqueeze(1)
        pred = self.head(torch.cat([u, pooled], 1)).squeeze(-1)
        return nn.functional.mse_loss(pred, target), pred.detach()


def seq_batches(rank: int, world: int, global_b: int = 8, steps: int = 4) -> list[tuple[KeyedJaggedTensor, KeyedJaggedTensor, torch.Tensor]]:
    """This rank's slice of `steps` global batches; histories of 0..4 ids."""
    g = torch.Generator().manual_seed(3)
    lo, hi = rank * global_b // world, (rank + 1) * global_b // world
    out = []
    for _ in range(steps):
        user = torch.randint(0, 10, (global_b,), generator=g)
        lengths = torch.randint(0, 5, (global_b,), generator=g)
        hist = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
        target = torch.randn(global_b, generator=g)
        h0, h1 = int(lengths[:lo].sum()), int(lengths[:hi].sum())
        out.append((
            KeyedJaggedTensor.from_lengths_sync(["user_id"], user[lo:hi], torch.ones(hi - lo, dtype=torch.int32)),
            KeyedJaggedTensor.from_lengths_sync(["hist"], hist[h0:h1], lengths[lo:hi].int()),
            target[lo:hi],
        ))
    return out


def _plain_losses() -> list[float]:
    """SeqModel without torchrec sharding: RowwiseAdamW in backward on the tables, AdamW on the head."""
    from torch.distributed.optim import _apply_optimizer_in_backward

    model = SeqModel()
    kw = fused_params_for("cpu", lr=0.05)["optimizer_kwargs"]
    tables = [p for n, p in model.named_parameters() if not n.startswith("head")]
    _apply_optimizer_in_backward(RowwiseAdamW, tables, kw)
    opt = torch.optim.AdamW(model.head.parameters(), lr=0.05, betas=kw["betas"], eps=kw["eps"], weight_decay=0.0)
    return _train_losses(model, opt)


def _train_losses(model: nn.Module, opt: Any) -> list[float]:
    """The loss of each step over seq_batches(0, 1) (before its update)."""
    losses = []
    for batch in seq_batches(0, 1):
        loss = model(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_meta_built_sequence_tables_shard_with_the_planner_and_train_like_plain_pytorch():
    from lumrec.distributed import dense_optimizer

    cpu = SeqModel()
    with without_rank_env(), init_distributed() as ctx:
        with tables_on_meta():
            model = SeqModel()
        assert model.items.embeddings["t_hist"].weight.is_meta
        dmp = shard_model(model, ctx, fused_params_for("cpu", lr=0.05))
        assert dmp.lumrec_plan_source == "planner"
        assert set(dmp.plan.plan) == {"users", "items"}  # the sequence table is sharded, not replicated
        assert {ps.compute_kernel for mp in dmp.plan.plan.values() for ps in mp.values()} == {"dense"}
        assert len(dmp.lumrec_table_optimizers) == 2
        state = dmp.state_dict()
        for key, full in cpu.state_dict().items():
            got = state[key]
            if hasattr(got, "local_shards"):
                (shard,) = got.local_shards()
                (r0, _), (nr, _) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                assert torch.equal(shard.tensor, full[r0 : r0 + nr]), key
            else:
                assert torch.equal(got, full), key
        losses = _train_losses(dmp, dense_optimizer(dmp, lr=0.05))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_plain_losses()), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ optimizer dispatch


def test_table_optimizer_dispatch_by_device_and_fbgemm_build(monkeypatch):
    import lumrec.optim.factory as factory

    monkeypatch.setattr(factory, "fbgemm_has_cuda", lambda: True)
    assert "optimizer" in fused_params_for("cuda", lr=0.1)  # fbgemm's fused PARTIAL_ROWWISE_ADAM
    assert fused_params_for("cpu", lr=0.1)["optimizer_class"] is RowwiseAdamW  # CPU never fused
    monkeypatch.setattr(factory, "fbgemm_has_cuda", lambda: False)
    assert fused_params_for("cuda", lr=0.1)["optimizer_class"] is RowwiseAdamW  # CUDA tensors, RowwiseAdamW
    assert "optimizer" in fused_params_for("cuda", lr=0.1, fused=True)
    assert factory.fbgemm_has_cuda() is False or torch.cuda.is_available()


@pytest.mark.gpu
def test_rowwise_adamw_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g)
    grads = [torch.zeros(50, 8) for _ in range(4)]
    for grad in grads:
        rows = torch.randint(0, 50, (10,), generator=g)
        grad[rows] = torch.randn(10, 8, generator=g)
    kw = fused_params_for("cpu", lr=0.01, weight_decay=0.01)["optimizer_kwargs"]
    out = {}
    for device in ("cpu", "cuda"):
        p = nn.Parameter(weight.clone().to(device))
        opt = RowwiseAdamW([p], **kw)
        for grad in grads:
            p.grad = grad.to(device)
            opt.step()
        out[device] = p.detach().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_fused_cuda_table_optimizer_equals_rowwise_adamw():
    from lumrec.optim import fbgemm_has_cuda

    if not fbgemm_has_cuda():
        pytest.skip("fbgemm-gpu's CUDA build is not installed: CUDA tables run RowwiseAdamW (test above)")
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

    fp = fused_params_for("cuda", lr=0.01, weight_decay=0.01)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(50, 8, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)], pooling_mode=PoolingMode.SUM,
        **{k: v for k, v in fp.items()},
    )
    weight = tbe.split_embedding_weights()[0].detach().cpu().clone()
    ref = nn.Parameter(weight.clone())
    opt = RowwiseAdamW([ref], **fused_params_for("cpu", lr=0.01, weight_decay=0.01)["optimizer_kwargs"])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randperm(50, generator=g)[:6]  # one id per bag: pooled == looked-up row
        offsets = torch.arange(7)
        coef = torch.randn(6, 8, generator=g)
        (tbe(ids.cuda(), offsets.cuda()) * coef.cuda()).sum().backward()
        (nn.functional.embedding_bag(ids, ref, offsets[:-1], mode="sum") * coef).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(tbe.split_embedding_weights()[0].detach().cpu(), ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_meta_built_sequence_model_sharded_on_cuda_trains_like_plain_pytorch_on_cpu():
    """One nccl rank on the GPU: RowwiseAdamW tables (DENSE kernel; PyTorch lookup where fbgemm has no CUDA kernel)."""
    from lumrec.distributed import dense_optimizer

    with without_rank_env(), init_distributed("nccl") as ctx:
        with tables_on_meta():
            model = SeqModel()
        dmp = shard_model(model, ctx, fused_params_for(ctx.device, lr=0.05, fused=False))
        opt = dense_optimizer(dmp, lr=0.05)
        losses = []
        for users, hist, target in seq_batches(0, 1):
            loss = dmp((users.to(ctx.device), hist.to(ctx.device), target.to(ctx.device)))[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_plain_losses()), rtol=0, atol=1e-4)
