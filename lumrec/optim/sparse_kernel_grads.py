"""Row-sparse gradients for torchrec's DENSE embedding kernel (sharded RowwiseAdamW tables on CPU).

Under DistributedModelParallel a rank's RowwiseAdamW tables live in DENSE kernels: one fbgemm
`DenseTableBatchedEmbeddingBagsCodegen` per group of tables, all in one flat `weights` tensor, whose
backward returns a dense gradient of the whole flat tensor. A step then costs O(rows of every
table on the rank). `sparse_dense_kernel_gradients(module)` gives every such kernel under
`module` a backward that returns a sparse COO gradient of the flat weight holding only the looked-up
rows (all `dim` elements of each), with each row's duplicates summed in the order fbgemm's CPU
kernel sums them (feature by feature, ids in input order), so the numbers are the same bit for
bit; `RowwiseAdamW` then updates those rows only (it reads a sparse flat gradient through its
`segments`).

The forward output is the kernel's own (the original forward runs, without autograd). Lookups
with per-sample weights, mean pooling or variable batch sizes per feature keep the dense
gradient (fbgemm fuses the scale into its sum; those would agree up to rounding only).

    >>> import torch
    >>> from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    >>> from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
    >>> tbe = DenseTableBatchedEmbeddingBagsCodegen([(5, 2), (3, 4)], pooling_mode=PoolingMode.SUM, use_cpu=True)
    >>> sparse_dense_kernel_gradients(tbe)
    1
    >>> tbe(torch.tensor([4, 4, 1]), torch.tensor([0, 2, 3])).sum().backward()  # table 0: ids 4, 4; table 1: id 1
    >>> g = tbe.weights.grad.coalesce()
    >>> g.indices()[0].tolist(), g.values().tolist()   # elements of row 4 (table 0) and row 1 (table 1)
    ([8, 9, 14, 15, 16, 17], [2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torch import nn

from lumrec.optim.dense_lookup import BagLayout, dense_tbes, feature_tables

__all__ = ["flat_row_gradient", "sparse_dense_kernel_gradients"]

_WRAPPED = "_lumrec_sparse_grad_forward"


def flat_row_gradient(
    tbe: DenseTableBatchedEmbeddingBagsCodegen, indices: torch.Tensor, offsets: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """The gradient of `tbe.weights` for one lookup, as a coalesced sparse COO tensor of whole rows.

    `indices`/`offsets` as the kernel takes them (feature-major bags); `grad_out` the gradient of
    its output ([B, total_D] pooled by sum, [num_ids, D] unpooled).
    """
    layout = BagLayout(tbe.D_offsets.numel() - 1, indices, offsets)
    batch, bag, feature = layout.batch, layout.bag, layout.feature
    indices = indices.long()
    tables = feature_tables(tbe)
    d_offsets = tbe.D_offsets.tolist()
    rows_by_table: dict[int, list[torch.Tensor]] = {}
    grads_by_table: dict[int, list[torch.Tensor]] = {}
    for f, t in enumerate(tables):
        mine = (feature == f).nonzero().squeeze(1)
        if mine.numel() == 0:
            continue
        if tbe.pooling_mode == PoolingMode.NONE:
            g = grad_out.index_select(0, mine)
        else:
            g = grad_out[:, d_offsets[f] : d_offsets[f + 1]].index_select(0, bag.index_select(0, mine) - f * batch)
        rows_by_table.setdefault(t, []).append(indices.index_select(0, mine))
        grads_by_table.setdefault(t, []).append(g)
    elements, values = [], []
    for t in sorted(rows_by_table, key=lambda t: int(tbe.weights_physical_offsets[t])):
        rows, dim = tbe.embedding_specs[t]
        ids, vals = torch.cat(rows_by_table[t]), torch.cat(grads_by_table[t])
        # fbgemm's CPU backward adds a table's rows feature by feature, ids in input order, from zero.
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        summed = vals.new_zeros(uniq.numel(), dim).index_add_(0, inverse, vals)
        start = int(tbe.weights_physical_offsets[t])
        elements.append((start + uniq * dim).unsqueeze(1) + torch.arange(dim, device=ids.device))
        values.append(summed)
    n = tbe.weights.numel()
    if not elements:
        return torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), grad_out.new_zeros(0), (n,), is_coalesced=True,
                                       check_invariants=False)
    return torch.sparse_coo_tensor(torch.cat([e.flatten() for e in elements]).unsqueeze(0),
                                   torch.cat([v.flatten() for v in values]), (n,), is_coalesced=True, check_invariants=False)


class _SparseGradLookup(torch.autograd.Function):
    """The kernel's own forward without autograd; backward: `flat_row_gradient` for the weights."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                tbe: DenseTableBatchedEmbeddingBagsCodegen, forward: Callable[..., torch.Tensor]) -> torch.Tensor:
        ctx.tbe = tbe
        ctx.save_for_backward(indices, offsets)
        with torch.no_grad():
            return forward(indices, offsets)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        indices, offsets = ctx.saved_tensors
        return flat_row_gradient(ctx.tbe, indices, offsets, grad_out.contiguous()), None, None, None, None


def _sparse_forward(tbe: DenseTableBatchedEmbeddingBagsCodegen) -> Callable[..., torch.Tensor]:
    def forward(*args: Any) -> torch.Tensor:
        # The class's forward at call time: lumrec.optim.dense_lookup may switch the class later.
        return type(tbe).forward(tbe, *args)

    def sparse_forward(indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor] = None,
                       feature_requires_grad: Optional[torch.Tensor] = None,
                       batch_size_per_feature_per_rank: Optional[list[list[int]]] = None) -> torch.Tensor:
        dense = (per_sample_weights is not None or batch_size_per_feature_per_rank is not None
                 or tbe.pooling_mode == PoolingMode.MEAN or not (torch.is_grad_enabled() and tbe.weights.requires_grad)
                 or torch.compiler.is_compiling())
        if dense:
            return forward(indices, offsets, per_sample_weights, feature_requires_grad, batch_size_per_feature_per_rank)
        return _SparseGradLookup.apply(tbe.weights, indices, offsets.to(indices.dtype), tbe, forward)

    return sparse_forward


def sparse_dense_kernel_gradients(module: nn.Module) -> int:
    """Give every DENSE-kernel TBE under `module` row-sparse weight gradients; returns how many. Idempotent.

    Call it after sharding (DistributedModelParallel builds the kernels), on CPU.
    """
    count = 0
    for tbe in dense_tbes(module):
        if not getattr(tbe, _WRAPPED, False):
            tbe.forward = _sparse_forward(tbe)  # type: ignore[method-assign]
            setattr(tbe, _WRAPPED, True)
        count += 1
    return count
