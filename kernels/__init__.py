"""Triton kernels, their launchers and the ``torch.ops.sparse_compile.*`` ops.

Importing this package registers ``torch.ops.sparse_compile.bsr_linear``,
``semi_structured_linear`` (2:4, torch's kernels) and the masked ops (``masked_linear``,
``masked_linear_input_grad``, ``tile_masked_weight``). Triton is optional:
without it the ops have their CPU implementations only (``HAS_TRITON``, ``kernel_unavailable_reason``).
"""

from .bsr_format import BsrWeight, block_mask
from .bsr_linear import HAS_TRITON, SUPPORTED_DTYPES, bsr_linear, bsr_linear_triton, kernel_unavailable_reason
from .masked_linear import masked_linear, tile_masked_weight
from .semi_structured import semi_structured_linear

__all__ = [
    "BsrWeight",
    "block_mask",
    "bsr_linear",
    "bsr_linear_triton",
    "kernel_unavailable_reason",
    "HAS_TRITON",
    "SUPPORTED_DTYPES",
    "masked_linear",
    "semi_structured_linear",
    "tile_masked_weight",
]
