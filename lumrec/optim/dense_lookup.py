"""A pure-PyTorch forward for torchrec's DENSE embedding kernel where fbgemm's op cannot serve it.

torchrec's DENSE kernel (`BatchedDenseEmbedding[Bag]`, the kernel RowwiseAdamW trains) looks up
rows with `fbgemm::dense_embedding_codegen_lookup_function`. Two cases need another path:

* unpooled lookups (`EmbeddingCollection`, PoolingMode.NONE) on CPU: fbgemm-gpu-cpu 1.8's CPU
  kernel ignores NONE and returns one pooled row per bag, so a sharded EmbeddingCollection fails
  in its output step ("split_with_sizes expects split_sizes to sum exactly to ...");
* any device for which the installed fbgemm has no kernel of that op (a CUDA torch with the CPU
  build of fbgemm, or no CUDA build at all).

`TorchDenseLookup` is `DenseTableBatchedEmbeddingBagsCodegen` with such a forward: the same
inputs (indices, offsets laid out feature-major, `B` bags per feature), the same output
([num_indices, D] unpooled, [B, total_D] pooled) and a dense gradient on the flat `weights`,
as fbgemm's op gives. `use_torch_lookup_where_needed(module)` switches every such kernel under
a sharded module (its class only: weights and buffers stay).

    >>> import torch
    >>> from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    >>> from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
    >>> tbe = DenseTableBatchedEmbeddingBagsCodegen([(5, 2), (3, 2)], pooling_mode=PoolingMode.NONE, use_cpu=True)
    >>> tbe.__class__ = TorchDenseLookup
    >>> out = tbe(torch.tensor([4, 0, 2]), torch.tensor([0, 2, 3]))   # feature 0: ids 4, 0; feature 1: id 2
    >>> torch.equal(out, torch.cat([tbe.split_embedding_weights()[0][[4, 0]], tbe.split_embedding_weights()[1][[2]]]))
    True
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torch import nn

__all__ = ["BagLayout", "TorchDenseLookup", "dense_tbes", "fbgemm_serves", "feature_tables", "sharded_submodules",
           "use_torch_lookup_where_needed"]

_FBGEMM_DENSE_OP = "fbgemm::dense_embedding_codegen_lookup_function"


def fbgemm_serves(emb_module: DenseTableBatchedEmbeddingBagsCodegen) -> bool:
    """True if fbgemm's dense lookup op runs this kernel correctly on its weights' device."""
    device = emb_module.weights.device.type
    if device == "cpu" and emb_module.pooling_mode == PoolingMode.NONE:
        return False  # the CPU kernel pools anyway (module docstring)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_FBGEMM_DENSE_OP, key)


def feature_tables(tbe: DenseTableBatchedEmbeddingBagsCodegen) -> list[int]:
    """The table of every feature of a DENSE kernel (fbgemm keeps no list of it), read once and kept on the kernel.

    A feature's table is the one whose weights start at the feature's weight offset; an empty table
    shares its start with the next one, so the last non-empty table with that start.
    """
    cached = getattr(tbe, "_lumrec_feature_tables", None)
    if cached is None:
        by_start: dict[int, int] = {}
        for t, start in enumerate(tbe.weights_physical_offsets[: len(tbe.embedding_specs)]):
            if tbe.embedding_specs[t][0] > 0 or int(start) not in by_start:
                by_start[int(start)] = t
        cached = [by_start[int(s)] for s in tbe.weights_offsets.tolist()]
        tbe._lumrec_feature_tables = cached
    return cached


class BagLayout:
    """Where every id of a DENSE kernel's lookup belongs: `indices`/`offsets` hold feature-major bags
    (feature 0's `batch` bags, then feature 1's, ...); from their shapes only, no host read."""

    def __init__(self, num_features: int, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        self.batch = (offsets.numel() - 1) // num_features
        self.lengths = (offsets[1:] - offsets[:-1]).long()  # ids per bag
        # The bag of every id, and the feature of that bag.
        self.bag = torch.repeat_interleave(torch.arange(num_features * self.batch, device=indices.device), self.lengths,
                                           output_size=indices.numel())
        self.feature = self.bag // self.batch


class TorchDenseLookup(DenseTableBatchedEmbeddingBagsCodegen):
    """`DenseTableBatchedEmbeddingBagsCodegen` whose forward is plain PyTorch (gather, then sum/mean per bag).

    Built by switching the class of an existing module (`use_torch_lookup_where_needed`), never
    constructed directly. No host synchronisation after the first call (which reads the feature ->
    table map from the kernel's buffers once): bag sizes come from the input's shapes only.
    """

    def forward(  # type: ignore[override]
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
        feature_requires_grad: Optional[torch.Tensor] = None,
        batch_size_per_feature_per_rank: Optional[list[list[int]]] = None,
    ) -> torch.Tensor:
        if batch_size_per_feature_per_rank is not None:
            raise NotImplementedError("TorchDenseLookup: variable batch sizes per feature (VBE) are not supported")
        layout = BagLayout(self.D_offsets.numel() - 1, indices, offsets)
        batch, lengths, bag, feature = layout.batch, layout.lengths, layout.bag, layout.feature
        indices = indices.long()
        if self.pooling_mode == PoolingMode.NONE:
            # One width for every table (torchrec's EmbeddingCollection requires it).
            dim = self.max_D
            return self.weights.view(-1, dim)[self.weights_offsets[feature] // dim + indices]
        outs = []
        for f, t in enumerate(feature_tables(self)):
            rows, dim = self.embedding_specs[t]
            start = self.weights_physical_offsets[t]
            table = self.weights[start : start + rows * dim].view(rows, dim)
            mine = feature == f
            vals = table[torch.where(mine, indices, 0)] * mine.unsqueeze(1).to(table.dtype)
            if per_sample_weights is not None:
                vals = vals * per_sample_weights.to(vals.dtype).unsqueeze(1)
            pooled = torch.zeros(batch, dim, dtype=vals.dtype, device=vals.device)
            pooled = pooled.index_add(0, torch.where(mine, bag - f * batch, 0), vals)
            if self.pooling_mode == PoolingMode.MEAN:
                pooled = pooled / lengths[f * batch : (f + 1) * batch].clamp(min=1).unsqueeze(1).to(pooled.dtype)
            outs.append(pooled)
        return torch.cat(outs, 1)


def sharded_submodules(module: nn.Module) -> Iterator[nn.Module]:
    """Every module under `module`, also inside sharded modules' lookups (`_lookups`, a plain list) and
    kernels' TBEs (`_emb_module`), which `nn.Module.modules()` does not visit; each once."""
    seen: set[int] = set()
    stack: list[nn.Module] = [module]
    while stack:
        for sub in stack.pop().modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            yield sub
            for child in (getattr(sub, "_emb_module", None), *getattr(sub, "_lookups", [])):
                if isinstance(child, nn.Module):
                    stack.append(child)


def dense_tbes(module: nn.Module) -> Iterator[DenseTableBatchedEmbeddingBagsCodegen]:
    """Every DENSE-kernel TBE under `module`, sharded modules' lookups included."""
    return (sub for sub in sharded_submodules(module) if isinstance(sub, DenseTableBatchedEmbeddingBagsCodegen))


def use_torch_lookup_where_needed(module: nn.Module) -> int:
    """Give every DENSE kernel under `module` that fbgemm cannot serve the PyTorch forward; returns how many."""
    switched = 0
    for tbe in dense_tbes(module):
        if type(tbe) is DenseTableBatchedEmbeddingBagsCodegen and not fbgemm_serves(tbe):
            tbe.__class__ = TorchDenseLookup
            switched += 1
    return switched
