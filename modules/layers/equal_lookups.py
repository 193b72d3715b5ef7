"""Pooled table lookups of one size on every rank: the KJT padded with empty bags to the ranks' largest stride.

torchrec's row-wise (and table-row-wise) pooled output is a reduce-scatter of equal shapes, whose
backward is an all-gather: every rank's lookup must have the same number of bags. Ranks of a
data-parallel job hold different numbers of tokens (their slices of a packed batch) and of
candidates (their own targets beside shared sampled negatives), so each lookup here first takes
the largest stride over the group (one all-reduce of one integer), appends that many empty bags
per key and drops their rows from the output.

Why empty bags: a SUM-pooled empty bag is a zero row looked up from no table row, so it adds
nothing to any pooled output, gradient or optimizer state (RowwiseAdamW touches only rows looked
up); the models' own checks (SASRec's one id per token, TokenEncoder's stride) run on the real
KJT before it is padded. Every rank must call a lookup the same number of times, in the same
order, as sharded lookups already require.

A module with a `lookup_group` attribute (`ItemInputArch`, `TokenEncoder`) pads when it is set
(`set_lookup_group`); None, the default, is the plain lookup (one process, bit for bit).

Example::

    >>> kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([3, 5, 6]),
    ...                         lengths=torch.tensor([1, 1, 0, 1], dtype=torch.int32), stride=2)
    >>> padded = pad_kjt_stride(kjt, 3)
    >>> padded.stride(), padded.lengths().tolist(), padded.values().tolist()
    (3, [1, 1, 0, 0, 1, 0], [3, 5, 6])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["equal_stride_lookup", "global_max_stride", "pad_kjt_stride", "set_lookup_group"]


def pad_kjt_stride(kjt: KeyedJaggedTensor, stride: int) -> KeyedJaggedTensor:
    """`kjt` with empty bags appended to every key up to `stride` bags (values and weights unchanged)."""
    if kjt.variable_stride_per_key():
        raise ValueError("pad_kjt_stride: a KJT with a stride per key (variable batch) cannot be padded to one stride")
    have = kjt.stride()
    if stride < have:
        raise ValueError(f"pad_kjt_stride: stride {stride} is smaller than the KJT's {have}")
    if stride == have:
        return kjt
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), have)
    extra = lengths.new_zeros(len(keys), stride - have)
    return KeyedJaggedTensor(keys=keys, values=kjt.values(), weights=kjt.weights_or_none(),
                             lengths=torch.cat([lengths, extra], dim=1).reshape(-1), stride=stride)


def global_max_stride(stride: int, group: dist.ProcessGroup, device: torch.device) -> int:
    """The largest `stride` over the ranks of `group` (a collective: every rank calls it)."""
    value = torch.tensor([stride], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value)


def equal_stride_lookup(collection: nn.Module, kjt: KeyedJaggedTensor, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """`collection(kjt).to_dict()` with the KJT padded to the group's largest stride, padding rows dropped."""
    stride = kjt.stride()
    width = global_max_stride(stride, group, kjt.lengths().device)
    pooled = collection(pad_kjt_stride(kjt, width)).to_dict()
    if width == stride:
        return pooled
    return {key: value[:stride] for key, value in pooled.items()}


def set_lookup_group(model: nn.Module, group: Any) -> list[str]:
    """Set `lookup_group` on every submodule of `model` that has one; returns their names (None: plain lookups)."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "lookup_group"):
            module.lookup_group = group
            names.append(name)
    return names
