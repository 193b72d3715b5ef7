"""Triton kernels of the kernel layer (``Kernel.TRITON``), each beside the PyTorch reference it is tested against.

    hstu_attention.py  triton_hstu_attention: jagged causal HSTU (SiLU) attention, forward and backward,
                       relative position/time bias, packed segments, query tokens (autograd wrapper)
    hstu_kernels.py    its Triton kernels, loaded by hstu_attention once per mode (compiled / interpreted)

Nothing here imports triton until a kernel runs; docs/kernels.md describes the paths and tests.
"""

from lumrec.modules.ops.triton.hstu_attention import triton_hstu_attention

__all__ = ["triton_hstu_attention"]
