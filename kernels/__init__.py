"""Triton kernels, their launchers and the ``torch.ops.sparse_compile.*`` ops.

Importing this package registers ``torch.ops.sparse_compile.bsr_linear``. Triton is optional:
without it the op has its CPU implementation only (``HAS_TRITON``, ``kernel_unavailable_reason``).
"""

from .bsr_format import BsrWeight, block_mask
from .bsr_linear import HAS_TRITON, SUPPORTED_DTYPES, bsr_linear, bsr_linear_triton, kernel_unavailable_reason

__all__ = [
    "BsrWeight",
    "block_mask",
    "bsr_linear",
    "bsr_linear_triton",
    "kernel_unavailable_reason",
    "HAS_TRITON",
    "SUPPORTED_DTYPES",
]
