"""Benchmark: a request's LUM features read from Redis, per lookup (`RedisKnowledge`) against per request (`one_request()`).

What `lumrec serve` does for one request of a DLRM with LUM features: `LUMFeatureModule` looks up
the user's vectors once per condition feature (here the two fixed `scenario` conditions, then the
candidate's `query_id` condition) and the 100 candidates' item vectors. A user's record in Redis
holds every condition's vector (102 conditions x d float32), so each user lookup on a
`RedisKnowledge` reads the whole record again; a `RequestKnowledge` view (`one_request()`) reads it
once per request. Both paths run side by side on the same published partition (alternating, one
run), against a real `redis-server` on a loopback port, one torch thread.

Data: 400 users x 102 conditions (2 `scenario`, 100 `query_id`) and 1,000 items of random vectors
at each `--dims`, published with `publish_partition`; each request is a random user and 100 random
candidates (item vectors are cached by the reader after their first read, as in serving).

Prints a table of medians over `--requests` requests per path and dim with the ratio (and checks
the two paths' features are equal), then one JSON
line of the figures (also saved under ``--out``, ``benchmarks/results/redis_knowledge.json`` by
default).

    .venv/bin/python benchmarks/redis_knowledge.py                 # d 128 and 896, 300 requests each
    .venv/bin/python benchmarks/redis_knowledge.py --tiny --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import merge_row  # noqa: E402

from lumrec.knowledge import RedisKnowledge, RedisKnowledgeConfig, local_redis_server, publish_partition, write_knowledge  # noqa: E402
from lumrec.modules.lum_features import LUMFeatureConfig, LUMFeatureModule, candidates_kjt  # noqa: E402

DAY = "2026-01-02"
CONDITIONS = [f"scenario={v}" for v in range(2)] + [f"query_id={v}" for v in range(100)]
# What the serving benchmark's DLRM reads: interest matching under the fixed scenarios and the request's query.
LUM_CONFIG = LUMFeatureConfig(conditions=[("scenario", 0), ("scenario", 1)], candidate_condition_feature="query_id",
                              candidate_condition_key="category_id", features=("sim", "missing"))


def publish(folder: Path, url: str, dim: int, users: int, items: int, seed: int) -> RedisKnowledge:
    """A random partition of `users` x CONDITIONS and `items` at `dim`, published under its own prefix."""
    rng = np.random.default_rng(seed)
    write_knowledge(folder, DAY, f"bench-d{dim}", np.arange(1, users + 1), CONDITIONS,
                    rng.standard_normal((users, len(CONDITIONS), dim)).astype(np.float32),
                    np.arange(1, items + 1), rng.standard_normal((items, dim)).astype(np.float32))
    config = RedisKnowledgeConfig(url=url, prefix=f"bench{dim}")
    publish_partition(folder, DAY, config)
    return RedisKnowledge(config)


def measure(reader: RedisKnowledge, args: argparse.Namespace, seed: int) -> dict:
    """Median ms of one request's LUM features, per-lookup reader against the one-request view."""
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"per_lookup": [], "one_request": []}
    max_diff = 0.0
    for i in range(args.warmup + args.requests):
        user = torch.tensor([int(rng.integers(1, args.users + 1))])
        items = torch.from_numpy(rng.integers(1, args.items + 1, args.candidates))
        kjt = candidates_kjt(items, torch.tensor([args.candidates]), torch.full((args.candidates,), int(rng.integers(0, 100))))
        features = {}
        for path in (("per_lookup", "one_request") if i % 2 else ("one_request", "per_lookup")):
            source = reader if path == "per_lookup" else reader.one_request()
            start = time.perf_counter()
            features[path] = LUMFeatureModule(LUM_CONFIG, source)(user, kjt).values()
            if i >= args.warmup:
                times[path].append((time.perf_counter() - start) * 1e3)
        max_diff = max(max_diff, float((features["per_lookup"] - features["one_request"]).abs().max()))
    per_lookup, one_request = statistics.median(times["per_lookup"]), statistics.median(times["one_request"])
    return {"dim": reader.dim, "record_kb": round(len(CONDITIONS) * (reader.dim * 4 + 1) / 1024, 1),
            "per_lookup_ms": round(per_lookup, 3), "one_request_ms": round(one_request, 3),
            "speedup": round(per_lookup / one_request, 2), "max_abs_diff": max_diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 896], help="knowledge vector widths (LUM d_model)")
    ap.add_argument("--requests", type=int, default=300, help="measured requests per path and dim (median)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="d 8, 20 requests: checks the script runs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "redis_knowledge.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.dims, args.requests, args.warmup = [8], 20, 2
    torch.set_num_threads(1)
    with local_redis_server() as server, tempfile.TemporaryDirectory() as tmp:
        rows = [measure(publish(Path(tmp) / f"d{dim}", server.url, dim, args.users, args.items, args.seed + dim), args, args.seed)
                for dim in args.dims]
    print(f"{'dim':>5} {'record KB':>10} {'per lookup ms':>14} {'one request ms':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['dim']:>5} {r['record_kb']:>10} {r['per_lookup_ms']:>14.3f} {r['one_request_ms']:>15.3f} {r['speedup']:>6.2f}x")
    result = {"benchmark": "redis_knowledge", "requests": args.requests, "candidates": args.candidates,
              "conditions": len(CONDITIONS), "user_lookups_per_request": 2, "threads": 1, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows}
    merge_row(args.out, "tiny" if args.tiny else f"dims {'_'.join(map(str, args.dims))}", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
