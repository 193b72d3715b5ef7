"""Benchmark: one RowwiseAdamW training step of an embedding table, dense vs row-sparse gradients, by table size.

For each table size (`--rows`, default 1e4 1e5 1e6 1e7 rows of `--dim` 64 float32) one table
(sum pooling) with RowwiseAdamW is stepped on the same batch of ids
(`--bags` bags of `--ids-per-bag` ids drawn once from 10,000 slots spread over the table, so every
size touches the same number of rows). A step is the lookup's forward, backward and the optimizer
step (and zero_grad). Two paths, measured side by side on the same table (alternating, one run):

- dense: the gradient is a dense [rows, dim] tensor (torchrec's default), RowwiseAdamW scans it
  for touched rows: O(table rows) per step;
- sparse: `lumrec.optim.sparse_table_gradients` (row-sparse COO gradient, duplicates summed in
  backward): O(rows touched) per step.

`--kernel ebc` (default): a torchrec EmbeddingBagCollection table, as one-process jobs train it.
`--kernel dense_kernel`: the table in fbgemm's DENSE kernel (`DenseTableBatchedEmbeddingBagsCodegen`,
one flat weight), as a rank trains its shard under DistributedModelParallel; sparse is
`lumrec.optim.sparse_kernel_grads.sparse_dense_kernel_gradients`.

Prints a table of medians over `--steps` steps per path (after `--warmup` steps) with the ratio,
then one JSON line of the figures (also saved under ``--out``,
``benchmarks/results/rowwise_adamw.json`` by default). Memory: the dense path at R rows holds
weight, first moment and gradient, 3 x R x dim x 4 bytes (7.7 GB at 1e7 rows x 64).

    .venv/bin/python benchmarks/rowwise_adamw.py                         # 1e4 .. 1e7 rows
    .venv/bin/python benchmarks/rowwise_adamw.py --rows 10000 1000000 --steps 10
    .venv/bin/python benchmarks/rowwise_adamw.py --kernel dense_kernel
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import merge_row  # noqa: E402

from lumrec.optim import RowwiseAdamW  # noqa: E402
from lumrec.optim.sparse_grads import sparse_table_gradients  # noqa: E402
from lumrec.optim.sparse_kernel_grads import sparse_dense_kernel_gradients  # noqa: E402

SLOTS = 10_000  # the batch's ids are drawn from this many rows, spread evenly over every table size


def build(rows: int, dim: int) -> tuple[EmbeddingBagCollection, torch.nn.EmbeddingBag, RowwiseAdamW]:
    """One-table EBC on meta, materialised without torchrec's init (uniform init of 1e7 rows costs seconds)."""
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])],
        device=torch.device("meta"),
    ).to_empty(device="cpu")
    bag = ebc.embedding_bags["t"]
    with torch.no_grad():
        bag.weight.normal_(0, 0.01)
    sparse_table_gradients(ebc)
    opt = RowwiseAdamW([bag.weight], lr=1e-3, weight_decay=0.01)
    opt.init_state()
    return ebc, bag, opt


class DenseKernelTable(torch.nn.Module):
    """One table in fbgemm's DENSE kernel, called with a KJT like the EBC; `sparse` switches its gradient."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.tbe = DenseTableBatchedEmbeddingBagsCodegen([(rows, dim)], pooling_mode=PoolingMode.SUM, use_cpu=True)
        with torch.no_grad():
            self.tbe.weights.normal_(0, 0.01)
        self.dense_forward = self.tbe.forward
        sparse_dense_kernel_gradients(self.tbe)
        self.sparse_forward = self.tbe.forward
        self.sparse = True

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        lookup = self.sparse_forward if self.sparse else self.dense_forward
        return lookup(kjt.values(), kjt.offsets())


def build_dense_kernel(rows: int, dim: int) -> tuple[DenseKernelTable, DenseKernelTable, RowwiseAdamW]:
    table = DenseKernelTable(rows, dim)
    opt = RowwiseAdamW([table.tbe.weights], lr=1e-3, weight_decay=0.01, segments=[(0, rows, dim)])
    opt.init_state()
    return table, table, opt


def batch(rows: int, bags: int, per_bag: int, seed: int) -> KeyedJaggedTensor:
    """The same ids (up to spreading) for every table size: `SLOTS` slots mapped to rows slot * rows // SLOTS."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, min(SLOTS, rows), (bags * per_bag,), generator=g)
    ids = slots * (rows // min(SLOTS, rows))
    return KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.full((bags,), per_bag))


def step(table: torch.nn.Module, opt: RowwiseAdamW, kjt: KeyedJaggedTensor, coef: torch.Tensor) -> float:
    """Seconds for forward + backward + optimizer step + zero_grad."""
    t0 = time.perf_counter()
    out = table(kjt)
    pooled = out if isinstance(out, torch.Tensor) else out.values()  # the EBC returns a KeyedTensor
    (pooled * coef).sum().backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0


def measure(rows: int, args: argparse.Namespace) -> dict:
    """Median step seconds of both paths on one table, alternating dense and sparse steps."""
    ebc, bag, opt = (build if args.kernel == "ebc" else build_dense_kernel)(rows, args.dim)
    kjt = batch(rows, args.bags, args.ids_per_bag, args.seed)
    coef = torch.randn(args.bags, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for i in range(args.warmup + args.steps):
        for path in ("dense", "sparse"):
            bag.sparse = path == "sparse"
            seconds = step(ebc, opt, kjt, coef)
            if i >= args.warmup:
                times[path].append(seconds)
    touched = int(kjt.values().unique().numel())
    del ebc, bag, opt
    gc.collect()
    dense, sparse = (statistics.median(times[p]) * 1e3 for p in ("dense", "sparse"))
    return {"rows": rows, "touched_rows": touched, "dense_ms": round(dense, 3), "sparse_ms": round(sparse, 3),
            "speedup": round(dense / sparse, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--bags", type=int, default=512)
    ap.add_argument("--ids-per-bag", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per path and size (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel", choices=["ebc", "dense_kernel"], default="ebc",
                    help="the table as one-process jobs train it (ebc) or as a rank trains its shard (dense_kernel)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rowwise_adamw.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(r, args) for r in args.rows]
    print(f"{'rows':>12} {'touched':>8} {'dense ms':>10} {'sparse ms':>10} {'dense/sparse':>13}")
    for r in rows:
        print(f"{r['rows']:>12,} {r['touched_rows']:>8} {r['dense_ms']:>10.3f} {r['sparse_ms']:>10.3f} {r['speedup']:>12.2f}x")
    flat = rows[-1]["sparse_ms"] / rows[0]["sparse_ms"]
    result = {
        "benchmark": "rowwise_adamw", "kernel": args.kernel, "dim": args.dim, "bags": args.bags, "ids_per_bag": args.ids_per_bag,
        "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows,
        "sparse_ms_largest_over_smallest": round(flat, 2),
    }
    merge_row(args.out, f"{args.kernel} rows {'_'.join(str(r) for r in args.rows)} dim {args.dim}", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
