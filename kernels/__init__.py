"""Triton kernels, their launchers and the ``torch.ops.sparse_compile.*`` ops.

Importing this package registers ``torch.ops.sparse_compile.bsr_linear`` and the masked ops
(``masked_linear``, ``masked_linear_input_grad``, ``tile_masked_weight``).
"""

from .bsr_format import BsrWeight, block_mask
from .bsr_linear import SUPPORTED_DTYPES, bsr_linear, bsr_linear_triton
from .masked_linear import masked_linear, tile_masked_weight

__all__ = ["BsrWeight", "block_mask", "bsr_linear", "bsr_linear_triton", "SUPPORTED_DTYPES", "masked_linear", "tile_masked_weight"]
