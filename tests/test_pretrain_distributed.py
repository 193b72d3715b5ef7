"""Sharded pre-training: 2 gloo ranks train like 1 process, resume exactly, and write checkpoints one process reads.

One module-scoped fixture spawns the two ranks once (torch + torchrec imports cost seconds per
process) and runs every 2-rank scenario through `Pretrainer` exactly as torchrun would (env
vars -> process group -> DistributedModelParallel); the 1-rank references run in this process
through the plain, unsharded path. Dropout and stochastic length are off: they draw per rank,
so only then do 1 and 2 ranks compute the same function.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.state_dict import get_state_dict

from lumrec.checkpoint import CheckpointManager, load_model_weights
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.distributed import plan_summary
from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss
from lumrec.pipelines import pretrain as pretrain_module
from lumrec.pipelines.pretrain import DataConfig, PretrainConfig, Pretrainer, TrainConfig
from rank_spawn import become_rank, free_port, fused_tables, join_ranks, spawn_ranks, without_rank_env  # tests/rank_spawn.py, shared by the multi-rank tests

# 1 and 2 ranks differ only in float32 summation order (pooling, gradient averaging, the loss
# rescale). Measured here: per-step losses (~10) <= 2e-6 apart, weights <= 3e-8 (but see the key
# bias below), AdamW / RowwiseAdamW moments <= 4e-6 relative. 1e-5 still catches the errors that
# matter: without the loss rescale, or with in-batch negatives left local, losses move by >1e-2.
ATOL = 1e-5

_LUM = {"d_model": 8, "num_layers": 1, "num_heads": 2, "ffn_dim": 16}
_LUM_DATA = dict(condition_features=["scenario", "category_id"], item_features=["item_id", "category_id"])
_HSTU = {"num_layers": 1, "input_dropout": 0.0, "hstu": {"d_model": 8, "num_heads": 2, "dqk": 4, "dv": 4, "dropout": 0.0}}
_SASREC = {"d_model": 8, "num_blocks": 1, "num_heads": 2, "dropout": 0.0}

# name -> (model, data options, model_config, train options, max_steps (None: the whole epoch))
SCENARIOS: dict[str, tuple[str, dict, dict, dict, int | None]] = {
    # Several tables spread over both ranks; in-batch (gathered over ranks) + shared sampled
    # negatives; a whole epoch, so validation, early-stopping bookkeeping and the test run too.
    # 3 rows per global batch: the ranks get 1 and 2 rows, so unequal query counts (the loss rescale).
    "lum": ("lum", _LUM_DATA, _LUM, dict(rows_per_batch=3), None),
    # Sampled negatives only: one shared lookup of positives and negatives per rank. A time budget
    # with a time-based lr decay runs rank 0's clock broadcast (an hour: the lr factor stays 1).
    "lum_sampled": ("lum", _LUM_DATA, _LUM, dict(in_batch_negatives=False, max_minutes=60.0, lr_decay_fraction=0.5), 4),
    # Full softmax; HSTU's one table sits on rank 0 (TABLE_WISE), so rank 1 holds no table at all.
    "hstu": ("hstu", {}, _HSTU, dict(num_negatives=-1), 4),
    # One packed row per global batch: rank 0's slice is always empty; it runs a one-token stand-in.
    "lum_empty_slice": ("lum", _LUM_DATA, _LUM, dict(rows_per_batch=1), 3),
    # The LUM scenarios above leave the pooled tables to the planner's free choice (row-wise here);
    # these force them row-wise over both ranks (ROW_WISE), whose pooled output needs one lookup
    # size on every rank: the ranks' token counts differ (3 rows: 1 and 2) and so do their
    # candidates (own targets beside the shared sampled negatives), padded with empty bags
    # (modules/layers/equal_lookups.py).
    "lum_row_wise": ("lum", _LUM_DATA, _LUM, dict(rows_per_batch=3), 4),
    "hstu_row_wise": ("hstu", {}, _HSTU, dict(rows_per_batch=3, in_batch_negatives=False), 4),
    "sasrec_row_wise": ("sasrec", {}, _SASREC, dict(rows_per_batch=3), 4),
}
ROW_WISE = {"lum_row_wise", "hstu_row_wise", "sasrec_row_wise"}
TABLE_WISE = {"hstu"}
RESUME_AT = 3  # the interrupted 2-rank "lum" run stops here, then resumes to the end of the epoch


def _config(data: str, out: str | Path, name: str, **train: Any) -> PretrainConfig:
    model, data_opts, model_config, train_opts, _ = SCENARIOS[name]
    options = dict(epochs=1, rows_per_batch=4, num_negatives=16, checkpoint_every_steps=100, log_every_steps=2,
                   eval_rows_per_batch=16, threads=1)
    options.update(train_opts)
    options.update(train)
    return PretrainConfig(model=model, out=str(out), data=DataConfig(path=data, max_len=24, **data_opts),
                          train=TrainConfig(**options), model_config=dict(model_config))


# InfoNCE alone on a plain item table: 6 queries split over the ranks as [:cut] and [cut:].
LOSS_CASES = {
    "full_softmax": InfoNCEConfig(num_sampled_negatives=-1),
    "sampled_only": InfoNCEConfig(num_sampled_negatives=5, in_batch_negatives=False),
    "in_batch_and_sampled": InfoNCEConfig(num_sampled_negatives=3),
}
LOSS_CUTS = (4, 6)  # 6: rank 1 has no query and must still join the collectives


def _loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(12, 8, generator=g), torch.randn(6, 8, generator=g), torch.randint(1, 12, (6,), generator=g)


def _loss_on(config: InfoNCEConfig, rows: slice, group: Any) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean loss over the queries `rows`, d loss / d table, d loss / d queries) with the negatives seeded alike everywhere."""
    table, queries, targets = _loss_inputs()
    table.requires_grad_()
    q = queries[rows].clone().requires_grad_()
    loss = InfoNCELoss(config, 12, process_group=group)(q, targets[rows], table.__getitem__, torch.Generator().manual_seed(3))
    loss.backward()
    return float(loss), table.grad, q.grad


def _record_losses(trainer: Pretrainer) -> list[float]:
    """The global mean loss of every step `trainer` takes from now on."""
    losses: list[float] = []
    step = trainer.train_step

    def recorded(batch):
        out = step(batch)
        losses.append(out[0])
        return out

    trainer.train_step = recorded
    return losses


def _train(data: str, out: str | Path, name: str, max_steps: int | None = None, **train: Any) -> tuple[Pretrainer, dict[str, Any]]:
    trainer = Pretrainer(_config(data, out, name, **train))
    losses = _record_losses(trainer)
    result = trainer.run(max_steps=max_steps)
    return trainer, {"losses": losses, "result": result, "step": trainer.state.step}


# ------------------------------------------------------------------------------- the ranks


def _rank_main(rank: int, world: int, port: int, data: str, out: str, one_rank_checkpoint: str) -> None:
    """One spawned rank: torchrun's env vars, then every scenario, the interrupted + resumed run, and a
    start from a 1-process checkpoint saved straight back (step 0)."""
    become_rank(rank, world, port)
    results: dict[str, Any] = {}
    try:
        for i, (name, (*_, max_steps)) in enumerate(SCENARIOS.items()):
            # This process only; the planner's free choice (None) elsewhere.
            Pretrainer.pooled_sharding_types = ("row_wise",) if name in ROW_WISE else ("table_wise",) if name in TABLE_WISE else None
            try:
                trainer, results[name] = _train(data, Path(out) / name, name, max_steps)
            finally:
                Pretrainer.pooled_sharding_types = None
            results[name]["plan"] = plan_summary(trainer.dmp.plan)
            # The first Pretrainer joins the ranks from the env vars; later ones reuse its group.
            assert trainer.dmp is not None and trainer.ctx.world_size == world and trainer.ctx.owns_process_group == (i == 0)
        for case, config in LOSS_CASES.items():
            for cut in LOSS_CUTS:
                results[f"loss/{case}/{cut}"] = _loss_on(config, slice(0, cut) if rank == 0 else slice(cut, 6), dist.group.WORLD)
        _, results["lum_first"] = _train(data, Path(out) / "lum_resumed", "lum", RESUME_AT)
        _, results["lum_resumed"] = _train(data, Path(out) / "lum_resumed", "lum")
        # Tables on fbgemm's fused kernels (as on CUDA with its CUDA build): checkpoints hold the fused
        # optimizer's state, so an interrupted run resumes exactly. The CPU fused kernel has no Adam:
        # EXACT_ROWWISE_ADAGRAD stands in for PARTIAL_ROWWISE_ADAM.
        with fused_tables(pretrain_module):
            trainer, results["lum_fused"] = _train(data, Path(out) / "lum_fused", "lum")
            results["lum_fused"]["plan"] = plan_summary(trainer.dmp.plan)
            _, results["lum_fused_first"] = _train(data, Path(out) / "lum_fused_resumed", "lum", RESUME_AT)
            _, results["lum_fused_resumed"] = _train(data, Path(out) / "lum_fused_resumed", "lum")
        started = Pretrainer(_config(data, Path(out) / "from_one", "lum", init_from=one_rank_checkpoint))
        started.maybe_resume()
        started.save()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(results, Path(out) / f"results_rank{rank}.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("synth") / "data"
    generate(path, SynthConfig(num_users=60, num_items=40, num_categories=4, num_queries=6, num_days=3))
    return str(path)


@pytest.fixture(scope="module")
def two_ranks(data, one_rank, tmp_path_factory) -> tuple[Path, list[dict[str, Any]], float]:
    """Every scenario on 2 spawned gloo ranks: (output folder, each rank's results, wall seconds)."""
    out = tmp_path_factory.mktemp("pretrain2")
    source = str(_final_checkpoint(one_rank[0] / "lum"))
    start = time.monotonic()
    join_ranks(spawn_ranks(_rank_main, (2, free_port(), data, str(out), source)), start, 300, "2-rank pre-training")
    return out, [torch.load(out / f"results_rank{r}.pt") for r in range(2)], time.monotonic() - start


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory) -> tuple[Path, dict[str, tuple[Pretrainer, dict[str, Any]]]]:
    """The same scenarios in this process (no env vars: the plain path)."""
    out = tmp_path_factory.mktemp("pretrain1")
    threads = torch.get_num_threads()
    try:
        with without_rank_env():
            runs = {name: _train(data, out / name, name, max_steps) for name, (*_, max_steps) in SCENARIOS.items()}
    finally:
        torch.set_num_threads(threads)
    assert all(trainer.dmp is None for trainer, _ in runs.values()) and not dist.is_initialized()
    return out, runs


def _final_checkpoint(out: Path) -> Path:
    manager = CheckpointManager(out / "checkpoints")
    return manager.step_dir(manager.latest())


def _unsharded_weights(trainer: Pretrainer, step_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model read into a plain copy of the 1-rank model (DCP reshards a 2-rank one)."""
    model = copy.deepcopy(trainer.model)
    load_model_weights(step_dir, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_rank_per_step_loss(two_ranks, one_rank, name):
    _, (r0, r1), _ = two_ranks
    _, runs = one_rank
    one = runs[name][1]
    assert r0[name]["losses"] == r1[name]["losses"], "ranks disagree on the all-reduced loss"
    assert r0[name]["step"] == one["step"] == len(one["losses"]) > 1
    torch.testing.assert_close(torch.tensor(r0[name]["losses"]), torch.tensor(one["losses"]), rtol=0, atol=ATOL,
                               msg=lambda m: f"{m}\n2 ranks {r0[name]['losses']}\n1 rank  {one['losses']}")


def test_pooled_tables_row_wise_where_forced_and_planned_freely_elsewhere(two_ranks):
    """ROW_WISE scenarios split every pooled table over both ranks, TABLE_WISE ones keep each whole; the others take the planner's plan."""
    _, (r0, r1), _ = two_ranks
    for name in SCENARIOS:
        plan = r0[name]["plan"]
        assert plan == r1[name]["plan"] and plan, name
        pooled = [line for line in plan if ".embedding_bag_collection." in line or ".item_table." in line]
        assert len(pooled) == len(plan), plan  # pre-training models hold pooled tables only
        if name in ROW_WISE:
            assert all(": row_wise " in line and line.endswith("ranks=[0, 1]") for line in pooled), plan
        elif name in TABLE_WISE:
            assert all(": table_wise " in line and line.endswith(("ranks=[0]", "ranks=[1]")) for line in pooled), plan
        else:
            assert all(": table_wise " in line or ": row_wise " in line for line in pooled), plan


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_rank_checkpoint_loads_unsharded_and_matches_one_rank_weights(two_ranks, one_rank, name):
    out2, _, _ = two_ranks
    _, runs = one_rank
    trainer, _ = runs[name]
    step_dir = _final_checkpoint(out2 / name)
    assert CheckpointManager(step_dir.parent).verify(int(step_dir.name.split("-")[1])).world_size == 2
    assert not dist.is_initialized()  # a plain process: DCP reads the sharded checkpoint without a process group
    loaded = _unsharded_weights(trainer, step_dir)
    fresh = Pretrainer(_config(trainer.cfg.data.path, step_dir.parent.parent / "fresh", name)).model.state_dict()
    trained = trainer.model.state_dict()
    assert loaded.keys() == trained.keys()
    steps = trainer.state.step
    for key, value in trained.items():
        _assert_weight_close(key, loaded[key], value, trainer.cfg.train.lr * steps, rtol=0)
    moved = [k for k in trained if not torch.equal(trained[k], fresh[k])]
    assert any(".embedding_bags." in k for k in moved) and len(moved) > len(trained) // 2, "training changed too little to compare"


def test_init_from_two_rank_checkpoint_restores_one_process_optimizer_state(two_ranks, one_rank, data, tmp_path):
    """`train.init_from` reads a 2-rank checkpoint into one process: weights and RowwiseAdamW / AdamW moments."""
    out2, _, _ = two_ranks
    _, runs = one_rank
    reference, _ = runs["lum"]
    step_dir = _final_checkpoint(out2 / "lum")
    started = Pretrainer(_config(data, tmp_path / "init", "lum", init_from=str(step_dir)))
    assert not started.maybe_resume()  # a fresh run, initialised from the source
    mine = get_state_dict(started.model, started.optimizers)
    ref = get_state_dict(reference.model, reference.optimizers)
    for part, (got, want) in enumerate(zip(mine, ref)):
        flat_got, flat_want = _flatten(got), _flatten(want)
        assert flat_got.keys() == flat_want.keys()
        for key, value in flat_want.items():
            if isinstance(value, torch.Tensor) and not value.is_floating_point() or key.endswith(".step"):
                assert torch.equal(torch.as_tensor(flat_got[key]), torch.as_tensor(value)), key  # step counts: exact
            elif isinstance(value, torch.Tensor):
                _assert_weight_close(key, flat_got[key], value, reference.cfg.train.lr * reference.state.step, rtol=1e-3)
    tables = [k for k in _flatten(mine[1]) if ".embedding_bags." in k and k.endswith(".exp_avg_sq_row")]
    # t_scenario, t_item_id and t_category_id (shared by the condition and the item key): spread over both ranks.
    assert len(tables) == 3 and all(bool((_flatten(mine[1])[k] > 0).any()) for k in tables)
    lrs = [g["lr"] for opt in started.optimizers for g in opt.param_groups]
    assert lrs == [started.cfg.train.lr, started.cfg.train.lr]  # this run's lrs, not the source's


def _assert_weight_close(key: str, got: torch.Tensor, want: torch.Tensor, adamw_bound: float, rtol: float) -> None:
    """1 and 2 ranks agree to ATOL, except the attention key bias, which only stays within AdamW's step bound."""
    if key.endswith(".kv_proj.bias"):  # SASRec: rows k, v (modules/retrieval/sasrec.py); the same argument as below
        want, got = want.view(2, -1), got.view(2, -1)
        gap = float((got[0] - want[0]).abs().max())
        assert gap <= adamw_bound, f"{key} (key part): {gap}"
        want, got = want[1], got[1]
    elif key.endswith(".qkv.bias") or ".qkv.bias." in key:
        # The key bias has no gradient in exact arithmetic (softmax ignores a shift shared by a
        # query's logits), so both runs train it on float32 noise, which AdamW normalises into
        # steps of up to lr: only that bound holds (measured 5e-6 to 1.2e-5; the q and v parts 1e-9).
        # Its AdamW moments are that noise itself, so they are not compared.
        want, got = want.view(3, -1), got.view(3, -1)  # rows: q, k, v (lumrec.modules.layers.transformer)
        if key.endswith(".qkv.bias"):
            gap = float((got[1] - want[1]).abs().max())
            assert gap <= adamw_bound, f"{key} (key part): {gap}"
        want, got = want[0::2], got[0::2]
    torch.testing.assert_close(got, want, rtol=rtol, atol=ATOL, msg=lambda m: f"{key}: {m}")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted key: leaf}; the optimizer's param_groups lists are left out (hyper-parameters)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif key != "param_groups":
            out[name] = value
    return out


def test_one_process_checkpoint_round_trips_through_two_ranks_exactly(two_ranks, one_rank, data, tmp_path):
    """1-process checkpoint -> `init_from` on 2 ranks (resharded) -> saved by 2 ranks -> read by one process: unchanged."""
    out2, _, _ = two_ranks
    _, runs = one_rank
    reference, _ = runs["lum"]
    step_dir = _final_checkpoint(out2 / "from_one")
    assert step_dir.name == "step-00000000"
    back = Pretrainer(_config(data, tmp_path / "back", "lum", init_from=str(step_dir)))
    back.maybe_resume()
    got, want = (_flatten(get_state_dict(t.model, t.optimizers)[1]) for t in (back, reference))
    got.update(_flatten(back.model.state_dict()))
    want.update(_flatten(reference.model.state_dict()))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), key


@pytest.mark.parametrize("cut", LOSS_CUTS)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_collective_infonce_on_two_ranks_equals_one_process(two_ranks, case, cut):
    """Each rank's mean over its queries, weighted by its share of them, is the 1-process loss; so are the gradients."""
    _, ranks, _ = two_ranks
    (loss0, table0, q0), (loss1, table1, q1) = (r[f"loss/{case}/{cut}"] for r in ranks)
    loss, table, queries = _loss_on(LOSS_CASES[case], slice(0, 6), None)
    w0, w1 = cut / 6, (6 - cut) / 6
    assert q1.shape[0] == 6 - cut and (cut < 6 or loss1 == 0.0)
    assert loss0 * w0 + loss1 * w1 == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(table0 * w0 + table1 * w1, table, rtol=0, atol=1e-6)  # float32 rounding: <= 1.5e-7 seen
    torch.testing.assert_close(torch.cat([q0 * w0, q1 * w1]), queries, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", ["dense", "fused"])
def test_resumed_two_rank_run_equals_uninterrupted_one(two_ranks, one_rank, kernel):
    """Interrupted at RESUME_AT and resumed: the same losses, weights, history and test as the straight run, with the
    tables on RowwiseAdamW's DENSE kernels, or on a fused fbgemm kernel (the checkpoint holds the fused optimizer's state)."""
    out2, (r0, r1), _ = two_ranks
    _, runs = one_rank
    name = "lum" if kernel == "dense" else "lum_fused"
    first, resumed, straight = r0[f"{name}_first"], r0[f"{name}_resumed"], r0[name]
    assert straight["plan"] and all(f"kernel={kernel} " in line for line in straight["plan"]), straight["plan"]
    assert first["result"] == {"step": RESUME_AT, "stopped": "max_steps"}
    assert resumed["step"] == straight["step"] > RESUME_AT
    assert first["losses"] + resumed["losses"] == straight["losses"]
    assert r1[f"{name}_resumed"]["losses"] == straight["losses"][RESUME_AT:]
    trainer, _ = runs["lum"]
    a = _unsharded_weights(trainer, _final_checkpoint(out2 / name))
    b = _unsharded_weights(trainer, _final_checkpoint(out2 / f"{name}_resumed"))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert resumed["result"]["test"] == straight["result"]["test"]
    assert resumed["result"]["history"] == straight["result"]["history"]


def test_rank0_writes_results_and_every_rank_agrees(two_ranks, one_rank):
    out2, (r0, r1), seconds = two_ranks
    _, runs = one_rank
    result = r0["lum"]["result"]
    timing = ("tokens_per_s", "train_minutes")  # each rank's own clock
    # Rank 0's metrics are broadcast: evaluation, early stopping and the test agree everywhere.
    assert {k: v for k, v in r1["lum"]["result"].items() if k not in timing} == {k: v for k, v in result.items() if k not in timing}
    assert json.loads((out2 / "lum" / "results.json").read_text())["test"] == result["test"]
    assert (out2 / "lum" / "config.json").exists() and (out2 / "lum" / "tb").exists()
    events = EventAccumulator(str(out2 / "lum" / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/hr@10", "test/hr@10"} <= set(events.Tags()["scalars"])
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))  # the replicated dense part's gradients
    assert len(result["history"]) == 1 and set(result["test"]) >= {"hr@10", "ndcg@10"}
    # Ranking metrics flip when two items' scores cross; 1e-6 weight gaps move a user's rank by one at most.
    one = runs["lum"][1]["result"]
    users = len(runs["lum"][0].split.test)
    for k, v in one["test"].items():
        assert result["test"][k] == pytest.approx(v, abs=1.5 / users), k
    print(f"2-rank spawn (all scenarios) took {seconds:.1f} s")


def test_lr_decay_resumed_after_the_decay_began_replays_it(data, tmp_path):
    """One process: the decayed lr is recomputed from the configured one, not from a checkpoint's decayed value."""
    cfg = dict(lr_decay_fraction=0.9, lr_final_ratio=0.1, checkpoint_every_steps=2)
    straight, _ = _train(data, tmp_path / "a", "hstu", **cfg)
    _, first = _train(data, tmp_path / "b", "hstu", max_steps=4, **cfg)
    assert straight.lr_multiplier(4 / straight.state.step) < 1.0  # the resume point lies inside the decay
    resumed, _ = _train(data, tmp_path / "b", "hstu", **cfg)
    assert first["step"] == 4 and resumed.state.step == straight.state.step
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
