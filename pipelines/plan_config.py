"""Config of `lumrec plan`: a topology of GPUs and the embedding tables to place on it.

The built-in default is an internet-scale model on 16 GPUs of 80 GB: a 1B-row item table (dim
256, looked up by the candidate and a 50-id history), 100M users (dim 128) and a few small tables
(dims 128-512). Every key can be overridden (`world_size=64`, `tables.item_id.rows=2000000000`).

    >>> cfg = PlanConfig()
    >>> cfg.world_size, cfg.hbm_gb, sorted(cfg.tables)[:2], cfg.tables["item_id"].rows
    (16, 80.0, ['brand_id', 'category_id'], 1000000000)
    >>> cfg.tables["item_id"].bytes_per_row("fp32", "rowwise_adam")   # weight + per-element momentum
    2048
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from torch import nn

from lumrec.config import ConfigValueError, check_above, check_at_least

__all__ = ["OPTIMIZER_STATE", "PlanConfig", "PlanTableConfig", "default_tables"]

# Optimizer state per weight element the planner is told about (torchrec counts it from the
# parameter's in-backward optimizer class): fbgemm's PARTIAL_ROWWISE_ADAM keeps a per-element first
# moment (1x, plus one per-row second moment: 1/dim, under 1% and not counted by torchrec), Adam 2x.
OPTIMIZER_STATE = {"rowwise_adam": 1, "adam": 2, "sgd": 0}
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
# What fbgemm's CUDA TBE can run for a training job: tables in HBM, in host memory (UVM), or in host
# memory with an HBM cache. Data-parallel (it would drop the fused optimizer) and column-wise splits
# (a row-wise optimizer state over half a row is another optimizer) are not offered by default.
DEFAULT_SHARDING_TYPES = ["table_wise", "row_wise", "table_row_wise"]
DEFAULT_KERNELS = ["fused", "fused_uvm", "fused_uvm_caching"]


@dataclass
class PlanTableConfig:
    """One embedding table: size, and the features (KJT keys) that look it up with their pooling factors."""

    rows: int
    dim: int
    features: list[str] = field(default_factory=list)  # default: one feature named like the table
    pooling_factors: list[float] = field(default_factory=list)  # mean ids per sample per feature; default 1.0 each

    def __post_init__(self) -> None:
        check_at_least(self, 1, "rows", "dim")
        if self.pooling_factors and len(self.pooling_factors) != len(self.features):
            raise ConfigValueError("pooling_factors", f"has {len(self.pooling_factors)} entries for "
                                                      f"{len(self.features)} features {self.features}; give one per feature")
        if any(p <= 0 for p in self.pooling_factors):
            raise ConfigValueError("pooling_factors", f"must all be > 0, got {self.pooling_factors}")

    def bytes_per_row(self, dtype: str, optimizer: str) -> int:
        """Weight plus optimizer state of one row, in bytes (what the planner counts)."""
        return self.dim * DTYPE_BYTES[dtype] * (1 + OPTIMIZER_STATE[optimizer])


def default_tables() -> dict[str, PlanTableConfig]:
    """The issue's example: 1B items, 100M users, dims 128-512, plus small tables."""
    return {
        "item_id": PlanTableConfig(1_000_000_000, 256, ["item_id", "history_item_id"], [1.0, 50.0]),
        "user_id": PlanTableConfig(100_000_000, 128, ["user_id"], [1.0]),
        "category_id": PlanTableConfig(100_000, 512, ["category_id", "history_category_id"], [1.0, 50.0]),
        "brand_id": PlanTableConfig(1_000_000, 256, ["brand_id"], [1.0]),
        "query_id": PlanTableConfig(10_000_000, 128, ["query_id"], [1.0]),
        "scenario": PlanTableConfig(100, 128, ["scenario"], [1.0]),
    }


@dataclass
class PlanConfig:
    """A topology (GPUs, memory per rank, batch) and the tables; `lumrec plan` places them with TorchRec's planner."""

    world_size: int = 16
    local_world_size: int = 8  # GPUs per host
    compute_device: Literal["cuda", "cpu"] = "cuda"
    hbm_gb: float = 80.0  # device memory per rank (GiB, as torchrec counts)
    ddr_gb: float = 128.0  # host memory per rank usable by UVM tables (torchrec's default)
    reserved_fraction: float = 0.15  # of each rank's memory kept for the dense model, activations, buffers
    batch_size: int = 4096  # samples per rank and step
    weight_dtype: Literal["fp32", "fp16"] = "fp32"
    optimizer: Literal["rowwise_adam", "adam", "sgd"] = "rowwise_adam"
    sharding_types: list[str] = field(default_factory=lambda: list(DEFAULT_SHARDING_TYPES))
    compute_kernels: list[str] = field(default_factory=lambda: list(DEFAULT_KERNELS))
    tables: dict[str, PlanTableConfig] = field(default_factory=default_tables)
    out: Optional[str] = None  # JSON file for the plan (also `--out`)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "world_size", "local_world_size", "batch_size")
        check_above(self, 0, "hbm_gb")
        check_at_least(self, 0, "ddr_gb")
        if not 0 <= self.reserved_fraction < 1:
            raise ConfigValueError("reserved_fraction", f"must be in [0, 1), got {self.reserved_fraction}")
        if self.local_world_size > self.world_size:
            raise ConfigValueError("local_world_size", f"({self.local_world_size}) exceeds world_size ({self.world_size})")
        if not self.tables:
            raise ConfigValueError("tables", "is empty; give at least one table (name: {rows: ..., dim: ...})")
        if not self.sharding_types or not self.compute_kernels:
            raise ConfigValueError("sharding_types" if not self.sharding_types else "compute_kernels", "is empty")
        for name, table in self.tables.items():
            if not name.isidentifier() or hasattr(nn.ModuleDict, name):
                # torchrec keeps the tables in an nn.ModuleDict: its method names cannot be table names.
                raise ConfigValueError(f"tables.{name}", "is not a usable table name (a Python identifier that is "
                                                         "not an nn.ModuleDict attribute such as 'items' or 'keys')")
            if not table.features:
                table.features = [name]
            if not table.pooling_factors:
                table.pooling_factors = [1.0] * len(table.features)
            if len(table.pooling_factors) != len(table.features):
                raise ConfigValueError(f"tables.{name}.pooling_factors", "needs one entry per feature")
        seen: dict[str, str] = {}
        for name, table in self.tables.items():
            for f in table.features:
                if f in seen:
                    raise ConfigValueError(f"tables.{name}.features", f"feature {f!r} is already read by table {seen[f]!r}")
                seen[f] = name
