"""Benchmark: M-FALCON (history encoded once, candidates in micro-batches) vs one HSTU pass per candidate.

For one user with a history of L behaviours and M candidates, on a random-weight HSTU ranker
built as `lumrec rank model=hstu` builds it (``build_ranker``: item and category sequence keys,
user / scenario / query context, 8 LUM features, time and position bias), it times, median of
`--repeats` runs under `torch.no_grad()`, the two measured side by side (alternating, one run):

- M-FALCON: `MFalconScorer(model, micro_batch).score(...)` from the request's ids (input checks,
  history encoding, candidate micro-batches, the MLP head);
- one pass per candidate: `model(kjt, dense, lum)` on M samples [full history, candidate] (the KJT
  built beforehand, untimed), in batches of at most `--naive-batch` samples (memory stays bounded;
  each batch is one jagged forward).

Model sizes (`--sizes`): "default" is the ranking job's defaults (embedding_dim 16, so d_model 32;
2 layers, 2 heads, max_len 256); "large" is embedding_dim 64 (d_model 128), 4 layers, 4 heads.
The one-pass path at M x L >= 100,000 history tokens runs `--slow-repeats` times (seconds per run).
Each round runs the one-pass path, then M-FALCON right after it ("cold": it pays for the memory
the one-pass run just freed), then M-FALCON again ("warm": back to back, as a server scoring
requests runs it) and `encode_history` alone. Prints one table (medians, ratios, largest score
difference), then one JSON line of the key figures (also saved to ``--out``,
``benchmarks/results/m_falcon.json`` by default).

    .venv/bin/python benchmarks/m_falcon.py                      # history 200, candidates 100 and 1000
    .venv/bin/python benchmarks/m_falcon.py --histories 64 1024 --candidates 100 \
        --out benchmarks/results/m_falcon_histories.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lumrec.modules.ranking.builder import RankModelConfig, build_ranker
from lumrec.modules.ranking.m_falcon import MFalconScorer, per_candidate_kjt

REPO = Path(__file__).resolve().parents[1]
VOCAB = {"user_id": 1000, "item_id": 10_000, "category_id": 21, "scenario": 3, "query_id": 10}
DENSE, LUM = 3, 8
SLOW_TOKENS = 100_000  # M x L from which the one-pass path runs --slow-repeats times (seconds per run)


@dataclass(frozen=True)
class Size:
    """An HSTU ranker size: per-key embedding width (d_model = 2 x it: item and category), layers, heads."""

    embedding_dim: int
    layers: int
    heads: int
    max_len: int = 256

    @property
    def d_model(self) -> int:
        return 2 * self.embedding_dim


SIZES = {"tiny": Size(4, 1, 1, 16), "default": Size(16, 2, 2), "large": Size(64, 4, 4)}


def build(size: Size, seed: int) -> torch.nn.Module:
    """The ranking job's HSTU ranker at `size`, random weights, eval mode."""
    sizes = RankModelConfig(embedding_dim=size.embedding_dim, mlp=[64, 32], backbones={
        "hstu": {"num_layers": size.layers, "hstu": {"num_heads": size.heads, "max_len": size.max_len}}})
    torch.manual_seed(seed)
    model, _ = build_ranker("hstu", sizes, VOCAB, dense_dim=DENSE, lum_dim=LUM)
    return model.eval()


def make_request(length: int, count: int, seed: int) -> dict:
    """One user's request: `length` behaviours a few minutes to days apart, `count` candidates, dense and LUM features."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, VOCAB["item_id"], (length,), generator=g)
    cand = torch.randint(1, VOCAB["item_id"], (count,), generator=g)
    ts = 1_700_000_000 + torch.cumsum(torch.randint(60, 200_000, (length,), generator=g), 0)
    return dict(
        history={"hist_item_id": items, "hist_category_id": items % VOCAB["category_id"]},
        candidates={"item_id": cand, "category_id": cand % VOCAB["category_id"]},
        context={"user_id": torch.tensor([7]), "scenario": torch.tensor([1]), "query_id": torch.tensor([3])},
        history_ts=ts, sample_ts=(int(ts[-1]) if length else 1_700_000_000) + 3600,
        dense=torch.rand(count, DENSE, generator=g), lum=torch.randn(count, LUM, generator=g),
    )


def measure(model, size_name: str, length: int, count: int, args: argparse.Namespace) -> dict:
    """Medians of M-FALCON and one pass per candidate on one request, alternating runs."""
    r = make_request(length, count, args.seed)
    scorer = MFalconScorer(model, args.micro_batch)
    chunks = []
    for start in range(0, count, args.naive_batch):
        part = {k: (v[start : start + args.naive_batch] if k in ("item_id", "category_id") else v) for k, v in r["candidates"].items()}
        kjt = per_candidate_kjt(model.config, r["history"], part, r["context"], r["history_ts"], r["sample_ts"])
        chunks.append((kjt, r["dense"][start : start + args.naive_batch], r["lum"][start : start + args.naive_batch]))

    def falcon() -> torch.Tensor:
        return scorer.score(r["history"], r["candidates"], r["context"], r["history_ts"], r["sample_ts"], r["dense"], r["lum"])

    def naive() -> torch.Tensor:
        return torch.cat([model(kjt, dense, lum) for kjt, dense, lum in chunks])

    def encode() -> object:
        return scorer.encode_history(r["history"], r["history_ts"])

    naive_repeats = args.slow_repeats if count * length >= SLOW_TOKENS else args.repeats
    times: dict[str, list[float]] = {"naive": [], "falcon_cold": [], "falcon": [], "encode": []}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)

    with torch.no_grad():
        fast, slow = falcon(), naive()  # warm-up (allocator, kernels); also the answers compared
        # One round: a one-pass run, then M-FALCON right after it ("cold": it pays for the memory the
        # one-pass run freed) and again back to back, as a server scoring requests runs it.
        for i in range(max(args.repeats, naive_repeats)):
            if i < naive_repeats:
                timed("naive", naive)
                timed("falcon_cold", falcon)
            if i < args.repeats:
                timed("falcon", falcon)
                timed("encode", encode)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size_name,
        "history": length,
        "candidates": count,
        "falcon_s": med["falcon"],
        "falcon_cold_s": med["falcon_cold"],
        "encode_history_s": med["encode"],
        "naive_s": med["naive"],
        "speedup": med["naive"] / med["falcon"],
        "speedup_cold": med["naive"] / med["falcon_cold"],
        "falcon_repeats": args.repeats,
        "naive_repeats": naive_repeats,
        "max_abs_diff": float((fast - slow).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and the JSON line; returns the saved result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["default", "large"])
    parser.add_argument("--histories", type=int, nargs="+", default=[200], help="history lengths L")
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000], help="candidates M per request")
    parser.add_argument("--micro-batch", type=int, default=64, help="M-FALCON candidates per micro-batch")
    parser.add_argument("--naive-batch", type=int, default=100, help="samples per forward of the one-pass path")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-repeats", type=int, default=3, help=f"repeats of the one-pass path at M x L >= {SLOW_TOKENS:,}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run: tiny model, L 7, M 5, 1 repeat")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "m_falcon.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.histories, args.candidates, args.repeats, args.slow_repeats = ["tiny"], [7], [5], 1, 1
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    rows, params = [], {}
    for size_name in args.sizes:
        model = build(SIZES[size_name], args.seed)
        params[size_name] = sum(p.numel() for p in model.parameters())
        for length in args.histories:
            for count in args.candidates:
                rows.append(measure(model, size_name, length, count, args))
    load_end = os.getloadavg()

    print(f"HSTU ranker, random weights, time + position bias, {DENSE} dense and {LUM} LUM features; one user per request; "
          f"M-FALCON micro-batch {args.micro_batch}, one-pass batches of {args.naive_batch}; medians of "
          f"{args.repeats} runs ({args.slow_repeats} for the one-pass path at M x L >= {SLOW_TOKENS:,}); torch threads 1, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    for name in args.sizes:
        s = SIZES[name]
        print(f"  {name}: d_model {s.d_model}, {s.layers} layers, {s.heads} heads, max_len {s.max_len}, "
              f"{params[name]:,} parameters")
    header = (f"{'size':<8} {'L':>5} {'M':>5} {'M-FALCON ms':>12} {'(cold) ms':>10} {'encode ms':>10} "
              f"{'one pass/cand ms':>17} {'speed-up':>9} {'(cold)':>7} {'max |diff|':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['size']:<8} {r['history']:>5} {r['candidates']:>5} {1000 * r['falcon_s']:>12.2f} "
              f"{1000 * r['falcon_cold_s']:>10.2f} {1000 * r['encode_history_s']:>10.2f} {1000 * r['naive_s']:>17.1f} "
              f"{r['speedup']:>8.1f}x {r['speedup_cold']:>6.1f}x {r['max_abs_diff']:>11.1e}")
    result = {
        "benchmark": "m_falcon",
        "sizes": {n: {"d_model": SIZES[n].d_model, "layers": SIZES[n].layers, "heads": SIZES[n].heads,
                      "max_len": SIZES[n].max_len, "parameters": params[n]} for n in args.sizes},
        "micro_batch": args.micro_batch,
        "naive_batch": args.naive_batch,
        "threads": 1,
        "cpus": os.cpu_count(),
        "load_average": [round(load_start[0], 2), round(load_end[0], 2)],
        "total_s": round(time.perf_counter() - t_start, 2),
        "results": [{k: (round(v, 6) if isinstance(v, float) and k != "max_abs_diff" else v) for k, v in r.items()} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return result


if __name__ == "__main__":
    main()
