"""Checkpoint state of a model whose tables are sharded with RowwiseAdamW in backward (DENSE kernels) and
whose dense rest is under a torchrec keyed dense optimizer, named and laid out like one process's
`torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizers)`.

So DCP moves such checkpoints between world sizes: N ranks write them, any number of ranks (or one
unsharded process) read them. Dense parameters and their AdamW state are replicated tensors (DCP
writes them once); tables and their RowwiseAdamW moments (exp_avg [rows, dim], exp_avg_sq_row and
row_step [rows]) are ShardedTensors over views of the live shards and state, so loading is in place.
Tables on fbgemm's fused kernels (PARTIAL_ROWWISE_ADAM on CUDA) keep the fused optimizer's own state
(ShardedTensors over fbgemm's buffers, loaded in place too): such a checkpoint resumes on fused
kernels; one process reads its weights, not that state.

    state = ShardedCheckpointState(model, dense_optimizer, table_kwargs)   # after shard_model
    tensors = {"model": ..., "optim": ...} = state.state_dict(param_groups=True, table_lr=1e-3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, ShardMetadata, TensorProperties
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

from lumrec.optim import RowwiseAdamW
from lumrec.optim.sharding import dense_kernel_segments, iter_dense_kernels

__all__ = ["ShardedCheckpointState"]


@dataclass
class _TableSlot:
    """Where this rank's shard of one table lives in a DENSE kernel: its RowwiseAdamW, flat weight, segment."""

    optimizer: torch.optim.Optimizer
    weight: torch.Tensor
    offset: int  # first element of the table in the flat weight
    rows: int
    dim: int
    row_base: int  # first row of the table in the optimizer's per-row state


def _sharded_like(weight: ShardedTensor, local_meta: ShardMetadata, local: torch.Tensor, rows_only: bool) -> ShardedTensor:
    """A ShardedTensor placed like `weight` (`rows_only`: its row dimension alone) with `local` as this rank's shard."""

    def cut(m: ShardMetadata) -> ShardMetadata:
        if rows_only:
            return ShardMetadata([m.shard_offsets[0]], [m.shard_sizes[0]], m.placement)
        return ShardMetadata(list(m.shard_offsets), list(m.shard_sizes), m.placement)

    meta = weight.metadata()
    size = torch.Size(list(meta.size)[:1] if rows_only else list(meta.size))
    global_meta = ShardedTensorMetadata([cut(m) for m in meta.shards_metadata], size, TensorProperties(dtype=local.dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata([Shard(local, cut(local_meta))], global_meta)


def _unprefixed(name: str, prefix: str) -> str:
    """A dense optimizer's parameter name as the bare model's (`model.x` -> `x`)."""
    if not name.startswith(prefix):
        raise RuntimeError(f"dense parameter {name!r} is outside the model (expected the prefix {prefix!r})")
    return name[len(prefix) :]


def _table_slots(model: torch.nn.Module) -> dict[str, _TableSlot]:
    """This rank's table shards by the state-dict key of their weight: optimizer, flat weight and segment."""
    slots: dict[str, _TableSlot] = {}
    for fqn, module in model.named_modules():
        if not isinstance(module, ShardedEmbeddingBagCollection):
            continue
        prefix = f"{fqn}.embedding_bags." if fqn else "embedding_bags."
        for kernel in iter_dense_kernels(module):
            weight = kernel.emb_module.weights
            optimizer = weight._in_backward_optimizers[-1]  # the RowwiseAdamW the sharder attached
            row_base = 0
            for table, (offset, rows, dim) in zip(kernel.config.embedding_tables, dense_kernel_segments(kernel)):
                slots[f"{prefix}{table.name}.weight"] = _TableSlot(optimizer, weight, offset, rows, dim, row_base)
                row_base += rows
    return slots


def _plain_settings(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's settings that a checkpoint can hold as they are (numbers, strings, flags, tuples)."""
    return {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple, list))}


def _init_dense_state(dense: Any) -> None:
    """Create AdamW's lazy state (a step with zero gradients at lr 0, as torch's get_state_dict does) so DCP can load into it."""
    inner = dense._optimizer
    params = list(dense.params.values())
    if all(inner.state.get(p) for p in params):
        return
    lrs = [group["lr"] for group in inner.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in inner.param_groups:
        group["lr"] = 0.0
    inner.step()
    for group, lr in zip(inner.param_groups, lrs):
        group["lr"] = lr
    inner.zero_grad(set_to_none=True)


class ShardedCheckpointState:
    """This rank's part of a checkpoint of `model` (sharded tables) trained by `dense_optimizer` plus RowwiseAdamW.

    `model`: the model whose state_dict names the checkpoint (inside the DistributedModelParallel);
    `dense_prefix`: how the dense optimizer's parameter names start relative to it;
    `table_kwargs`: the RowwiseAdamW settings of the tables (for the param_groups one process restores).
    """

    def __init__(self, model: torch.nn.Module, dense_optimizer: Any, table_kwargs: dict[str, Any], dense_prefix: str = "model.") -> None:
        self.model, self.dense_optimizer, self.dense_prefix = model, dense_optimizer, dense_prefix
        self.slots = _table_slots(model)
        # Tables on fbgemm's fused kernels (PARTIAL_ROWWISE_ADAM on CUDA) step inside fbgemm: their
        # state is the fused optimizer's, by this rank's parameter names (state-dict key -> name).
        self.fused = dict(getattr(dense_optimizer, "optimizers", [])).get("fused")
        self.fused_names = {name.removeprefix(dense_prefix): name for name in getattr(self.fused, "params", {})}
        # A one-process RowwiseAdamW group's keys, for checkpoints that one process can read.
        probe = RowwiseAdamW([torch.zeros(1, 1, requires_grad=True)], **table_kwargs)
        self.table_group = {k: v for k, v in probe.param_groups[0].items() if k != "params"}

    @property
    def dense(self) -> Any:
        """The keyed AdamW of the dense parameters (None when the model has none)."""
        return dict(self.dense_optimizer.optimizers).get("dense")

    def state_dict(self, param_groups: bool, table_lr: float) -> dict[str, Any]:
        """{"model": ..., "optim": {"state": ...}}; `param_groups` (for saving) adds the hyper-parameters one
        process restores, the tables' lr being `table_lr` (on N ranks the lrs always come from the run's config
        and schedule)."""
        model_sd = self.model.state_dict()
        state: dict[str, Any] = {}
        dense = self.dense
        dense_names: list[str] = []
        if dense is not None:
            _init_dense_state(dense)
            for name, param in dense.params.items():
                dense_names.append(_unprefixed(name, self.dense_prefix))
                state[dense_names[-1]] = dict(dense.state[param])
        table_names = sorted(k for k, v in model_sd.items() if isinstance(v, ShardedTensor))
        fused_tables = [k for k in table_names if k in self.fused_names and k not in self.slots]
        for key in table_names:
            table_state = self._fused_state(key) if key in fused_tables else self._table_state(key, model_sd[key])
            if table_state is not None:  # else another rank holds this table
                state[key] = table_state
        optim: dict[str, Any] = {"state": state}
        if param_groups:
            groups = []
            if dense is not None:
                groups.append({**{k: v for k, v in dense.param_groups[0].items() if k != "params"}, "params": dense_names})
            rowwise = [k for k in table_names if k not in fused_tables]
            if rowwise:
                groups.append({**self.table_group, "lr": table_lr, "params": rowwise})
            if fused_tables:  # fbgemm's settings, for a resume on fused kernels (one process cannot restore them)
                groups.append({**_plain_settings(self.fused.param_groups[0]), "lr": table_lr, "params": fused_tables})
            optim["param_groups"] = groups
        return {"model": model_sd, "optim": optim}

    def _fused_state(self, key: str) -> dict[str, Any] | None:
        """The fused optimizer's state of table `key` (ShardedTensors over fbgemm's own state), as it keeps it."""
        param = self.fused.params[self.fused_names[key]]
        table_state = self.fused.state.get(param)
        return dict(table_state) if table_state else None

    def _table_state(self, key: str, weight: ShardedTensor) -> dict[str, Any] | None:
        """RowwiseAdamW state of this rank's shard of table `key` as ShardedTensors; None when it holds none."""
        shards = weight.local_shards()
        if not shards:
            return None
        slot = self.slots.get(key)
        if slot is None or len(shards) != 1 or list(shards[0].metadata.shard_sizes) != [slot.rows, slot.dim]:
            raise RuntimeError(f"{key}: expected one local shard of whole rows in a DENSE kernel; found {len(shards)} "
                               f"shard(s), kernel segment {slot}")
        opt = slot.optimizer
        st = opt._init_state(opt.param_groups[0], slot.weight)  # lazy state must exist before DCP loads into it
        rows = slice(slot.row_base, slot.row_base + slot.rows)
        exp_avg = st["exp_avg"][slot.offset : slot.offset + slot.rows * slot.dim].view(slot.rows, slot.dim)
        meta = shards[0].metadata
        return {
            "step": st["step"],
            "exp_avg": _sharded_like(weight, meta, exp_avg, rows_only=False),
            "exp_avg_sq_row": _sharded_like(weight, meta, st["exp_avg_sq_row"][rows], rows_only=True),
            "row_step": _sharded_like(weight, meta, st["row_step"][rows], rows_only=True),
        }
