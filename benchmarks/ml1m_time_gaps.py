"""What HSTU's time bias is worth on ML-1M: the users whose real timestamps we have, three ways.

The shared ML-1M (`interactions.parquet`) has the event order but no timestamps, so the main
benchmark's HSTU sees time gaps synthesised from positions. The published HSTU numbers come from
code that had real timestamps and measured each token's gaps from the *next* event's time (the
request time; at evaluation the held-out target's). `ratings_partial_first487650.dat.gz` has the
real timestamps of users 1-2999 (every one of their ratings), so on exactly those users and
events this script trains `configs/ml1m_hstu.yaml` (with `train.loss_excludes_seen=false`: the
softmax over all items these rows were measured with) under one of three arms:

    order    timestamps synthesised from the event order (what the main benchmark has)
    event    real timestamps, gaps from the token's own event (time_gap_from=event)
    request  real timestamps, gaps from the next event's time (time_gap_from=request, the reference's)

One arm per invocation; its row is merged into benchmarks/results/ml1m_time_gaps.json and the
table (with each arm's HR@10 / NDCG@10 difference from `order`) is printed:

    .venv/bin/python benchmarks/ml1m_time_gaps.py --arm order [--data ../shared/data] [--epochs 140 | --steps N | --minutes 22] [--seed 1]

The recorded rows trained 22 minutes (`--minutes 22`) on these 49% of the events: about the epochs
that the main benchmark's 45 minutes give on all of them. The default budget is 140 epochs, about
what those 22 minutes reached (134-144), the same on any machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ml1m_retrieval import add_run_arguments, budget_record, check_budget, measured_run, publish_row, run_overrides, start_run  # noqa: E402  (sibling script)

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ml1m_time_gaps.json"
RATINGS_FILE = "ratings_partial_first487650.dat.gz"
CONFIG = "configs/ml1m_hstu.yaml"
# The rows were measured with the softmax over all items (configs/ml1m_hstu.yaml sets
# train.loss_excludes_seen true); pinning it lets a new seed or arm join them, because these rows
# carry no recorded recipe to check a mix against.
PINNED_OVERRIDES = ["train.loss_excludes_seen=false"]
# arm -> (data set with real timestamps?, time_gap_from, what the row means)
ARMS = {
    "order": (False, "event", "HSTU, timestamps from event order (as the main benchmark)"),
    "event": (True, "event", "HSTU, real timestamps, gaps from the token's own event"),
    "request": (True, "request", "HSTU, real timestamps, gaps from the next event (reference)"),
}


def subset_interactions(interactions: Path, ratings: Path, work: Path) -> tuple[Path, Path]:
    """The ML-1M interactions of the users in `ratings`, written twice in the same order: as
    `interactions.parquet` (positions only) and as a ratings.dat with their real timestamps.

    Both keep the order of `interactions.parquet` (the main benchmark's), including its order of
    events with equal timestamps, so the two imports differ in their timestamps only.
    """
    from lumrec.data.importers.ml_1m_ratings import read_ratings_dat

    rated = read_ratings_dat(ratings)
    real = {(int(u), int(i)): (int(t), r) for u, i, t, r in zip(rated.user_raw, rated.item_raw, rated.ts, rated.rating)}
    table = pq.read_table(interactions)
    users = table.column("user_id").to_numpy()
    keep = np.isin(users, np.unique(rated.user_raw))
    table = table.filter(pa.array(keep))
    if table.num_rows == 0:
        raise ValueError(f"{interactions}: none of the users of {ratings} is in column user_id")
    users, items, pos = (table.column(c).to_numpy() for c in ("user_id", "movie_id", "pos"))
    order = np.lexsort((pos, users))
    lines, last = [], (None, -1)
    for k in order:
        key = (int(users[k]), int(items[k]))
        if key not in real:
            raise ValueError(f"{interactions}: user {key[0]} movie {key[1]} has no rating in {ratings}")
        ts, rating = real[key]
        if key[0] == last[0] and ts < last[1]:
            raise ValueError(f"{interactions}: user {key[0]}'s events are not in time order at pos {int(pos[k])}")
        last = (key[0], ts)
        lines.append(f"{key[0]}::{key[1]}::{rating:g}::{ts}\n")
    if len(lines) != len(real):
        raise ValueError(f"{interactions} has {len(lines)} events of these users, {ratings} has {len(real)}")
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, work / "interactions.parquet")
    (work / "ratings.dat").write_text("".join(lines))
    return work, work / "ratings.dat"


def raw_sequences(dataset_path: Path) -> dict[str, list[str]]:
    """Each raw user's raw movie ids in the order training sees them (to check both imports agree)."""
    from lumrec.data.dataset import Dataset
    from lumrec.data.sequences import sequences_from_dataset

    def raw_of(column: str) -> dict[int, str]:
        table = pq.read_table(dataset_path / "vocab" / f"{column}.parquet")
        return dict(zip(table.column("id").to_pylist(), table.column("raw_id").to_pylist()))

    seqs = sequences_from_dataset(Dataset(dataset_path))
    users, items = raw_of("user_id"), raw_of("item_id")
    return {
        users[int(u)]: [items[int(i)] for i in seqs.item_id[seqs.offsets[k] : seqs.offsets[k + 1]]]
        for k, u in enumerate(seqs.user_ids)
    }


def ensure_datasets(data_root: Path, cache: Path) -> tuple[Path, Path]:
    """Import the subset twice (event order only / real timestamps); check they hold the same sequences."""
    from lumrec.data.dataset import Dataset
    from lumrec.data.importers import run_import

    ml1m = data_root / "ml-1m"
    ordered, timed = cache / "order", cache / "timed"
    side = dict(overwrite=True, movies=ml1m / "movies.dat", users=ml1m / "users.dat")
    if not (Dataset(ordered).manifest_path.exists() and Dataset(timed).manifest_path.exists()):
        folder, ratings = subset_interactions(ml1m / "interactions.parquet", ml1m / RATINGS_FILE, cache / "source")
        run_import("ml-1m", folder, ordered, **side)
        run_import("ml-1m-ratings", ratings, timed, **side)
        a, b = raw_sequences(ordered), raw_sequences(timed)
        if a != b:
            differ = sorted(u for u in set(a) | set(b) if a.get(u) != b.get(u))
            raise ValueError(f"the two imports disagree on the event order of {len(differ)} users (e.g. {differ[:5]})")
    return ordered, timed


def format_table(rows: dict) -> str:
    """One line per arm measured so far, with its HR@10 / NDCG@10 difference from `order`."""
    head = (f"{'arm':<8} {'what':<62} {'seeds':>5} {'HR@10':>7} {'NDCG@10':>8} {'HR@50':>7} {'HR@200':>7} "
            f"{'dHR@10':>7} {'dNDCG@10':>8} {'epochs':>6} {'tok/s':>8}")
    lines = [head, "-" * len(head)]
    base = rows.get("order", {}).get("test")
    for arm in ARMS:
        if arm not in rows:
            continue
        r, t = rows[arm], rows[arm]["test"]
        delta = (f"{t['hr@10'] - base['hr@10']:>+7.4f} {t['ndcg@10'] - base['ndcg@10']:>+8.4f}" if base
                 else f"{'-':>7} {'-':>8}")
        lines.append(
            f"{arm:<8} {r['label']:<62} {len(r.get('seeds', [0])):>5} {t['hr@10']:>7.4f} {t['ndcg@10']:>8.4f} "
            f"{t['hr@50']:>7.4f} {t['hr@200']:>7.4f} {delta} {r['epochs_run']:>6.0f} {r['tokens_per_s']:>8,.0f}"
        )
    return "\n".join(lines)


# The default budget: about the epochs the recorded rows' 22-minute budget reached (134-144).
DEFAULT_EPOCHS = 140

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True, choices=list(ARMS))
    add_run_arguments(parser, f"{DEFAULT_EPOCHS}, about what the recorded rows' 22-minute budget reached", out=REPO / "out" / "bench_time_gaps",
                      results=RESULTS)
    args = parser.parse_args(argv)
    check_budget(parser, args, DEFAULT_EPOCHS)

    from lumrec.cli import setup_logging
    from lumrec.config import load_config
    from lumrec.pipelines.pretrain import PretrainConfig

    setup_logging()
    torch.set_num_threads(args.threads)
    cache = Path(args.out) / "data"
    real_ts, gap_from, label = ARMS[args.arm]
    # The row records what sets the arm apart (as the runs so far recorded it).
    arm_overrides = [f"train.seed={args.seed}", f"model_config.time_gap_from={gap_from}"]
    overrides = [*run_overrides(args, args.arm, cache / ("timed" if real_ts else "order")), *PINNED_OVERRIDES, *arm_overrides]
    cfg = load_config(PretrainConfig, REPO / CONFIG, overrides=overrides)
    recipe = start_run(args, cfg, Path(args.results), args.arm)
    ensure_datasets(Path(args.data), cache)
    row = {
        "label": label, "arm": args.arm, **measured_run(cfg), "threads": args.threads, **budget_record(args),
        "overrides": arm_overrides, "users": "ML-1M users 1-2999 (those in " + RATINGS_FILE + ")", "recipe": recipe,
    }
    publish_row(Path(args.results), args.arm, row, args.seed, format_table, Path(cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
