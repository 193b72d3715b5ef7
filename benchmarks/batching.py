"""Benchmark: building packed batches from ML-1M, and padding waste of padded vs packed layouts.

Reads ``ml-1m/interactions.parquet`` directly (ts = position, scenario 1, category 0,
action 1), builds user sequences, LUM tokens (2 per event) and plain item sequences (1 per
event), then for max_len 200 and 256 measures

- tokens/s of building one epoch of packed batches (plan + KJT + jagged tensors), median of repeats,
- tokens/s of building padded batches (the reference layout), same rows of sequences,
- padding waste (fraction of token slots that are padding) of: padded to max_len (one
  sequence per row), padded to the longest sequence of each batch, and packed rows.

Prints one table, then one JSON line of the key figures (also saved to
``benchmarks/results/batching.json``). ``--data-dir`` measures any lumrec data set's behaviours
instead (its own timestamps, scenario, category and action columns); that result goes to
``out/bench/results/batching-<folder>.json`` unless ``--out`` names another file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lumrec.data.batches import iter_packed_batches, iter_padded_batches
from lumrec.data.packing import epoch_plan, epoch_rng, padding_waste, truncate_spans
from lumrec.data.sequences import build_user_sequences
from lumrec.data.tokens import TokenConfig, TokenSequences, build_item_sequences, build_lum_tokens

REPO = Path(__file__).resolve().parents[1]


def behaviours_from_ml1m(path: Path) -> pa.Table:
    """ML-1M interactions as a behaviours-shaped table: ts = position, scenario 1, category 0, action 1."""
    raw = pq.read_table(path, columns=["user_id", "movie_id", "pos"])
    n = raw.num_rows
    return pa.table(
        {
            "user_id": raw["user_id"],
            "ts": raw["pos"],
            "item_id": raw["movie_id"],
            "scenario": pa.array(np.ones(n, np.int32)),
            "category_id": pa.array(np.zeros(n, np.int64)),
            "action": pa.array(np.ones(n, np.int32)),
        }
    )


def behaviours_of(folder: Path) -> pa.Table:
    """Every day of a lumrec data set's behaviours table (the columns the sequence builder reads)."""
    from lumrec.data.dataset import Dataset

    data = Dataset(folder)
    if not data.manifest_path.exists():
        raise SystemExit(f"--data-dir {folder}: not a lumrec data set (no {data.manifest_path.name}); import one with `lumrec import`")
    return data.read_days("behaviours", columns=["user_id", "ts", "item_id", "scenario", "category_id", "action"])


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `fn()` over `repeats` runs, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def waste_padded_to_longest(tokens: TokenSequences, max_len: int, batch_size: int, seed: int) -> float:
    """Padding waste when each batch of `batch_size` shuffled sequences is padded to its longest one."""
    _, kept = truncate_spans(tokens.offsets, tokens.token_type, max_len)
    order = epoch_rng(seed, 0).permutation(len(kept))
    kept = kept[order][kept[order] > 0]
    slots = sum(int(kept[i : i + batch_size].max()) * len(kept[i : i + batch_size]) for i in range(0, len(kept), batch_size))
    return 1.0 - kept.sum() / slots


def measure(tokens: TokenSequences, max_len: int, rows_per_batch: int, window: int | None, repeats: int, seed: int) -> dict:
    """Throughput and padding figures for one token layout at one max_len."""
    _, kept = truncate_spans(tokens.offsets, tokens.token_type, max_len)
    placed = int(kept.sum())
    nonempty = int((kept > 0).sum())

    def packed_epoch():
        n = 0
        for batch in iter_packed_batches(tokens, max_len, rows_per_batch, shuffle_seed=seed, window=window):
            n += batch.num_tokens
        return n

    def padded_epoch():
        n = 0
        for batch in iter_padded_batches(tokens, max_len, rows_per_batch, shuffle_seed=seed):
            n += int(batch.mask.sum())
        return n

    t_plan, plan = timed(lambda: epoch_plan(tokens.offsets, tokens.token_type, max_len, seed, 0, window), repeats)
    t_packed, n_packed = timed(packed_epoch, repeats)
    t_padded, n_padded = timed(padded_epoch, repeats)
    assert n_packed == n_padded == placed, (n_packed, n_padded, placed)
    return {
        "max_len": max_len,
        "tokens": placed,
        "sequences": nonempty,
        "packed_rows": plan.num_rows,
        "plan_s": t_plan,
        "packed_tokens_per_s": placed / t_packed,
        "padded_tokens_per_s": placed / t_padded,
        "waste_padded_max_len": padding_waste(kept[kept > 0], max_len),
        "waste_padded_longest": waste_padded_to_longest(tokens, max_len, rows_per_batch, seed),
        "waste_packed": padding_waste(plan.row_lengths(), max_len),
    }


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding ml-1m/")
    parser.add_argument("--data-dir", type=Path, default=None, help="a lumrec data set folder to measure instead of ML-1M")
    parser.add_argument("--max-lens", type=int, nargs="+", default=[200, 256])
    parser.add_argument("--rows-per-batch", type=int, default=64, help="packed rows (and padded sequences) per batch")
    parser.add_argument("--window", type=int, default=4096, help="sequences per packing window (0: whole epoch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file of the result (default benchmarks/results/batching.json for ML-1M, "
                             "out/bench/results/batching-FOLDER.json for --data-dir)")
    args = parser.parse_args()
    if args.data_dir is not None:
        path, dataset = args.data_dir, args.data_dir.name
        args.out = args.out or REPO / "out" / "bench" / "results" / f"batching-{dataset}.json"
    else:
        path, dataset = args.data / "ml-1m" / "interactions.parquet", "ml-1m"
        args.out = args.out or REPO / "benchmarks" / "results" / "batching.json"
        if not path.exists():
            raise SystemExit(f"{path} not found: pass --data pointing at the folder that holds ml-1m/ (or --data-dir)")
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    events = behaviours_of(path) if args.data_dir is not None else behaviours_from_ml1m(path)
    t_read = time.perf_counter() - t0
    t_seq, seqs = timed(lambda: build_user_sequences(events, source=str(path)), args.repeats)
    cfg = TokenConfig(condition_features=["scenario"], item_features=["item_id", "category_id"])
    t_lum, lum = timed(lambda: build_lum_tokens(seqs, cfg), args.repeats)
    t_items, items = timed(lambda: build_item_sequences(seqs, TokenConfig(item_features=["item_id"])), args.repeats)

    window = args.window or None
    rows = []
    for name, tokens in (("lum", lum), ("items", items)):
        for max_len in args.max_lens:
            rows.append({"layout": name, **measure(tokens, max_len, args.rows_per_batch, window, args.repeats, args.seed)})

    print(f"{dataset}: {len(seqs)} users, {seqs.num_events} events; read {t_read:.2f}s, "
          f"sequences {t_seq:.2f}s ({seqs.num_events / t_seq / 1e6:.1f} M events/s), "
          f"LUM tokens {t_lum:.2f}s ({lum.num_tokens} tokens), item tokens {t_items:.2f}s ({items.num_tokens} tokens)")
    print(f"batches: {args.rows_per_batch} rows per batch, packing window {window} sequences, median of {args.repeats}, "
          f"torch threads 1, {platform.processor() or platform.machine()}")
    header = f"{'layout':<6} {'max_len':>7} {'tokens':>9} {'seqs':>5} {'rows':>5} {'plan s':>7} {'packed Mtok/s':>13} " \
             f"{'padded Mtok/s':>13} {'waste pad max_len':>17} {'waste pad longest':>17} {'waste packed':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layout']:<6} {r['max_len']:>7} {r['tokens']:>9} {r['sequences']:>5} {r['packed_rows']:>5} {r['plan_s']:>7.3f} "
              f"{r['packed_tokens_per_s'] / 1e6:>13.2f} {r['padded_tokens_per_s'] / 1e6:>13.2f} "
              f"{r['waste_padded_max_len']:>17.1%} {r['waste_padded_longest']:>17.1%} {r['waste_packed']:>12.1%}")

    result = {
        "benchmark": "batching",
        "dataset": dataset,
        "users": len(seqs),
        "events": seqs.num_events,
        "rows_per_batch": args.rows_per_batch,
        "window": window,
        "repeats": args.repeats,
        "build_sequences_s": round(t_seq, 4),
        "build_lum_tokens_s": round(t_lum, 4),
        "build_item_tokens_s": round(t_items, 4),
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
