"""Triton kernels, their launchers and the ``torch.ops.sparse_compile.*`` ops.

Importing this package registers ``torch.ops.sparse_compile.bsr_linear``.
"""

from .bsr_format import BsrWeight, block_mask
from .bsr_linear import SUPPORTED_DTYPES, bsr_linear, bsr_linear_triton

__all__ = ["BsrWeight", "block_mask", "bsr_linear", "bsr_linear_triton", "SUPPORTED_DTYPES"]
