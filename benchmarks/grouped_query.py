"""Benchmark: LUM grouped knowledge query (one pass, query mask) vs N separate passes (history + one condition each).

A small random-weight LUM (d_model 64, 2 layers, max_len 256) and 64 synthetic users with a
200-token history (100 events); for N in {1, 4, 16} query conditions it measures, median of
`--repeats` runs under `torch.no_grad()`:

- grouped: every user's history + its N condition tokens in one sequence, `query_flags` on the queries;
- separate: N passes, pass j = every user's history + condition j (what N independent requests cost).

Prints one table with the speed ratio and the largest difference between the two answers,
then one JSON line (also saved to ``benchmarks/results/grouped_query.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lumrec.data.batches import make_jagged_batch
from lumrec.data.packing import pack_sequences
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import TokenConfig, build_lum_tokens
from lumrec.modules.retrieval.grouped_query import grouped_query, separate_queries
from lumrec.modules.retrieval.lum import LUM, LUMConfig
from lumrec.modules.layers.token_encoder import ItemFeatureLookup, token_encoder_config_from_tokens

REPO = Path(__file__).resolve().parents[1]
VOCAB = {"item_id": 1000, "category_id": 21, "scenario": 3}


def synthetic_batch(num_users: int, history_tokens: int, max_len: int, seed: int):
    """One batch of `num_users` users with `history_tokens` LUM tokens each (category-conditioned events)."""
    rng = np.random.default_rng(seed)
    events = history_tokens // 2
    n = num_users * events
    seqs = UserSequences(
        user_ids=np.arange(num_users, dtype=np.int64) + 1, offsets=offsets_from_lengths(np.full(num_users, events)),
        item_id=rng.integers(1, VOCAB["item_id"], n), ts=np.arange(n, dtype=np.int64) * 60,
        action=np.ones(n, np.int32), scenario=rng.integers(1, 3, n).astype(np.int32),
        query_id=np.zeros(n, np.int64), category_id=rng.integers(1, VOCAB["category_id"], n),
    )
    tokens = build_lum_tokens(seqs, TokenConfig(condition_features=["category_id"], item_features=["item_id", "category_id"]))
    plan = pack_sequences(tokens.offsets, tokens.token_type, max_len)
    return tokens, make_jagged_batch(tokens, plan)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time of `fn()` over `repeats` runs, and its result."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--backbone", choices=["transformer", "hstu"], default="transformer")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--history", type=int, default=200, help="history tokens per user")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16], help="numbers of query conditions")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grouped_query.json")
    args = parser.parse_args()
    if args.history > args.max_len - 1:
        raise SystemExit(f"--history {args.history} must be <= max_len - 1 = {args.max_len - 1} (one slot for the queries)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    tokens, batch = synthetic_batch(args.users, args.history, args.max_len, args.seed)
    enc = token_encoder_config_from_tokens(tokens, VOCAB, dim=-(-args.d_model // 4) * 4, d_model=args.d_model)
    lum = LUM(
        LUMConfig(d_model=args.d_model, num_layers=args.layers, num_heads=2, ffn_dim=4 * args.d_model,
                  max_len=args.max_len, backbone=args.backbone),
        enc, ItemFeatureLookup(VOCAB["item_id"]),
    ).eval()
    as_of = int(batch.ts.max()) + 3600

    rows = []
    with torch.no_grad():
        grouped_query(lum, batch, [("category_id", 1)], as_of_ts=as_of)  # warm-up (allocator, kernels)
        for n in args.ns:
            conditions = [("category_id", 1 + j % (VOCAB["category_id"] - 1)) for j in range(n)]
            t_grouped, grouped = timed(lambda: grouped_query(lum, batch, conditions, as_of_ts=as_of), args.repeats)
            t_separate, separate = timed(lambda: separate_queries(lum, batch, conditions, as_of_ts=as_of), args.repeats)
            rows.append({
                "n": n,
                "grouped_s": t_grouped,
                "separate_s": t_separate,
                "speedup": t_separate / t_grouped,
                "grouped_user_queries_per_s": args.users * n / t_grouped,
                "max_abs_diff": float((grouped - separate).abs().max()),
            })

    print(f"LUM {args.backbone}: d_model {args.d_model}, {args.layers} layers, max_len {args.max_len}; "
          f"{args.users} users x {args.history} history tokens; median of {args.repeats}, torch threads {args.threads}, "
          f"{platform.processor() or platform.machine()}")
    header = f"{'N':>3} {'grouped s':>10} {'separate s':>11} {'speedup':>8} {'user-queries/s':>15} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n']:>3} {r['grouped_s']:>10.4f} {r['separate_s']:>11.4f} {r['speedup']:>7.2f}x "
              f"{r['grouped_user_queries_per_s']:>15.0f} {r['max_abs_diff']:>11.2e}")
    result = {
        "benchmark": "grouped_query",
        "backbone": args.backbone,
        "d_model": args.d_model,
        "layers": args.layers,
        "max_len": args.max_len,
        "users": args.users,
        "history_tokens": args.history,
        "repeats": args.repeats,
        "threads": args.threads,
        "total_s": round(time.perf_counter() - t_start, 2),
        "results": [{k: (round(v, 6) if isinstance(v, float) and k != "max_abs_diff" else v) for k, v in r.items()} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
