"""Optimizers for embedding tables (row-wise AdamW, CPU and fused CUDA; row-sparse table gradients) and the dense rest of a model."""

from __future__ import annotations

from typing import Any

from lumrec.optim.factory import EmbeddingOptimConfig, build_dense_optimizer, fbgemm_has_cuda, fused_params_for, rowwise_adamw_kwargs
from lumrec.optim.rowwise_adamw import RowwiseAdamW

# torchrec.distributed takes seconds to import; load the sharding helpers only when asked for.
_SHARDING_NAMES = (
    "RowwiseAdamWEmbeddingBagCollectionSharder",
    "RowwiseAdamWEmbeddingCollectionSharder",
    "as_dense_kernel_plan",
    "attach_rowwise_adamw_to_dense_kernels",
    "dense_kernel_sharding_plan",
    "iter_dense_kernels",
    "rowwise_adamw_sharder_for",
    "rowwise_adamw_table_state",
)

__all__ = [
    "EmbeddingOptimConfig",
    "RowwiseAdamW",
    "build_dense_optimizer",
    "fbgemm_has_cuda",
    "fused_params_for",
    "rowwise_adamw_kwargs",
    "sparse_table_gradients",
    *_SHARDING_NAMES,
]


def __getattr__(name: str) -> Any:
    """Import the torchrec sharding helpers and sparse_table_gradients on first use."""
    if name in _SHARDING_NAMES:
        from lumrec.optim import sharding

        return getattr(sharding, name)
    if name == "sparse_table_gradients":
        from lumrec.optim.sparse_grads import sparse_table_gradients

        return sparse_table_gradients
    raise AttributeError(f"module 'lumrec.optim' has no attribute {name!r}")
