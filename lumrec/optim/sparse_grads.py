"""Row-sparse table gradients, so that a RowwiseAdamW step costs O(rows touched), not O(table rows).

A torchrec `EmbeddingBagCollection` / `EmbeddingCollection` looks rows up with `nn.EmbeddingBag` /
`nn.Embedding` modules whose gradient is a dense [rows, dim] tensor by default: backward fills a
full-table buffer with zeros and the optimizer scans it for touched rows, so a step on a 1e7-row
table moves gigabytes for a batch that touched a few thousand rows. `sparse_table_gradients(module)`
switches those modules to sparse gradients (`sparse=True`: one COO row per looked-up id) and sums
the duplicate ids of each lookup right in its backward, in the order the dense kernel sums them:

* `nn.EmbeddingBag` (pooled tables): the dense CPU backward adds the rows in the order of
  `indices.sort()`, the order `Tensor.coalesce()` uses too;
* `nn.Embedding` (sequence tables): the dense CPU backward adds the rows in the order they were
  looked up (an `index_add_`), reproduced here with `torch.unique` + `index_add_`.

Each lookup's gradient then holds exactly the rows the dense gradient would have, with the same
bits, and autograd adds the gradients of several lookups of one table (coalesced + coalesced)
row by row as it adds dense ones. So `RowwiseAdamW` trains the same numbers bit for bit.

Mean pooling and per-sample weights (weighted EBCs) are the exception: the dense kernel fuses the
scale into its sum (one fused multiply-add per id), the sparse one rounds each scaled row first,
so the two agree up to float32 rounding only. Such tables keep dense gradients unless
`exact=False`.

Only for tables whose optimizer takes sparse gradients (`RowwiseAdamW`, `torch.optim.SparseAdam`,
SGD); not under DDP, which would all-reduce the sparse tensors as such.

    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=1000, feature_names=["f"])])
    >>> sparse_table_gradients(ebc)
    1
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([7, 3, 7]), lengths=torch.tensor([2, 1]))
    >>> ebc(kjt).values().sum().backward()
    >>> g = ebc.embedding_bags["t"].weight.grad
    >>> g.is_sparse, g._indices().tolist(), g._values()[:, 0].tolist()   # id 7's two rows summed in backward
    (True, [[3, 7]], [1.0, 2.0])
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

__all__ = ["coalesce_in_lookup_order", "sparse_table_gradients"]

_HOOK_ATTR = "_lumrec_sparse_grad_hook"


def coalesce_in_lookup_order(grad: torch.Tensor) -> torch.Tensor:
    """`grad` (row-sparse COO) with duplicate rows summed in the order they appear, starting from zero.

    The summation order of `nn.Embedding`'s dense CPU backward (`Tensor.coalesce()` follows an
    unstable sort instead, which rounds differently when a row is looked up three times or more).
    """
    ids, vals = grad._indices()[0], grad._values()
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = vals.new_zeros((uniq.numel(), *vals.shape[1:])).index_add_(0, inverse, vals)
    return torch.sparse_coo_tensor(uniq.unsqueeze(0), summed, grad.shape, is_coalesced=True, check_invariants=False)


def _coalesce_sorted(grad: torch.Tensor) -> torch.Tensor:
    """`nn.EmbeddingBag`'s dense CPU backward sums in `indices.sort()` order, which is coalesce's order."""
    return grad.coalesce()


def _coalescing_hook(coalesce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    """A forward hook that makes this call's backward hand on its sparse weight gradient coalesced."""

    def grad_hook(grad_inputs: tuple[Optional[torch.Tensor], ...], _grad_outputs: Any) -> tuple[Optional[torch.Tensor], ...]:
        return tuple(coalesce(g) if g is not None and g.is_sparse else g for g in grad_inputs)

    def forward_hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if torch.compiler.is_compiling():  # torch.compile / torch.export trace the forward: no backward hooks there
            return
        node = getattr(output, "grad_fn", None)
        # Only the lookup's own backward node: anything else (a cast added later) is left alone,
        # the optimizer then coalesces the gradient itself (same rows, rounding may differ).
        if node is not None and type(node).__name__.startswith(("EmbeddingBackward", "EmbeddingBagBackward")):
            node.register_hook(grad_hook)

    return forward_hook


def sparse_table_gradients(module: nn.Module, exact: bool = True) -> int:
    """Give the tables of `module`'s torchrec collections a row-sparse gradient; returns how many tables.

    `exact`: only tables whose gradient keeps its bits (not mean-pooled, not weighted); False
    switches those too (equal up to float32 rounding). Idempotent. The tables' forward output is
    unchanged; only what backward stores in `.grad` differs (a coalesced sparse COO tensor with
    one row per touched id).
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            lookups, coalesce = list(sub.embedding_bags.values()), _coalesce_sorted
            scaled = bool(getattr(sub, "_is_weighted", False))
        elif isinstance(sub, EmbeddingCollection):
            lookups, coalesce, scaled = list(sub.embeddings.values()), coalesce_in_lookup_order, False
        else:
            continue
        for lookup in lookups:
            if not isinstance(lookup, (nn.Embedding, nn.EmbeddingBag)):
                continue
            if exact and (scaled or getattr(lookup, "mode", "sum") == "mean"):
                continue
            lookup.sparse = True
            if getattr(lookup, _HOOK_ATTR, None) is None:
                setattr(lookup, _HOOK_ATTR, lookup.register_forward_hook(_coalescing_hook(coalesce)))
            count += 1
    return count
