"""`run_query` split over 2 gloo ranks writes the same knowledge partition as 1 process (users, no-history users, carry-over)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from lumrec.data.synthetic import SynthConfig, generate
from lumrec.distributed import init_distributed
from lumrec.knowledge import partition_dir
from lumrec.pipelines.pretrain import Pretrainer
from lumrec.pipelines.pretrain_config import DataConfig, PretrainConfig, TrainConfig
from lumrec.pipelines.query import ConditionSpec, QueryConfig, run_query
from rank_spawn import become_rank, free_port, join_ranks, spawn_ranks, without_rank_env  # tests/rank_spawn.py

DAYS = ["2026-01-02", "2026-01-03"]
# (name, as_of_ds, users, carry_over_from, rows_per_batch): odd and even batch counts, so the last
# round is full or has one rank idle; "all" includes users without history (one shared answer).
CASES = [("all", DAYS[0], "all", None, 3), ("active", DAYS[1], "active", DAYS[0], 4), ("active5", DAYS[1], "active", DAYS[0], 5)]


def _config(root: Path, store: Path, as_of_ds: str, users: str, carry: str | None, rows: int) -> QueryConfig:
    return QueryConfig(
        checkpoint=str(root / "run"), data=str(root / "data"), as_of_ds=as_of_ds, store=str(store), users=users,
        carry_over_from=carry, rows_per_batch=rows, threads=1, progress=False,
        conditions=[ConditionSpec("category_id", "all"), ConditionSpec("scenario", [1, 2])],
    )


def _run_cases(root: Path, store: Path, ctx=None) -> dict[str, dict]:
    """Every case in order (each later case carries over from the first one's partition) into `store`."""
    results = {}
    for name, day, users, carry, rows in CASES:
        case_store = store / name
        if carry is not None:  # the partition to carry over from: the "all" case's
            results[name] = run_query(_config(root, case_store, DAYS[0], "all", None, 3), ctx)
        results[name] = run_query(_config(root, case_store, day, users, carry, rows), ctx)
    return results


def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    """One spawned rank: every case through `run_query(cfg, ctx)`."""
    become_rank(rank, world, port)
    ctx = init_distributed()
    results = _run_cases(Path(root), Path(root) / "store2", ctx)
    (Path(root) / f"returned-rank{rank}.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "seconds"}
                                                                      for k, v in results.items()}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny LUM, the 2-rank queries (spawned) and the 1-process ones (here, meanwhile)."""
    root = tmp_path_factory.mktemp("query_dist")
    generate(root / "data", SynthConfig(seed=4, num_users=50, num_items=40, num_categories=4, num_queries=8, num_days=3))
    Pretrainer(PretrainConfig(
        model="lum", out=str(root / "run"),
        data=DataConfig(path=str(root / "data"), end=DAYS[1], max_len=16, condition_features=["scenario", "category_id"],
                        item_features=["item_id"]),
        train=TrainConfig(epochs=1, rows_per_batch=4, num_negatives=8, checkpoint_every_steps=100, log_every_steps=100, threads=1),
        model_config={"d_model": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 32},
    )).run(max_steps=3)
    start = time.monotonic()
    procs = spawn_ranks(_rank_main, (2, free_port(), str(root)))
    with without_rank_env():
        one = _run_cases(root, root / "store1")
    join_ranks(procs, start, 180, "2-rank queries")
    two = [json.loads((root / f"returned-rank{r}.json").read_text()) for r in range(2)]
    return {"root": root, "one": one, "two": two}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_ranks_write_the_same_partition_as_one(runs, case):
    root = runs["root"]
    day = next(c[1] for c in CASES if c[0] == case)
    for table in ("users.parquet", "items.parquet"):
        one = pq.read_table(partition_dir(root / "store1" / case, day) / table)
        two = pq.read_table(partition_dir(root / "store2" / case, day) / table)
        assert one.num_rows > 0 and one.equals(two), f"{case}: {table} differs between 1 process and 2 ranks"
    summary_one = {k: v for k, v in runs["one"][case].items() if k not in ("seconds", "store")}
    summary_two = {k: v for k, v in runs["two"][0][case].items() if k != "store"}
    assert summary_one == summary_two  # rank 0 reports the whole partition


def test_batches_are_split_over_the_ranks(runs):
    """Rank 1 answered its share (every other batch), rank 0 the rest; the cases cover odd and even batch counts."""
    counts = {runs["one"][c]["batches"] for c, *_ in CASES}
    assert any(n % 2 for n in counts) and any(n % 2 == 0 for n in counts), counts
    for case, *_ in CASES:
        n = runs["one"][case]["batches"]
        assert runs["two"][1][case]["batches"] == n // 2 and runs["two"][1][case]["rank"] == 1
    assert runs["one"]["all"]["users_without_history"] > 0 and runs["one"]["active"]["carried_over"] > 0
