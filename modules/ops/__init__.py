"""Kernel layer: jagged ops and attention, each with a plain-PyTorch reference and fast paths chosen by one setting.

Layout (as generative-recommenders' ``ops/``, one file per op family)::

    kernel.py          Kernel {REFERENCE, PYTORCH, FBGEMM, TRITON}: current_kernel / set_kernel / use_kernel, env LUMREC_KERNEL
    reference.py       <op>_reference for every op: the plain-PyTorch definitions the fast paths are tested against
    jagged.py          lengths_to_offsets, jagged_to_padded_dense, padded_dense_to_jagged, positions, ids, ranges
    gather.py          gather_columns: a table read with an index_add_ gradient (relative attention bias)
    layout.py          build_attention_layout: segments, length buckets, masks, built once per batch
    attention.py       jagged_causal_attention: softmax and HSTU (SiLU) attention, relative bias, query tokens
    attention_args.py  argument types and checks shared by the attention paths
    triton/            Triton kernels (Kernel.TRITON): hstu_attention.py, HSTU attention forward and backward

The default, ``Kernel.FBGEMM``, runs fbgemm's jagged kernels where the tensor's dtype and
device have one and the PyTorch fast paths elsewhere; ``PYTORCH`` runs only the PyTorch fast
paths; ``REFERENCE`` the references; ``TRITON`` the Triton kernels of ``ops/triton/`` where an
op has one (HSTU attention; docs/kernels.md). tests/test_ops.py and tests/test_triton_attention.py
compare every path with the references (their ``gpu``-marked tests run where CUDA is present).

Example::

    >>> import torch
    >>> q = k = v = torch.randn(4, 1, 2)
    >>> offsets = lengths_to_offsets(torch.tensor([3, 1]))
    >>> fast = jagged_causal_attention(q, k, v, offsets)
    >>> with use_kernel(Kernel.REFERENCE):
    ...     slow = jagged_causal_attention(q, k, v, offsets)
    >>> bool(torch.allclose(fast, slow, atol=1e-6))
    True
"""

from lumrec.modules.ops.kernel import ENV_VAR, Kernel, current_kernel, set_kernel, use_kernel
from lumrec.modules.ops.reference import (
    gather_columns_reference,
    jagged_causal_attention_reference,
    jagged_to_padded_dense_reference,
    lengths_to_offsets_reference,
    padded_dense_to_jagged_reference,
)
from lumrec.modules.ops.jagged import (
    jagged_positions,
    jagged_to_padded_dense,
    lengths_to_offsets,
    offsets_to_ids,
    offsets_to_lengths,
    padded_dense_to_jagged,
    ranges_to_indices,
    segment_positions,
)
from lumrec.modules.ops.gather import gather_columns
from lumrec.modules.ops.attention_args import AttentionKind, Normaliser, RelativeBias
from lumrec.modules.ops.layout import AttentionBucket, JaggedAttentionLayout, build_attention_layout
from lumrec.modules.ops.attention import jagged_causal_attention

__all__ = [
    "ENV_VAR",
    "AttentionBucket",
    "AttentionKind",
    "JaggedAttentionLayout",
    "Kernel",
    "Normaliser",
    "RelativeBias",
    "build_attention_layout",
    "current_kernel",
    "gather_columns",
    "gather_columns_reference",
    "jagged_causal_attention",
    "jagged_causal_attention_reference",
    "jagged_positions",
    "jagged_to_padded_dense",
    "jagged_to_padded_dense_reference",
    "lengths_to_offsets",
    "lengths_to_offsets_reference",
    "offsets_to_ids",
    "offsets_to_lengths",
    "padded_dense_to_jagged",
    "padded_dense_to_jagged_reference",
    "ranges_to_indices",
    "segment_positions",
    "set_kernel",
    "use_kernel",
]
