"""Row-wise AdamW under DistributedModelParallel where fbgemm has no fused kernel for it (CPU).

fbgemm's fused CPU kernel supports only EXACT_SGD / EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD /
EMAINPLACE_ROWWISE_ADAGRAD, so on CPU the tables are sharded with the non-fused
`EmbeddingComputeKernel.DENSE` kernel and `RowwiseAdamW` runs as an optimizer in backward on
each kernel's weight. Three torchrec details make that need a sharder and a plan of our own:

* `EmbeddingBagCollectionSharder.compute_kernels` offers DENSE only for DATA_PARALLEL, and
  torchrec 1.8's planner rejects any other DENSE plan ("DENSE kernel requires DATA_PARALLEL
  sharding" in `validate_compute_kernels`). So the planner sees each sharder's `planner_view`,
  which offers the FUSED kernel (the same weights per shard), and `as_dense_kernel_plan` names
  the DENSE kernel in the plan it returns: placement and sharding types stay the planner's.
  `dense_kernel_sharding_plan` builds a plan without the planner (explicit row-wise tables, tests).
* torchrec maps the in-backward optimizer class of a table onto an fbgemm `EmbOptimType` while
  sharding and raises "Cannot cast ... to an EmbOptimType" for any class it does not know; and
  the DENSE kernel replaces the table's parameter by one flat tensor per group of tables, so an
  optimizer attached before sharding would be lost anyway.

`RowwiseAdamWEmbeddingBagCollectionSharder` and `RowwiseAdamWEmbeddingCollectionSharder`
(sequence tables) therefore offer DENSE for table-wise and row-wise sharding, take the
`RowwiseAdamW` kwargs from the tables (set by `apply_optimizer_in_backward` before DMP) or from
their own `optimizer_kwargs`, hide them from torchrec while they shard, and attach `RowwiseAdamW`
in backward to each DENSE kernel's flat weight with that weight's table layout as `segments`.
Kernels fbgemm cannot serve (unpooled lookups on CPU, devices without its kernel) get a PyTorch
forward (`lumrec.optim.dense_lookup`). Column-wise sharding is not offered: a row-wise second
moment over half a row is a different optimizer (fbgemm's row-wise optimizers have the same caveat).
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbedding, BatchedDenseEmbeddingBag
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from lumrec.optim.dense_lookup import sharded_submodules, use_torch_lookup_where_needed
from lumrec.optim.rowwise_adamw import RowwiseAdamW, Segment
from lumrec.optim.sparse_kernel_grads import sparse_dense_kernel_gradients

_IN_BACKWARD_ATTRS = ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs")
SUPPORTED_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value)


def dense_kernel_segments(kernel: nn.Module) -> list[Segment]:
    """(offset, rows, dim) of every table inside a torchrec DENSE kernel's flat weight."""
    emb = kernel.emb_module  # fbgemm DenseTableBatchedEmbeddingBagsCodegen
    offsets = emb.weights_physical_offsets
    return [(int(offsets[t]), int(rows), int(dim)) for t, (rows, dim) in enumerate(emb.embedding_specs)]


def iter_dense_kernels(module: nn.Module) -> Iterator[nn.Module]:
    """Every torchrec DENSE embedding kernel under `module`, sharded modules' lookups included (`sharded_submodules`)."""
    for sub in sharded_submodules(module):
        if isinstance(sub, (BatchedDenseEmbeddingBag, BatchedDenseEmbedding)):
            yield sub


def attach_rowwise_adamw_to_dense_kernels(
    module: nn.Module,
    kwargs_by_table: dict[str, dict[str, Any]],
) -> list[RowwiseAdamW]:
    """Attach RowwiseAdamW in backward to every DENSE kernel under `module`; return the optimizers.

    A kernel holds several tables in one weight, so its tables must share one kwargs dict;
    a kernel none of whose tables is in `kwargs_by_table` is left alone.
    """
    attached: list[RowwiseAdamW] = []
    for kernel in iter_dense_kernels(module):
        names = [t.name for t in kernel.config.embedding_tables]
        found = {n: kwargs_by_table[n] for n in names if n in kwargs_by_table}
        if not found:
            continue
        distinct = {repr(sorted(k.items())) for k in found.values()}
        if len(found) != len(names) or len(distinct) != 1:
            raise ValueError(
                f"RowwiseAdamW: tables {names} share one DENSE kernel but have different optimizer "
                f"settings {found}; give them the same kwargs"
            )
        weight = kernel.emb_module.weights
        kwargs = dict(next(iter(found.values())), segments=dense_kernel_segments(kernel))
        _apply_optimizer_in_backward(RowwiseAdamW, [weight], kwargs)
        # Row-sparse weight gradients: the step costs O(rows looked up), with the dense kernel's bits.
        sparse_dense_kernel_gradients(kernel.emb_module)
        attached.append(weight._in_backward_optimizers[-1])
    return attached


class _RowwiseAdamWSharding:
    """What the EBC and EC RowwiseAdamW sharders share: kernels, sharding types, optimizer kwargs, shard().

    `optimizer_kwargs` apply to tables that carry no in-backward RowwiseAdamW of their own; tables
    with neither are sharded without an optimizer. `attached_optimizers` lists the optimizers
    created (one per DENSE kernel), e.g. to checkpoint their state.
    """

    attached_optimizers: list[RowwiseAdamW]
    _optimizer_kwargs: Optional[dict[str, Any]]
    _offers_fused_to_planner = False

    def __init__(
        self,
        optimizer_kwargs: Optional[dict[str, Any]] = None,
        fused_params: Optional[dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[dict[str, Any]] = None,
    ) -> None:
        # The torchrec sharder after this mixin in each subclass's MRO.
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)  # type: ignore[call-arg]
        self._optimizer_kwargs = None if optimizer_kwargs is None else dict(optimizer_kwargs)
        self.attached_optimizers = []

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """Table-wise and row-wise: each rank then holds whole rows, so the row state stays exact."""
        return list(SUPPORTED_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        """Only the non-fused DENSE kernel (FUSED in the planner's view: see `planner_view`)."""
        if self._offers_fused_to_planner:
            return [EmbeddingComputeKernel.FUSED.value]
        return [EmbeddingComputeKernel.DENSE.value]

    def planner_view(self) -> Any:
        """This sharder as TorchRec's planner should see it: offering the FUSED kernel.

        torchrec 1.8's planner accepts the DENSE kernel only for data-parallel tables
        (`validate_compute_kernels`: "DENSE kernel requires DATA_PARALLEL sharding"; its sharders
        carry "TODO re-enable model parallel and dense"). The FUSED kernel stores the same weights
        per shard, so the planner places the tables for it, and `as_dense_kernel_plan` then names
        the DENSE kernel that runs RowwiseAdamW in each of its ParameterShardings.
        """
        view = copy.copy(self)
        view._offers_fused_to_planner = True
        return view

    def _table_kwargs(self, module: nn.Module) -> dict[str, dict[str, Any]]:
        """RowwiseAdamW kwargs per table, from in-backward metadata or this sharder's default."""
        out: dict[str, dict[str, Any]] = {}
        for name, param in self.shardable_parameters(module).items():  # type: ignore[attr-defined]
            classes = getattr(param, "_optimizer_classes", None)
            if classes:
                if list(classes) != [RowwiseAdamW]:
                    raise ValueError(
                        f"table {name!r}: in-backward optimizers {classes} are not [RowwiseAdamW]; "
                        "this sharder only runs RowwiseAdamW"
                    )
                out[name] = dict(param._optimizer_kwargs[0])
            elif self._optimizer_kwargs is not None:
                out[name] = dict(self._optimizer_kwargs)
        return out

    def shard(
        self,
        module: nn.Module,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> Any:
        """Shard with torchrec, then attach RowwiseAdamW in backward to the DENSE kernels."""
        for name, ps in params.items():
            if ps.compute_kernel != EmbeddingComputeKernel.DENSE.value:
                raise ValueError(
                    f"table {name!r}: compute kernel {ps.compute_kernel!r} is not 'dense' "
                    "(a planner's plan goes through lumrec.optim.sharding.as_dense_kernel_plan first)"
                )
        kwargs_by_table = self._table_kwargs(module)
        # Hide the in-backward metadata while torchrec shards (it would try to cast our class to
        # an fbgemm EmbOptimType); put it back after, though the unsharded tables are dropped.
        hidden: list[tuple[nn.Parameter, dict[str, Any]]] = []
        for param in self.shardable_parameters(module).values():  # type: ignore[attr-defined]
            saved = {a: getattr(param, a) for a in _IN_BACKWARD_ATTRS if hasattr(param, a)}
            if saved:
                hidden.append((param, saved))
                for a in saved:
                    delattr(param, a)
        try:
            sharded = super().shard(module, params, env, device, module_fqn)  # type: ignore[misc]
        finally:
            for param, saved in hidden:
                for a, v in saved.items():
                    setattr(param, a, v)
        use_torch_lookup_where_needed(sharded)  # unpooled tables on CPU; devices fbgemm has no kernel for
        self.attached_optimizers.extend(attach_rowwise_adamw_to_dense_kernels(sharded, kwargs_by_table))
        return sharded


class RowwiseAdamWEmbeddingBagCollectionSharder(_RowwiseAdamWSharding, EmbeddingBagCollectionSharder):
    """EBC sharder: DENSE kernel, table-/row-wise, RowwiseAdamW in backward on each kernel's weight."""


class RowwiseAdamWEmbeddingCollectionSharder(_RowwiseAdamWSharding, EmbeddingCollectionSharder):
    """EmbeddingCollection (sequence tables, one vector per id) sharder: as the EBC one.

    On CPU its DENSE kernels look rows up with `lumrec.optim.dense_lookup.TorchDenseLookup`:
    fbgemm-gpu-cpu's op would pool them.
    """


RowwiseAdamWSharder = Union[RowwiseAdamWEmbeddingBagCollectionSharder, RowwiseAdamWEmbeddingCollectionSharder]


def rowwise_adamw_sharder_for(module: nn.Module, optimizer_kwargs: Optional[dict[str, Any]] = None) -> RowwiseAdamWSharder:
    """The RowwiseAdamW sharder for `module`: an EmbeddingBagCollection or an EmbeddingCollection."""
    if isinstance(module, EmbeddingBagCollection):
        return RowwiseAdamWEmbeddingBagCollectionSharder(optimizer_kwargs)
    if isinstance(module, EmbeddingCollection):
        return RowwiseAdamWEmbeddingCollectionSharder(optimizer_kwargs)
    raise ValueError(
        f"no RowwiseAdamW sharder for {type(module).__name__}; expected an EmbeddingBagCollection or EmbeddingCollection"
    )


def as_dense_kernel_plan(plan: ShardingPlan, module_fqns: Any) -> ShardingPlan:
    """`plan` (made by the planner with `planner_view` sharders) with the DENSE kernel for the modules `module_fqns`.

    Only the kernel name changes: sharding types, ranks and shard layouts are the planner's.
    Changed in place and returned.
    """
    fqns = set(module_fqns)
    for fqn, module_plan in plan.plan.items():
        if fqn not in fqns:
            continue
        for name, ps in module_plan.items():
            if ps.compute_kernel not in (EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value):
                raise ValueError(f"as_dense_kernel_plan: {fqn}.{name}: kernel {ps.compute_kernel!r} is neither fused nor dense")
            ps.compute_kernel = EmbeddingComputeKernel.DENSE.value
    return plan


def dense_kernel_sharding_plan(
    module: nn.Module,
    world_size: int,
    sharder: Optional[RowwiseAdamWSharder] = None,
    sharding_types: Optional[dict[str, str]] = None,
    local_size: Optional[int] = None,
    device_type: str = "cpu",
) -> EmbeddingModuleShardingPlan:
    """A DENSE-kernel plan for `module`: each table table-wise (ranks round-robin) or row-wise.

    `sharding_types` maps a table name to "table_wise" (default) or "row_wise". Wrap the result as
    `ShardingPlan({module_fqn: plan})` for DistributedModelParallel.
    """
    sharder = sharder or rowwise_adamw_sharder_for(module)
    sharding_types = dict(sharding_types or {})
    names = list(sharder.shardable_parameters(module))
    unknown = set(sharding_types) - set(names)
    if unknown:
        raise ValueError(f"dense_kernel_sharding_plan: unknown tables {sorted(unknown)}; tables are {names}")
    dense = EmbeddingComputeKernel.DENSE.value
    per_table = {}
    next_rank = 0
    for name in names:
        kind = sharding_types.get(name, ShardingType.TABLE_WISE.value)
        if kind == ShardingType.TABLE_WISE.value:
            per_table[name] = table_wise(rank=next_rank % world_size, compute_kernel=dense)
            next_rank += 1
        elif kind == ShardingType.ROW_WISE.value:
            per_table[name] = row_wise(compute_kernel=dense)
        else:
            raise ValueError(
                f"dense_kernel_sharding_plan: table {name!r}: sharding type {kind!r} is not one of "
                f"{list(SUPPORTED_SHARDING_TYPES)}"
            )
    return construct_module_sharding_plan(
        module,
        per_table,
        sharder=sharder,
        local_size=local_size or world_size,
        world_size=world_size,
        device_type=device_type,
    )


def _row_sharded(local: torch.Tensor, table: Any, rows_only: bool) -> Any:
    """`local` (this rank's rows of `table`) as a ShardedTensor laid out like the table's weight.

    `rows_only`: a per-row state ([rows]); else a per-element one ([rows, dim]). Column-wise splits
    are never planned for RowwiseAdamW tables, so every shard holds whole rows.
    """

    def shape(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        return (offsets[:1], sizes[:1]) if rows_only else (list(offsets), list(sizes))

    shards = []
    for m in table.global_metadata.shards_metadata:
        offsets, sizes = shape(m.shard_offsets, m.shard_sizes)
        shards.append(ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=m.placement))
    size = [table.num_embeddings] if rows_only else [table.num_embeddings, table.embedding_dim]
    global_meta = ShardedTensorMetadata(shards_metadata=shards, size=torch.Size(size),
                                        tensor_properties=TensorProperties(dtype=local.dtype))
    lm = table.local_metadata
    offsets, sizes = shape(lm.shard_offsets, lm.shard_sizes)
    local_meta = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=lm.placement)
    return ShardedTensor._init_from_local_shards_and_global_metadata([Shard(local, local_meta)], global_meta)


def rowwise_adamw_table_state(dmp: nn.Module) -> dict[str, dict[str, Any]]:
    """This rank's RowwiseAdamW state of every sharded DENSE-kernel table, keyed by the table's weight FQN.

    The optimizers in backward keep one flat state per DENSE kernel (several tables, laid out by
    `segments`), so neither `dmp.state_dict()` nor torchrec's fused optimizer carries it. Here it
    is cut per table, in the layout an unsharded `RowwiseAdamW` on that table's weight has:
    `exp_avg` [rows, dim], `exp_avg_sq_row` and `row_step` [rows] as ShardedTensors placed like
    the weight's shards, and the kernel's `step`. The tensors are views of (aliases for) the
    optimizer's own state, so DCP saves them and loads a checkpoint into them in place; the
    state is created first if no step has run. FQNs are those of `dmp.state_dict()`.
    """
    out: dict[str, dict[str, Any]] = {}
    root = dmp.module  # the sharded model without DMP/DDP wrappers; plan keys are FQNs in it
    for fqn in dmp.plan.plan:
        sharded = root.get_submodule(fqn)
        attr = "embeddings" if isinstance(sharded, ShardedEmbeddingCollection) else "embedding_bags"
        for kernel in iter_dense_kernels(sharded):
            weight = kernel.emb_module.weights
            opts = [o for o in getattr(weight, "_in_backward_optimizers", []) if isinstance(o, RowwiseAdamW)]
            if not opts:
                continue
            opts[0].init_state()
            state = opts[0].state[weight]
            row = 0
            for table, (off, rows, dim) in zip(kernel.config.embedding_tables, dense_kernel_segments(kernel)):
                key = f"{fqn}.{attr}.{table.name}.weight" if fqn else f"{attr}.{table.name}.weight"
                out[key] = {
                    "step": state["step"],
                    "exp_avg": _row_sharded(state["exp_avg"][off : off + rows * dim].view(rows, dim), table, False),
                    "exp_avg_sq_row": _row_sharded(state["exp_avg_sq_row"][row : row + rows], table, True),
                    "row_step": _row_sharded(state["row_step"][row : row + rows], table, True),
                }
                row += rows
    return out
