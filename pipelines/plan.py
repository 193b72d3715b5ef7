"""`lumrec plan`: TorchRec's sharding planner on the meta device, for a topology of GPUs and a set of tables.

Nothing is allocated: the tables are an `EmbeddingBagCollection` on the meta device and the
planner (`EmbeddingShardingPlanner`, the one `lumrec.distributed.shard_model` runs) only reads their
shapes, so a 1B-row table plans on a laptop. The topology is `world_size` ranks of `hbm_gb` device
memory and `ddr_gb` host memory each (UVM), `local_world_size` per host; the planner is told the
batch size per rank and each feature's pooling factor, and counts the optimizer state per row
(`optimizer`: fbgemm's PARTIAL_ROWWISE_ADAM by default, the fused kernel lumrec's GPU jobs use).

Printed (and written as JSON with `--out` / `out=`): each table's sharding type, compute kernel,
ranks and shard sizes; memory per rank (HBM and DDR); the planner's perf estimates (forward and
backward compute and communication, ms per step as torchrec's perf model estimates them: a model,
not a measurement) and its search statistics. A table larger than the whole topology, or a set of
tables the planner cannot place, is an error naming the tables and the memory they need.

    >>> cfg = PlanConfig(world_size=2, local_world_size=2, hbm_gb=1.0, ddr_gb=0.0, batch_size=64,
    ...                  tables={"t": PlanTableConfig(rows=1000, dim=16)})
    >>> report = plan(cfg)
    >>> sorted(report["tables"]), report["tables"]["t"]["compute_kernel"]
    (['t'], 'fused')
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.modules.embedding_configs import DataType

from lumrec.config import apply_override, from_dict, load_config, to_dict
from lumrec.data.dataset import write_text_atomic
from lumrec.errors import UserError
from lumrec.optim import RowwiseAdamW
from lumrec.pipelines.plan_config import DTYPE_BYTES, OPTIMIZER_STATE, PlanConfig, PlanTableConfig

__all__ = ["PlanError", "main", "plan", "plan_text"]

log = logging.getLogger(__name__)
GIB = 1024**3
# The planner's storage estimator reads a table's optimizer from its in-backward optimizer classes:
# a class it does not know counts one state tensor like the weight, Adam two (torchrec's shard_estimators).
_STATE_CLASS = {"rowwise_adam": [RowwiseAdamW], "adam": [torch.optim.Adam], "sgd": []}
_DATA_TYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16}
_ROW_SPLITS = ("row_wise", "table_row_wise", "column_wise", "table_column_wise", "grid_shard")
_HOST_KERNELS = ("fused_uvm", "fused_uvm_caching")


class PlanError(UserError):
    """The tables do not fit the topology; the message names the tables and the memory they need."""


def _gb(n_bytes: float) -> float:
    return round(n_bytes / GIB, 3)


def meta_collection(cfg: PlanConfig) -> EmbeddingBagCollection:
    """The tables as an EmbeddingBagCollection on the meta device (shapes only), tagged with their optimizer."""
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=name, num_embeddings=t.rows, embedding_dim=t.dim, feature_names=list(t.features),
                                   data_type=_DATA_TYPE[cfg.weight_dtype]) for name, t in cfg.tables.items()],
        device=torch.device("meta"),
    )
    for param in ebc.parameters():
        if _STATE_CLASS[cfg.optimizer]:
            param._optimizer_classes = list(_STATE_CLASS[cfg.optimizer])  # type: ignore[attr-defined]
    return ebc


def _usable_per_rank(cfg: PlanConfig) -> float:
    """Bytes of one rank the tables may use: HBM, plus host memory where a UVM kernel is allowed."""
    host = cfg.ddr_gb if any(k in _HOST_KERNELS for k in cfg.compute_kernels) else 0.0
    return (cfg.hbm_gb + host) * GIB * (1 - cfg.reserved_fraction)


def _table_needs(cfg: PlanConfig) -> dict[str, float]:
    """Bytes of weight + optimizer state per table, largest first."""
    needs = {name: t.rows * t.bytes_per_row(cfg.weight_dtype, cfg.optimizer) for name, t in cfg.tables.items()}
    return dict(sorted(needs.items(), key=lambda kv: -kv[1]))


def _what_a_table_needs(cfg: PlanConfig, name: str, need: float) -> str:
    t = cfg.tables[name]
    return (f"table {name!r} needs {_gb(need):,} GB ({t.rows:,} rows x {t.dim} x {DTYPE_BYTES[cfg.weight_dtype]} B "
            f"x {1 + OPTIMIZER_STATE[cfg.optimizer]} with {cfg.optimizer} state)")


def check_fits(cfg: PlanConfig) -> None:
    """Raise PlanError naming each table larger than what the whole topology can give one table."""
    spread = any(s in _ROW_SPLITS for s in cfg.sharding_types)
    ranks = cfg.world_size if spread else 1
    capacity = _usable_per_rank(cfg) * ranks
    too_big = [(n, need) for n, need in _table_needs(cfg).items() if need > capacity]
    if too_big:
        where = (f"{ranks} rank(s) x {_gb(_usable_per_rank(cfg)):,} GB usable "
                 f"({cfg.hbm_gb} GB HBM{' + ' + str(cfg.ddr_gb) + ' GB DDR' if any(k in _HOST_KERNELS for k in cfg.compute_kernels) else ''}"
                 f", {cfg.reserved_fraction:.0%} reserved) = {_gb(capacity):,} GB")
        raise PlanError("; ".join(_what_a_table_needs(cfg, n, need) for n, need in too_big)
                        + f", but one table can use at most {where}. Give more ranks (world_size), more memory "
                        "(hbm_gb, ddr_gb), a UVM kernel (compute_kernels), fp16 weights (weight_dtype) or fewer rows")


def _planner(cfg: PlanConfig) -> EmbeddingShardingPlanner:
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=cfg.world_size, local_world_size=cfg.local_world_size,
                                     hbm_cap_bytes=int(cfg.hbm_gb * GIB), ddr_cap_bytes=int(cfg.ddr_gb * GIB)),
        kernel_config=KernelConfig(compute_device=cfg.compute_device),
    )
    constraints = {
        name: ParameterConstraints(sharding_types=list(cfg.sharding_types), compute_kernels=list(cfg.compute_kernels),
                                   pooling_factors=list(t.pooling_factors))
        for name, t in cfg.tables.items()
    }
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=cfg.batch_size, constraints=constraints, debug=False,
        storage_reservation=FixedPercentageStorageReservation(cfg.reserved_fraction), stats=[NoopEmbeddingStats()],
    )


def _perf(so: ShardingOption) -> dict[str, float]:
    """The planner's perf estimate of one table summed over its shards (ms per step, torchrec's perf model)."""
    keys = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "input_dist_comms", "prefetch_compute")
    out = {k: round(sum(getattr(s.perf, k) for s in so.shards), 4) for k in keys}
    out["total"] = round(sum(s.perf.total for s in so.shards), 4)
    return out


def _table_report(cfg: PlanConfig, so: ShardingOption) -> dict[str, Any]:
    t = cfg.tables[so.name]
    return {
        "rows": t.rows, "dim": t.dim, "features": list(t.features), "pooling_factors": list(t.pooling_factors),
        "needs_gb": _gb(t.rows * t.bytes_per_row(cfg.weight_dtype, cfg.optimizer)),
        "sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
        "ranks": sorted({s.rank for s in so.shards}),
        "shards": [{"rank": s.rank, "offset": list(s.offset), "size": list(s.size), "hbm_gb": _gb(s.storage.hbm),
                    "ddr_gb": _gb(s.storage.ddr), "perf_ms": round(s.perf.total, 4)} for s in so.shards],
        "hbm_gb": _gb(sum(s.storage.hbm for s in so.shards)), "ddr_gb": _gb(sum(s.storage.ddr for s in so.shards)),
        "perf_ms": _perf(so),
    }


def _rank_report(cfg: PlanConfig, best: list[ShardingOption]) -> list[dict[str, Any]]:
    ranks = [{"rank": r, "hbm_gb": 0.0, "ddr_gb": 0.0, "perf_ms": 0.0, "tables": []} for r in range(cfg.world_size)]
    for so in best:
        for s in so.shards:
            row = ranks[s.rank]
            row["hbm_gb"] += s.storage.hbm / GIB
            row["ddr_gb"] += s.storage.ddr / GIB
            row["perf_ms"] += s.perf.total
            if so.name not in row["tables"]:
                row["tables"].append(so.name)
    for row in ranks:
        row["hbm_gb"], row["ddr_gb"], row["perf_ms"] = round(row["hbm_gb"], 3), round(row["ddr_gb"], 3), round(row["perf_ms"], 4)
    return ranks


def plan(cfg: PlanConfig) -> dict[str, Any]:
    """Run the planner on the meta device; the report (config, plan per table, memory and perf per rank, search stats)."""
    check_fits(cfg)
    planner = _planner(cfg)
    ebc = meta_collection(cfg)
    start = time.perf_counter()
    try:
        sharding_plan = planner.plan(ebc, [EmbeddingBagCollectionSharder()])
    except PlannerError as err:
        needs = ", ".join(f"{n} {_gb(b):,} GB" for n, b in _table_needs(cfg).items())
        total = _usable_per_rank(cfg) * cfg.world_size
        raise PlanError(
            f"TorchRec's planner placed no plan for {cfg.world_size} ranks: the tables need {needs} "
            f"(weights + {cfg.optimizer} state; {_gb(sum(_table_needs(cfg).values())):,} GB in all, "
            f"{_gb(total):,} GB usable over all ranks before batch buffers). Give more ranks or memory, "
            f"or a smaller batch_size ({cfg.batch_size}). Planner: {str(err).splitlines()[0]}"
        ) from None
    seconds = time.perf_counter() - start
    best = planner._best_plan or []  # torchrec keeps the chosen sharding options (with estimates) here
    ranks = _rank_report(cfg, best)
    tables = {so.name: _table_report(cfg, so) for so in best}
    missing = set(cfg.tables) - set(tables)
    if missing or set(sharding_plan.plan.get("", {})) != set(cfg.tables):
        raise RuntimeError(f"lumrec plan: the planner's plan misses tables {sorted(missing)}")
    perf = [r["perf_ms"] for r in ranks]
    return {
        "config": to_dict(cfg),
        "topology": {"world_size": cfg.world_size, "local_world_size": cfg.local_world_size, "compute_device": cfg.compute_device,
                     "hbm_gb_per_rank": cfg.hbm_gb, "ddr_gb_per_rank": cfg.ddr_gb, "batch_size_per_rank": cfg.batch_size},
        "tables": tables,
        "ranks": ranks,
        "summary": {
            "tables_gb": _gb(sum(_table_needs(cfg).values())),
            "hbm_gb_max": max(r["hbm_gb"] for r in ranks), "hbm_gb_min": min(r["hbm_gb"] for r in ranks),
            "ddr_gb_max": max(r["ddr_gb"] for r in ranks), "ddr_gb_min": min(r["ddr_gb"] for r in ranks),
            "perf_ms_max": max(perf), "perf_ms_median": round(statistics.median(perf), 4),
            "kernels": sorted({t["compute_kernel"] for t in tables.values()}),
        },
        "planner": {"seconds": round(seconds, 3), "proposals": planner._num_proposals, "plans": planner._num_plans,
                    "reserved_fraction": cfg.reserved_fraction},
    }


def _ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def plan_text(report: dict[str, Any]) -> str:
    """The report as printed tables: one row per table, then memory and estimates per rank (or their spread)."""
    topo, s = report["topology"], report["summary"]
    lines = [f"{topo['world_size']} x {topo['compute_device']} ranks ({topo['local_world_size']} per host), "
             f"{topo['hbm_gb_per_rank']} GB HBM + {topo['ddr_gb_per_rank']} GB DDR each, batch {topo['batch_size_per_rank']} per rank; "
             f"planner: {report['planner']['proposals']} proposals, {report['planner']['plans']} plans, {report['planner']['seconds']} s", ""]
    # est. ms: the slowest shard's estimate (its rank pays it each step); HBM/DDR GB: over all shards.
    lines.append(f"{'table':<14} {'rows':>15} {'dim':>4} {'GB':>9} {'sharding':<15} {'kernel':<18} {'ranks':<12} "
                 f"{'HBM GB':>9} {'DDR GB':>9} {'shard ms':>9}")
    for name, t in report["tables"].items():
        lines.append(f"{name:<14} {t['rows']:>15,} {t['dim']:>4} {t['needs_gb']:>9,.1f} {t['sharding_type']:<15} "
                     f"{t['compute_kernel']:<18} {_ranks_text(t['ranks']):<12} {t['hbm_gb']:>9,.1f} {t['ddr_gb']:>9,.1f} "
                     f"{max(sh['perf_ms'] for sh in t['shards']):>9.2f}")
    lines.append("")
    ranks = report["ranks"]
    if len(ranks) <= 16:
        lines.append(f"{'rank':>4} {'HBM GB':>9} {'DDR GB':>9} {'est. ms':>9}  tables")
        for r in ranks:
            lines.append(f"{r['rank']:>4} {r['hbm_gb']:>9,.2f} {r['ddr_gb']:>9,.2f} {r['perf_ms']:>9.2f}  {', '.join(r['tables'])}")
    lines.append(f"per rank: HBM {s['hbm_gb_min']:,.2f}-{s['hbm_gb_max']:,.2f} GB of {topo['hbm_gb_per_rank']}, "
                 f"DDR {s['ddr_gb_min']:,.2f}-{s['ddr_gb_max']:,.2f} GB of {topo['ddr_gb_per_rank']}; "
                 f"estimated ms per step (planner's perf model, sum over a rank's shards): median {s['perf_ms_median']:.2f}, "
                 f"max {s['perf_ms_max']:.2f}")
    return "\n".join(lines)


def load_plan_config(config: str | None, overrides: list[str] | None) -> PlanConfig:
    """A YAML file of PlanConfig keys, or the built-in default, with `key.sub=value` overrides.

    `lumrec plan world_size=64` (no file) reaches here with the first override as `config`.
    """
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    if config is not None:
        return load_config(PlanConfig, config, overrides)
    data = to_dict(PlanConfig())
    for item in overrides or []:
        apply_override(data, item, source="<built-in plan config>")
    return from_dict(PlanConfig, data, source="<built-in plan config>")


def main(args: argparse.Namespace) -> int:
    """`lumrec plan [CONFIG] [key=value ...] [--out FILE]`."""
    # The planner logs each proposer and partitioner pass at INFO: the report below says what matters.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.WARNING)
    cfg = load_plan_config(getattr(args, "config", None), list(getattr(args, "overrides", None) or []))
    out = getattr(args, "out", None) or cfg.out
    report = plan(cfg)
    print(plan_text(report))
    if out:
        write_text_atomic(Path(out), json.dumps(report, indent=2))
        print(f"plan written to {out}")
    return 0
