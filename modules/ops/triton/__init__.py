"""Triton kernels of the kernel layer (``Kernel.TRITON``), each beside the PyTorch reference it is tested against.

    hstu_attention.py  triton_hstu_attention: jagged causal HSTU (SiLU) attention, forward and backward,
                       relative position/time bias, packed segments, query tokens
    hstu_op.py         the kernels as custom operators lumrec::hstu_attention and its backward (fake
                       implementations, autograd): one opaque node to torch.compile and torch.export
    hstu_kernels.py    its Triton kernels, loaded by hstu_op once per mode (compiled / interpreted)
    segments.py        build_triton_segments: a batch's segments built on the device (no host
                       synchronisation), the layout HSTUStack uses under Kernel.TRITON

Nothing here imports triton until a kernel runs; docs/kernels.md describes the paths and tests.
"""

from lumrec.modules.ops.triton.hstu_attention import triton_hstu_attention
from lumrec.modules.ops.triton.segments import TritonSegments, build_triton_segments

__all__ = ["TritonSegments", "build_triton_segments", "triton_hstu_attention"]
