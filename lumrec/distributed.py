"""Run the same training code on 1 or N ranks: process group, sharding plan, DMP, dense optimizer.

    ctx = init_distributed()                       # torchrun/torchx env vars, or a 1-rank group
    dmp = shard_model(model, ctx, fused_params_for(ctx.device, lr=1e-3))
    opt = dense_optimizer(dmp, lr=1e-3)
    loss = global_mean_loss(local_mean_loss, local_batch_size, ctx)   # = local mean for equal batches
    loss.backward(); opt.step(); opt.zero_grad()   # table rows were updated inside backward

Gradient convention (checked by tests/test_distributed.py with SGD, whose update is linear in
the gradient, so any scale error shows). DDP averages the dense gradients over ranks, and
torchrec 1.8 divides the table gradients by the world size in the backward of its pooled
all-to-all and reduce-scatter (`torchrec.distributed.comm_ops.GRADIENT_DIVISION`, on by
default), so both get the mean over ranks of each rank's gradient. With every rank
back-propagating its local *mean* loss over equal local batches, that is the gradient of the
mean loss over the global batch: 1 rank on B samples and N ranks on B/N each train alike.
`global_mean_loss` rescales the local mean when local batch sizes differ.

Table optimizers are fused (they run inside backward): fbgemm fused params (`{"optimizer":
EmbOptimType..., "learning_rate": ...}`) go to torchrec's stock sharders and FUSED kernel; the
RowwiseAdamW form of `lumrec.optim.fused_params_for` (fbgemm's CPU kernel has no Adam) goes to
lumrec's RowwiseAdamW sharders and the DENSE kernel. torchrec 1.8's planner validates DENSE only
for data-parallel tables, so those tables are planned for FUSED (same weights per shard) and the
plan names DENSE (`lumrec.optim.sharding.as_dense_kernel_plan`). Both pooled
(EmbeddingBagCollection) and sequence (EmbeddingCollection) tables are sharded; tables built on
meta (`lumrec.meta_tables.tables_on_meta`) get, in each shard, the rows the CPU build holds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Collection, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from lumrec.meta_tables import materialise_shards, table_init_tapes
from lumrec.optim.rowwise_adamw import RowwiseAdamW
from lumrec.optim.sharding import (
    RowwiseAdamWEmbeddingBagCollectionSharder,
    RowwiseAdamWEmbeddingCollectionSharder,
    as_dense_kernel_plan,
    dense_kernel_sharding_plan,
)

log = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "init_distributed",
    "shard_model",
    "plan_summary",
    "dense_optimizer",
    "global_mean_loss",
    "load_unsharded_weights",
]

# fbgemm's fused CPU kernel implements only these (fbgemm-gpu-cpu 1.8); anything else fails late.
# Share of each rank's memory the planner keeps as a margin beyond the dense part and the input batches (torchrec's default).
PLANNER_RESERVED_FRACTION = 0.15
_CPU_FUSED_OPTIMIZERS = ("EXACT_SGD", "EXACT_ADAGRAD", "EXACT_ROWWISE_ADAGRAD", "EMAINPLACE_ROWWISE_ADAGRAD")


# ------------------------------------------------------------------------------- process group


@dataclass
class DistContext:
    """Where this process runs: rank, world size, device and whether it owns the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs and writes single-writer files)."""
        return self.rank == 0

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The default (world) process group."""
        return dist.GroupMember.WORLD

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def close(self) -> None:
        """Destroy the process group if `init_distributed` created it; safe to call twice."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name}={raw!r} is not an integer") from None


def init_distributed(backend: Optional[str] = None, device: Optional[torch.device | str] = None) -> DistContext:
    """Join the process group that torchrun/torchx describe in the environment, or make a 1-rank one.

    `backend` None picks nccl when CUDA is available, else gloo; given a job's resolved `device`
    (lumrec.device.resolve_device), nccl on this rank's GPU for a CUDA device and gloo for the CPU.
    Without RANK/WORLD_SIZE in the environment this is a 1-process run: a gloo group of size 1 on an
    in-memory store (no port), so DMP and DDP work unchanged. An already initialised group is reused (and not destroyed by
    `DistContext.close`).
    """
    if backend is None and device is not None:
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"init_distributed: backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("init_distributed: backend 'nccl' needs CUDA, which this torch build does not see")

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: RANK={rank} WORLD_SIZE={world_size} is not a valid rank/world pair")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world_size and "WORLD_SIZE" in os.environ:
            raise ValueError(
                f"init_distributed: a process group of size {dist.get_world_size()} already exists "
                f"but WORLD_SIZE={world_size}"
            )
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    elif "WORLD_SIZE" in os.environ and world_size > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ValueError(
                f"init_distributed: WORLD_SIZE={world_size} but {missing} not set; launch with torchrun or torchx"
            )
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
        owns = True
    else:
        # One process: an in-memory store needs no free port and no rendezvous.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    ctx = DistContext(rank, world_size, local_rank, local_world_size, backend, device, owns)
    log.info("distributed: rank %d/%d (local %d) backend=%s device=%s", rank, world_size, local_rank, backend, device)
    return ctx


# ------------------------------------------------------------------ one process or N ranks


def is_main(ctx: Optional[DistContext]) -> bool:
    """True on rank 0, or in a process that is not part of a group (`ctx` None)."""
    return ctx is None or ctx.is_main


def barrier(ctx: Optional[DistContext]) -> None:
    """Wait for every rank; nothing in a single process."""
    if ctx is not None:
        ctx.barrier()


def from_rank0(ctx: Optional[DistContext], value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself in a single process."""
    if ctx is None or ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(ctx: Optional[DistContext], value: Any) -> Optional[list[Any]]:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others; `[value]` in a single process."""
    if ctx is None or ctx.world_size == 1:
        return [value]
    out: Optional[list[Any]] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def any_rank(ctx: Optional[DistContext], flag: bool) -> bool:
    """True on every rank if `flag` is true on any (ranks must take the same decisions)."""
    if ctx is None or ctx.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# ---------------------------------------------------------------------------------- sharding


def _table_collections(model: nn.Module) -> dict[str, nn.Module]:
    """Every EmbeddingBagCollection and EmbeddingCollection in `model`, by module FQN (outermost only)."""

    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (EmbeddingBagCollection, EmbeddingCollection)) and not any(name.startswith(f + ".") for f in found):
            found[name] = mod
    return found


def _table_configs(module: nn.Module) -> list[Any]:
    if isinstance(module, EmbeddingBagCollection):
        return list(module.embedding_bag_configs())
    return list(module.embedding_configs())


def _table_kind(table_optimizer: Mapping[str, Any], device: torch.device) -> str:
    """'fused' (fbgemm fused params) or 'rowwise_adamw' (lumrec's CPU form); anything else is an error."""

    if "optimizer" in table_optimizer:
        name = getattr(table_optimizer["optimizer"], "name", str(table_optimizer["optimizer"]))
        if device.type == "cpu" and name not in _CPU_FUSED_OPTIMIZERS:
            raise ValueError(
                f"shard_model: fused optimizer {name} has no fbgemm CPU kernel (CPU has {list(_CPU_FUSED_OPTIMIZERS)}); "
                "for Adam-style tables on CPU pass lumrec.optim.fused_params_for('cpu', ...) (RowwiseAdamW)"
            )
        return "fused"
    if "optimizer_class" in table_optimizer:
        if table_optimizer["optimizer_class"] is not RowwiseAdamW:
            raise ValueError(
                f"shard_model: optimizer_class {table_optimizer['optimizer_class']!r} is not RowwiseAdamW; "
                "give fbgemm fused params ({'optimizer': EmbOptimType..., 'learning_rate': ...}) for others"
            )
        return "rowwise_adamw"
    raise ValueError(
        f"shard_model: table_optimizer has keys {sorted(table_optimizer)}; expected fbgemm fused params "
        "(with 'optimizer') or lumrec.optim.fused_params_for(...) output (with 'optimizer_class')"
    )


def _sharders_for(kind: str, table_optimizer: Mapping[str, Any]) -> list[Any]:
    """[EBC sharder, EC sharder] for the table optimizer: torchrec's stock ones (fused) or lumrec's RowwiseAdamW ones."""
    if kind == "fused":
        return [EmbeddingBagCollectionSharder(fused_params=dict(table_optimizer)),
                EmbeddingCollectionSharder(fused_params=dict(table_optimizer))]
    kwargs = dict(table_optimizer["optimizer_kwargs"])
    return [RowwiseAdamWEmbeddingBagCollectionSharder(optimizer_kwargs=kwargs),
            RowwiseAdamWEmbeddingCollectionSharder(optimizer_kwargs=kwargs)]


def _constraints(
    kind: str, table_optimizer: Mapping[str, Any], sharders: list[Any], collections: Mapping[str, nn.Module], device_type: str,
    pooled_sharding_types: Optional[Collection[str]] = None,
) -> dict[str, Any]:
    """Per-table planner constraints: never data-parallel, and the kernel that runs our optimizer.

    Data-parallel tables would silently drop the fused optimizer (they become DDP parameters
    updated by the dense optimizer), so they are excluded. Row-wise optimizers keep one state per
    row; a column-wise split would turn it into one per half row, so those are excluded too.
    RowwiseAdamW tables are planned for the FUSED kernel (`planner_view`: the planner validates
    DENSE only for data-parallel tables) and run on DENSE (`as_dense_kernel_plan`).
    """

    opt_name = getattr(table_optimizer.get("optimizer"), "name", "")
    out = {}
    for module in collections.values():
        sharder = next(s for s in sharders if isinstance(module, s.module_type))
        types = [t for t in sharder.sharding_types(device_type) if t != ShardingType.DATA_PARALLEL.value]
        if kind == "rowwise_adamw" or "ROWWISE" in opt_name:
            types = [t for t in types if t not in (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value)]
        if pooled_sharding_types is not None and isinstance(module, EmbeddingBagCollection):
            unknown = set(pooled_sharding_types) - set(types)
            if unknown:
                raise ValueError(f"shard_model: pooled_sharding_types {sorted(unknown)} are not among {types}")
            types = [t for t in types if t in pooled_sharding_types]
        for cfg in _table_configs(module):
            out[cfg.name] = ParameterConstraints(sharding_types=list(types), compute_kernels=["fused"])
    return out


_LOGGED_ONCE: set[str] = set()


def _log_once(key: str, message: str) -> None:
    """Log an expected, explained condition at INFO once per process instead of at every occurrence."""
    if key not in _LOGGED_ONCE:
        _LOGGED_ONCE.add(key)
        log.info("%s", message)


def _plan_on_rank0(planner: Any, model: nn.Module, sharders: list[Any], ctx: DistContext) -> tuple[Any, Optional[str]]:
    """(plan, None) or (None, error) from the planner run on rank 0 and broadcast.

    torchrec's `collective_plan` leaves the other ranks waiting in the broadcast when rank 0's
    planner raises; here the error travels instead, so every rank falls back together.
    """
    result: list[Any] = [None]
    if ctx.rank == 0:
        try:
            result[0] = ("ok", planner.plan(model, sharders))
        except Exception as err:  # the planner raises PlannerError, AssertionError, ...
            result[0] = ("error", f"{type(err).__name__}: {err}")
    if ctx.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    return (value, None) if status == "ok" else (None, value)


def plan_summary(plan: Any) -> list[str]:
    """One line per table of a ShardingPlan: module.table, sharding type, kernel, ranks."""
    lines = []
    for fqn, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            lines.append(f"{fqn}.{table}: {ps.sharding_type} kernel={ps.compute_kernel} ranks={ps.ranks}")
    return lines


def _unsharded_tables(ebcs: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The tables' current weights by state-dict key (skipped for tables on meta: nothing to copy)."""
    out = {}
    for fqn, ebc in ebcs.items():
        for key, value in ebc.state_dict().items():
            if value.device.type != "meta":
                out[f"{fqn}.{key}" if fqn else key] = value.detach()
    return out


@torch.no_grad()
def load_unsharded_weights(dmp: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy full (unsharded) tensors into a sharded model's local shards and dense parameters; return the keys copied.

    Each rank copies only its own rows/columns of a sharded table. `strict`: every tensor of
    `state_dict` must name a key of the model with the full shape, else a ValueError names it.
    """
    target = dmp.state_dict()
    copied = []
    for key, full in state_dict.items():
        if key not in target:
            if strict:
                raise ValueError(f"load_unsharded_weights: key {key!r} is not in the sharded model; keys: {sorted(target)}")
            continue
        dst = target[key]
        if tuple(dst.shape) != tuple(full.shape):
            raise ValueError(f"load_unsharded_weights: {key!r} has shape {tuple(full.shape)}, the model {tuple(dst.shape)}")
        if hasattr(dst, "local_shards"):
            for shard in dst.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
        else:
            dst.copy_(full)
        copied.append(key)
    return copied


def shard_model(
    model: nn.Module,
    ctx: DistContext,
    table_optimizer: Mapping[str, Any],
    plan: Union[Literal["auto"], Any] = "auto",
    copy_weights: bool = True,
    pooled_sharding_types: Optional[Collection[str]] = None,
) -> Any:
    """Shard `model`'s EmbeddingBagCollections and EmbeddingCollections with fused table optimizers; wrap the rest in DDP.

    `table_optimizer`: fbgemm fused params, or `lumrec.optim.fused_params_for(device, ...)`.
    `plan`: "auto" (TorchRec's EmbeddingShardingPlanner on a Topology of `ctx.world_size` ranks
    of `ctx.device`'s type; RowwiseAdamW tables are planned for the FUSED kernel and run on DENSE,
    see `lumrec.optim.sharding`) or an explicit ShardingPlan. The plan is logged on rank 0, one
    line per table. `copy_weights` copies the tables' weights into the shards (DMP re-initialises
    them), so a model built and seeded alike on every rank, or warm-started, keeps its weights;
    tables built on meta inside `lumrec.meta_tables.tables_on_meta()` get, in each shard, the rows
    the CPU build would hold (no rank holds a whole table). `pooled_sharding_types` limits the
    planner's choices for pooled (EmbeddingBagCollection) tables (None: any type the sharder
    offers, less data-parallel and, for row-wise optimizers, column-wise). torchrec's row-wise
    and table-row-wise pooled outputs are a reduce-scatter over equal local batches
    ("ProcessGroupGloo::allgather: invalid tensor size" in backward otherwise): pad every rank's
    batch to one size with samples kept out of the loss (`lumrec rank` does), or pass
    `("table_wise",)` where local batch sizes differ.
    Returns the DistributedModelParallel; its dense part is wrapped in DDP by DMP.
    """

    if not dist.is_initialized():
        raise RuntimeError("shard_model: no process group; call lumrec.distributed.init_distributed() first")
    if not get_gradient_division():
        # Then tables get the SUM over ranks while DDP averages the dense part: N ranks would
        # train the tables with N times the learning rate of a 1-rank run.
        log.warning("shard_model: torchrec gradient division is off; table gradients are summed over ranks, dense ones averaged")
    collections = _table_collections(model)
    if not collections:
        raise ValueError(f"shard_model: {type(model).__name__} has no EmbeddingBagCollection or EmbeddingCollection to shard")
    kind = _table_kind(table_optimizer, ctx.device)
    sharders = _sharders_for(kind, table_optimizer)
    full_tables = _unsharded_tables(collections) if copy_weights else {}
    tapes = table_init_tapes(collections) if copy_weights else {}

    source = "explicit"
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"shard_model: plan must be 'auto' or a ShardingPlan, got {plan!r}")
        plan, source = _auto_plan(model, ctx, kind, table_optimizer, sharders, collections, pooled_sharding_types)
    elif not isinstance(plan, ShardingPlan):
        raise ValueError(f"shard_model: plan must be 'auto' or a ShardingPlan, got {type(plan).__name__}")

    if ctx.is_main:
        for line in plan_summary(plan):
            log.info("plan (%s): %s", source, line)

    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=plan, sharders=sharders)
    if full_tables:
        load_unsharded_weights(dmp, full_tables)
    if tapes:
        materialise_shards(dmp, tapes)

    wrapped = dmp._dmp_wrapped_module
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        ignored = set(getattr(wrapped, "parameters_to_ignore", ()))
        n_dense = sum(1 for n, p in wrapped.module.named_parameters() if p.requires_grad and n not in ignored)
        if ctx.is_main:
            log.info("dense part: DistributedDataParallel over %d parameter tensors (gradients averaged over ranks)", n_dense)
    elif ctx.is_main:
        log.info("dense part: no DDP wrapper (the model has no parameters outside the sharded tables)")
    # Kept on the DMP: the sharders, and the RowwiseAdamW instances they attached (none when fused).
    dmp.lumrec_table_sharder = sharders[0]
    dmp.lumrec_table_sharders = sharders
    dmp.lumrec_table_optimizers = [o for sh in sharders for o in getattr(sh, "attached_optimizers", [])]
    dmp.lumrec_plan_source = source
    return dmp


def _auto_plan(
    model: nn.Module, ctx: DistContext, kind: str, table_optimizer: Mapping[str, Any], sharders: list[Any],
    collections: Mapping[str, nn.Module], pooled_sharding_types: Optional[Collection[str]] = None,
) -> tuple[ShardingPlan, str]:
    """(plan, source): TorchRec's planner's plan ("planner"); for RowwiseAdamW, if the planner fails, a table-wise one ("fallback")."""
    # The factory, not Topology(...): torchrec 1.8 warns that direct construction will fail later.
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=ctx.world_size, local_world_size=ctx.local_world_size),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )
    constraints = _constraints(kind, table_optimizer, sharders, collections, ctx.device.type, pooled_sharding_types)
    # torchrec's own reservation (a share of memory, the dense part's parameters and optimizer state,
    # the input batches: what a GPU rank needs beside its tables), made explicit; no stats table:
    # shard_model logs the plan itself, one line per table.
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                       storage_reservation=HeuristicalStorageReservation(PLANNER_RESERVED_FRACTION),
                                       stats=[NoopEmbeddingStats()])
    planned = [s.planner_view() for s in sharders] if kind == "rowwise_adamw" else sharders
    plan, error = _plan_on_rank0(planner, model, planned, ctx)
    if plan is not None:
        return (as_dense_kernel_plan(plan, collections) if kind == "rowwise_adamw" else plan), "planner"
    if kind != "rowwise_adamw":
        raise RuntimeError(f"shard_model: the TorchRec planner found no plan: {error}")
    _log_once(
        "dense-kernel-fallback",
        f"shard_model: TorchRec's planner found no plan for the RowwiseAdamW tables ({error}); they are sharded "
        "table-wise, round-robin over ranks (lumrec.optim.sharding.dense_kernel_sharding_plan)",
    )
    by_type = {type(s): s for s in sharders}
    fallback = {}
    for fqn, module in collections.items():
        sharder = next(s for s in by_type.values() if isinstance(module, s.module_type))
        fallback[fqn] = dense_kernel_sharding_plan(module, ctx.world_size, sharder, local_size=ctx.local_world_size,
                                                   device_type=ctx.device.type)
    return ShardingPlan(fallback), "fallback"


# ------------------------------------------------------------------------ dense optimization


def dense_optimizer(
    dmp: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
    exclude: Collection[str] = (),
    **kwargs: Any,
) -> Any:
    """A torchrec CombinedOptimizer: the fused table optimizers plus `optimizer_class` (AdamW) on the dense parameters.

    `betas` and `eps` apply to Adam/AdamW only; other classes get `weight_decay` (when nonzero)
    and `**kwargs`. `exclude`: FQNs of parameters kept out of the dense part because the caller
    gives them an optimizer of their own (e.g. unsharded embedding tables under RowwiseAdamW).

    Why torchrec's keyed optimizers and not a bare AdamW: their state_dict names every state by
    its parameter FQN (a bare optimizer numbers parameters, and that order depends on the plan)
    and carries the fused tables' state as sharded tensors, which is what DCP saves. The fused
    part's step() is a no-op (its update ran in backward). RowwiseAdamW tables (DENSE kernel)
    are in neither part: see `dmp.lumrec_table_sharder.attached_optimizers`, and
    `lumrec.optim.rowwise_adamw_table_state(dmp)` for their state in checkpointable form.
    """

    # Drop the sharded modules' parameters by name too: the DENSE kernel lists per-table views of
    # its flat weight that carry no in-backward marker, and AdamW must never touch a table.
    sharded = tuple(f"{fqn}." for fqn in dmp.plan.plan)
    excluded = set(exclude)
    unknown = excluded - {k for k, _ in dmp.named_parameters()}
    if unknown:
        raise ValueError(f"dense_optimizer: exclude names parameter(s) {sorted(unknown)[:5]} that the model does not have")
    dense = {
        k: v
        for k, v in in_backward_optimizer_filter(dmp.named_parameters())
        if v.requires_grad and not k.startswith(sharded) and k not in excluded
    }
    if optimizer_class in (torch.optim.AdamW, torch.optim.Adam):
        kwargs = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)
    elif weight_decay:
        kwargs = dict(weight_decay=weight_decay, **kwargs)
    optimizers: list[tuple[str, Any]] = [("fused", dmp.fused_optimizer)]
    if dense:
        optimizers.append(("dense", KeyedOptimizerWrapper(dense, lambda params: optimizer_class(params, lr=lr, **kwargs))))
    return CombinedOptimizer(optimizers)


def global_mean_loss(local_loss: torch.Tensor, local_batch_size: int, ctx: DistContext, global_batch_size: Optional[int] = None) -> torch.Tensor:
    """This rank's mean loss rescaled so that averaging over ranks gives the global mean: * world * local_B / global_B.

    Gradients are averaged over ranks (DDP and torchrec's gradient division), so back-propagating
    this gives every parameter the gradient of the mean loss over the global batch, also when
    local batch sizes differ; with equal ones it returns `local_loss` unchanged. The values
    summed over ranks and divided by the world size is the global mean loss.
    `global_batch_size` None all-reduces the local sizes (one tiny collective).
    """
    if global_batch_size is None:
        if ctx.world_size == 1:
            global_batch_size = local_batch_size
        else:
            size = torch.tensor([float(local_batch_size)])
            dist.all_reduce(size)
            global_batch_size = int(size.item())
    if global_batch_size <= 0:
        raise ValueError(f"global_mean_loss: global batch size must be > 0, got {global_batch_size}")
    return local_loss * (float(ctx.world_size * local_batch_size) / float(global_batch_size))
