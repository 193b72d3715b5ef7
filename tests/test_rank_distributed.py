"""`lumrec rank` sharded over 2 gloo ranks (TorchRec DMP) trains like 1 process; its checkpoints load unsharded; resume is exact.

One module-scoped fixture spawns the two ranks once (torch + torchrec imports cost seconds per
process) and runs every 2-rank job there; meanwhile the 1-process references run in this
process, through the job's plain path (no WORLD_SIZE: no process group, no DMP). Scenarios:
DIN without LUM features and SIM with a LUM knowledge store (both built with tables on meta, their
pooled and sequence tables sharded by the planner's plan), and DIN with every pooled table row-wise
(the planner's choice narrowed by `Ranker.pooled_sharding_types`), which needs every rank's batch
padded to one size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lumrec.checkpoint import CheckpointManager, load_model_weights
from lumrec.distributed import plan_summary
from lumrec.knowledge import write_knowledge
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.modules.warm_start import load_source_state
from lumrec.modules.lum_join import RankLUMConfig
from lumrec.pipelines import rank as rank_module
from lumrec.pipelines.rank import Ranker, run_rank
from lumrec.pipelines.rank_config import RankConfig, RankModelConfig, RankTrainConfig
from rank_spawn import become_rank, free_port, fused_tables, join_ranks, spawn_ranks, without_rank_env  # tests/rank_spawn.py, shared by the multi-rank tests

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
CONDITIONS = ["scenario=1", "scenario=2"] + [f"category_id={c}" for c in range(1, 5)]
SCENARIOS = {"din": ("din", False), "sim_lum": ("sim", True)}
# 173 is odd: every global batch splits 86 / 87, so the loss rescale for unequal slices is always
# in use; the train split has 3 * 173 + 1 samples (checked below), so every epoch ends with a
# 1-sample batch and rank 0 gets a zero-weight stand-in (`padding`). Likewise in evaluation: the
# test split has 2 * 247 + 1 samples, valid 2 * 247 + 141 (70 / 71).
BATCH, EVAL_BATCH, EPOCHS, KILL_AT = 173, 247, 2, 6
# 1 process and 2 ranks sum in other orders (DDP / all-to-all gradient averages, half-batch means),
# so they agree to float32 rounding only. Observed after 8 steps: epoch train losses <= 3e-8 apart,
# AUC / NE / log loss <= 3e-9, weights <= 8e-8, optimizer moments <= 4e-9. 1e-5 leaves >100x
# headroom and still has power (tried): without the loss rescale the epoch losses moved by 0.09;
# without the row-wise table state in checkpoints a resumed run's AUC moved by 1e-4.
ATOL = 1e-5


# ----------------------------------------------------------------------------- data & configs


def _make_world(root: Path) -> tuple[str, str]:
    """Tiny synthetic logs (60 users, 50 items, 4 days) and a knowledge store for days 1-3."""
    data = root / "data"
    generate(data, SynthConfig(seed=3, num_users=60, num_items=50, num_categories=4, num_queries=8, num_days=4,
                               impressions_per_user_day=10))
    store = root / "store"
    for i, day in enumerate(DAYS[:-1]):
        g = torch.Generator().manual_seed(i)
        write_knowledge(store, day, f"test-{day}", torch.arange(1, 61), CONDITIONS, torch.randn(60, len(CONDITIONS), 4, generator=g),
                        torch.arange(1, 51), torch.randn(50, 4, generator=g))
    return str(data), str(store)


def _config(data: str, store: str, out: Path, scenario: str) -> RankConfig:
    model, with_lum = SCENARIOS[scenario]
    lum = RankLUMConfig(store=store, conditions=["scenario=1", "scenario=2"], candidate_condition_feature="category_id") if with_lum else None
    return RankConfig(
        data=data, out=str(out), model=model,
        samples=RankingSampleConfig(protocol="impressions", first_day=DAYS[1], test_fraction=0.3, valid_fraction=0.3),
        sizes=RankModelConfig(embedding_dim=8, mlp=[16], attention_mlp=[8], item_stats=["f_ctr_7d"],
                              backbones={"sim": {"max_search_len": 8, "short_len": 4}}),
        lum=lum,
        train=RankTrainConfig(epochs=EPOCHS, batch_size=BATCH, eval_batch_size=EVAL_BATCH, max_history=20, progress=False,
                              checkpoint_every_steps=4, keep_checkpoints=10, log_every_steps=2),
    )


# ------------------------------------------------------------------------------- the 2 ranks


def _rank_main(rank: int, world: int, port: int, root: str, data: str, store: str) -> None:
    """One spawned rank: torchrun-style env vars, then per scenario a straight run and a killed + resumed one."""
    become_rank(rank, world, port)
    out = Path(root)
    returned: dict[str, Any] = {}
    for scenario in SCENARIOS:
        returned[scenario] = run_rank(_config(data, store, out / f"{scenario}-2", scenario))
        killed = _config(data, store, out / f"{scenario}-2-resumed", scenario)
        returned[f"{scenario}-killed"] = run_rank(killed, max_steps=KILL_AT)
        returned[f"{scenario}-resumed"] = run_rank(killed)  # a new job: resumes from the step-KILL_AT checkpoint
    # Tables on fbgemm's fused kernel (as on CUDA with its CUDA build): straight, and killed + resumed.
    with fused_tables(rank_module):
        ranker = Ranker(_config(data, store, out / "din-2-fused", "din"))
        returned["din-fused"] = ranker.run()
        returned["din-fused-plan"] = plan_summary(ranker.model.plan)
        killed = _config(data, store, out / "din-2-fused-resumed", "din")
        returned["din-fused-killed"] = run_rank(killed, max_steps=KILL_AT)
        returned["din-fused-resumed"] = run_rank(killed)
    Ranker.pooled_sharding_types = ("row_wise",)  # this process only: the planner may put pooled tables row-wise alone
    ranker = Ranker(_config(data, store, out / "din-2-rowwise", "din"))
    returned["din-rowwise"] = ranker.run()
    returned["din-rowwise-plan"] = plan_summary(ranker.model.plan)
    Ranker.pooled_sharding_types = None
    (out / f"returned-rank{rank}.json").write_text(json.dumps(returned))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2-rank jobs (spawned) and the 1-process references (here, meanwhile)."""
    root = tmp_path_factory.mktemp("rank_dist")
    data, store = _make_world(root)
    start = time.monotonic()
    procs = spawn_ranks(_rank_main, (2, free_port(), str(root), data, store))
    with without_rank_env():
        one = {s: run_rank(_config(data, store, root / f"{s}-1", s)) for s in SCENARIOS}
    assert not dist.is_initialized(), "the 1-process path must not create a process group"
    join_ranks(procs, start, 240, "2-rank jobs")
    returned = [json.loads((root / f"returned-rank{r}.json").read_text()) for r in range(2)]
    return {"root": root, "data": data, "store": store, "one": one, "two": returned, "seconds": time.monotonic() - start}


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "train_minutes"}


def _unsharded_model(runs: dict, scenario: str) -> Ranker:
    """A fresh 1-process job of `scenario` (its model unsharded), as pipelines/daily.py builds one to evaluate."""
    return Ranker(_config(runs["data"], runs["store"], runs["root"] / f"{scenario}-fresh", scenario))


def _latest(folder: Path) -> Path:
    manager = CheckpointManager(folder, keep=0)
    return manager.step_dir(manager.latest())


# ---------------------------------------------------------------------------------- tests


def test_batches_cover_the_slicing_cases(runs):
    """The data is what the constants promise: unequal slices every step, a 1-sample last batch (padding)."""
    ranker = _unsharded_model(runs, "din")
    n = ranker.counts["train"]["samples"]
    assert n % BATCH == 1 and n // BATCH == 3, f"{n} train samples; adjust BATCH"
    assert ranker.counts["test"]["samples"] % EVAL_BATCH == 1
    from lumrec.data.ranking.samples import rank_slice

    assert rank_slice(BATCH, 0, 2) == (0, 86) and rank_slice(BATCH, 1, 2) == (86, 173) and rank_slice(1, 0, 2) == (0, 0)
    parts = [list(ranker.samples.iter_batches("train", BATCH, 0, 20, part=(r, 2))) for r in range(2)]
    whole = list(ranker.samples.iter_batches("train", BATCH, 0, 20))
    for k, batch in enumerate(whole):
        mine = [p[k] for p in parts if not p[k].padding]
        assert torch.equal(torch.cat([b.sample_index for b in mine]), batch.sample_index)
        assert all(p[k].global_batch_size == len(batch) for p in parts)
    assert [p[-1].padding for p in parts] == [True, False] and len(parts[0][-1]) == 1  # rank_slice(1, 0, 2) is empty
    with pytest.raises(ValueError, match=r"part must be \(rank, world\)"):
        next(ranker.samples.iter_batches("train", BATCH, part=(2, 2)))


def test_equal_parts_pad_every_slice_to_one_size(runs):
    """equal_parts: each rank's batch is its slice plus copies of the global batch's first sample, ceil(B / 2) in all."""
    samples = _unsharded_model(runs, "din").samples
    for split, size in (("train", BATCH), ("test", EVAL_BATCH)):
        parts = [list(samples.iter_batches(split, size, 0, 20, part=(r, 2), equal_parts=True)) for r in range(2)]
        for k, batch in enumerate(samples.iter_batches(split, size, 0, 20)):
            mine = [p[k] for p in parts]
            assert [len(b) for b in mine] == [-(-len(batch) // 2)] * 2
            assert torch.equal(torch.cat([b.sample_index[: b.real] for b in mine]), batch.sample_index)
            for b in mine:
                assert bool((b.sample_index[b.real :] == batch.sample_index[0]).all()) and b.padding == (b.real == 0)
                assert torch.equal(b.labels[b.real :], batch.labels[:1].expand(b.pad))
        assert [(p[-1].real, p[-1].pad, p[-1].padding) for p in parts] == [(0, 1, True), (1, 0, False)]
        assert [p[0].pad for p in parts] == [1, 0]  # 173 and 247 are odd: rank 0's slice is the shorter


def _assert_histories_close(one: dict, two: dict) -> None:
    """Every epoch's train loss and valid / test AUC, NE and log loss within ATOL; the same sample counts."""
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert abs(h1["train_loss"] - h2["train_loss"]) <= ATOL, (h1["train_loss"], h2["train_loss"])
        for split in ("valid", "test"):
            assert h1[split]["count"] == h2[split]["count"]
            for key in ("auc", "ne", "log_loss"):
                assert abs(h1[split][key] - h2[split][key]) <= ATOL, (split, key, h1[split][key], h2[split][key])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_match_one_process(runs, scenario):
    one, two = runs["one"][scenario], runs["two"][0][scenario]
    assert _strip(runs["two"][1][scenario]) == _strip(two), "ranks disagree on the results"
    assert json.loads((runs["root"] / f"{scenario}-2" / "results.json").read_text())["test"] == two["test"]
    assert (two["steps"], two["best_epoch"], two["epochs_run"], two["samples"]) == (one["steps"], one["best_epoch"], one["epochs_run"], one["samples"])
    _assert_histories_close(one, two)
    assert abs(one["test"]["auc"] - two["test"]["auc"]) <= ATOL


def test_row_wise_pooled_tables_train_like_one_process(runs):
    """Pooled tables split row-wise over the ranks (padded local batches, the last of 1 sample too) train and evaluate as one process."""
    pooled = [line for line in runs["two"][0]["din-rowwise-plan"] if ".embedding_bag_collection." in line]
    assert pooled and all(": row_wise kernel=dense ranks=[0, 1]" in line for line in pooled), pooled
    one, two = runs["one"]["din"], runs["two"][0]["din-rowwise"]
    assert _strip(runs["two"][1]["din-rowwise"]) == _strip(two), "ranks disagree on the results"
    assert (two["steps"], two["best_epoch"], two["samples"]) == (one["steps"], one["best_epoch"], one["samples"])
    _assert_histories_close(one, two)
    rowwise, single = _unsharded_model(runs, "din"), _unsharded_model(runs, "din")
    load_model_weights(_latest(runs["root"] / "din-2-rowwise" / "checkpoints"), rowwise.model)
    load_model_weights(_latest(runs["root"] / "din-1" / "checkpoints"), single.model)
    for key, value in rowwise.model.state_dict().items():
        torch.testing.assert_close(value, single.model.state_dict()[key], rtol=0, atol=ATOL, msg=key)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_rank_checkpoint_loads_unsharded_and_matches_one_process_weights(runs, scenario):
    root = runs["root"]
    two = _unsharded_model(runs, scenario)
    initial = {k: v.clone() for k, v in two.model.state_dict().items()}
    load_model_weights(_latest(root / f"{scenario}-2" / "checkpoints"), two.model)  # DCP: 2 ranks' shards -> one model
    one = _unsharded_model(runs, scenario)
    load_model_weights(_latest(root / f"{scenario}-1" / "checkpoints"), one.model)
    source = load_source_state(root / f"{scenario}-2" / "checkpoints")  # what warm start (pipelines/daily.py) reads
    assert sorted(source) == sorted(two.model.state_dict())
    for key, value in two.model.state_dict().items():
        assert torch.equal(source[key], value), key
        assert not torch.equal(value, initial[key]), f"{key}: not trained or not restored"
        torch.testing.assert_close(value, one.model.state_dict()[key], rtol=0, atol=ATOL, msg=key)
    # The 2-rank weights evaluated by one process give the 2-rank run's last test metrics.
    last = runs["two"][0][scenario]["history"][-1]["test"]
    assert abs(two.evaluate("test")["auc"] - last["auc"]) <= ATOL
    best = CheckpointManager(root / f"{scenario}-2" / "best", keep=0)
    assert best.latest() is not None
    load_model_weights(best.step_dir(best.latest()), one.model)  # the best-model checkpoint too


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_two_rank_run_resumes_exactly(runs, scenario):
    root = runs["root"]
    killed = runs["two"][0][f"{scenario}-killed"]
    assert killed == {"stopped": "max_steps", "epoch": 1, "step": KILL_AT}
    straight, resumed = runs["two"][0][scenario], runs["two"][0][f"{scenario}-resumed"]
    assert _strip(resumed) == _strip(straight)
    assert _strip(runs["two"][1][f"{scenario}-resumed"]) == _strip(straight)
    # Final weights, dense optimizer moments and the row-wise table state are all equal: the
    # checkpoint carried every piece (a missing one would change the steps after the resume).
    for key in ("model", "optim"):
        left = load_source_state(_latest(root / f"{scenario}-2" / "checkpoints"), checkpoint_key=key)
        right = load_source_state(_latest(root / f"{scenario}-2-resumed" / "checkpoints"), checkpoint_key=key)
        assert sorted(left) == sorted(right)
        for name in left:
            assert torch.equal(left[name], right[name]), f"{key}: {name}"
    tables = [n for n in load_source_state(_latest(root / f"{scenario}-2" / "checkpoints"), checkpoint_key="optim")
              if "embedding_bags" in n and n.endswith("exp_avg_sq_row")]
    assert tables, "the sharded tables' RowwiseAdamW state is not in the checkpoint"
    print(f"2-rank jobs took {runs['seconds']:.1f} s")


def test_fused_table_run_resumes_exactly(runs):
    """Tables on a fused fbgemm kernel: the checkpoint carries the fused optimizer's state; a killed run resumes exactly."""
    root, (r0, r1) = runs["root"], runs["two"]
    assert r0["din-fused-plan"] and all("kernel=fused " in line for line in r0["din-fused-plan"]), r0["din-fused-plan"]
    assert r0["din-fused-killed"] == {"stopped": "max_steps", "epoch": 1, "step": KILL_AT}
    assert _strip(r0["din-fused-resumed"]) == _strip(r0["din-fused"]) == _strip(r1["din-fused-resumed"])
    for key in ("model", "optim"):
        left = load_source_state(_latest(root / "din-2-fused" / "checkpoints"), checkpoint_key=key)
        right = load_source_state(_latest(root / "din-2-fused-resumed" / "checkpoints"), checkpoint_key=key)
        assert sorted(left) == sorted(right)
        for name in left:
            assert torch.equal(left[name], right[name]), f"{key}: {name}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_rank_checkpoint_resumes_on_one_process(runs, scenario, tmp_path):
    """Checkpoints name every tensor as the unsharded job does, so DCP reshards a 2-rank one onto 1 process."""
    import shutil

    root = runs["root"]
    src = root / f"{scenario}-2-resumed"
    out = tmp_path / "elastic"
    shutil.copytree(src / "checkpoints" / f"step-{KILL_AT:08d}", out / "checkpoints" / f"step-{KILL_AT:08d}")
    shutil.copy(src / "config.json", out / "config.json")
    resumed = run_rank(_config(runs["data"], runs["store"], out, scenario))
    one = runs["one"][scenario]
    assert (resumed["steps"], resumed["best_epoch"]) == (one["steps"], one["best_epoch"])
    for h1, h2 in zip(one["history"], resumed["history"], strict=True):
        assert abs(h1["train_loss"] - h2["train_loss"]) <= ATOL
        assert abs(h1["test"]["auc"] - h2["test"]["auc"]) <= ATOL


def test_rank0_writes_tensorboard_scalars(runs):
    """Training scalars at log steps (the dense part's gradient norm read before the step) and every epoch's metrics."""
    for scenario in SCENARIOS:
        events = EventAccumulator(str(runs["root"] / f"{scenario}-2" / "tb"))
        events.Reload()
        assert {"train/loss", "train/lr", "train/grad_norm", "valid/auc", "test/auc"} <= set(events.Tags()["scalars"]), scenario
        assert all(e.value > 0 for e in events.Scalars("train/grad_norm")), scenario
