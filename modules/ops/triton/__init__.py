"""Triton kernels of the kernel layer (``Kernel.TRITON``), each beside the PyTorch reference it is tested against."""
