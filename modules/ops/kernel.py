"""The one setting that picks which implementation every op in ``lumrec.modules.ops`` runs.

``Kernel.FBGEMM`` (the default) runs fbgemm's kernels where one exists for the tensor's dtype and
device and the PyTorch fast path elsewhere; ``Kernel.PYTORCH`` runs the PyTorch fast paths only;
``Kernel.REFERENCE`` runs the plain, obviously-correct references (slow: for checking a model or
a kernel, not for training); ``Kernel.TRITON`` runs the Triton kernels of
``lumrec.modules.ops.triton`` where one exists (HSTU attention) and the PyTorch paths elsewhere.
The environment variable ``LUMREC_KERNEL`` (``fbgemm``, ``pytorch``, ``reference`` or ``triton``)
sets the value a process starts with.

Example::

    >>> before = current_kernel()
    >>> with use_kernel("reference"):
    ...     current_kernel()
    <Kernel.REFERENCE: 'reference'>
    >>> current_kernel() is before
    True
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
from typing import Iterator

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch

__all__ = ["ENV_VAR", "Kernel", "current_kernel", "fbgemm_supports", "set_kernel", "use_kernel"]

ENV_VAR = "LUMREC_KERNEL"


class Kernel(str, enum.Enum):
    """Which implementation the ops run.

    ``TRITON``: the kernels in ``lumrec/modules/ops/triton/``, one branch in each op's dispatch
    that has one (``jagged_causal_attention(kind="hstu")``); they run compiled on CUDA tensors,
    or in Triton's interpreter where ``TRITON_INTERPRET=1`` (tests/test_triton_attention.py
    compares them with the references that way on CPU).
    """

    REFERENCE = "reference"  # plain PyTorch, written to be read: padded to the longest row, loops
    PYTORCH = "pytorch"  # the vectorised PyTorch fast paths (length-bucketed attention)
    FBGEMM = "fbgemm"  # fbgemm kernels where the dtype and device have one, else the PyTorch paths
    TRITON = "triton"  # Triton kernels where an op has one (HSTU attention), else the PyTorch paths


def _parse(value: Kernel | str, source: str) -> Kernel:
    try:
        return Kernel(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"{source}: unknown kernel {value!r}; choose one of {[k.value for k in Kernel]}") from None


_current = _parse(os.environ.get(ENV_VAR, Kernel.FBGEMM.value), ENV_VAR)


def current_kernel() -> Kernel:
    """The implementation the ops run now."""
    return _current


def set_kernel(kernel: Kernel | str) -> Kernel:
    """Make every op run `kernel` from now on; returns the previous setting."""
    global _current
    previous, _current = _current, _parse(kernel, "set_kernel")
    return previous


@contextlib.contextmanager
def use_kernel(kernel: Kernel | str) -> Iterator[Kernel]:
    """Run the ops with `kernel` inside the block, then restore the previous setting."""
    previous = set_kernel(kernel)
    try:
        yield current_kernel()
    finally:
        set_kernel(previous)


@functools.lru_cache(maxsize=None)
def _fbgemm_has_kernel(op: str, device_type: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{op}", device_type.upper())


def fbgemm_supports(op: str, tensor: torch.Tensor, dtypes: frozenset[torch.dtype]) -> bool:
    """True when the setting is FBGEMM and fbgemm op `op` has a kernel for `tensor`'s device and dtype."""
    return (
        _current is Kernel.FBGEMM
        and tensor.dtype in dtypes
        and _fbgemm_has_kernel(op, tensor.device.type)
    )
