"""What the kernel files of this folder share: the dtypes their ops take, and the padded block view.

The one statement of each: the formats (``sparse_compile.formats``), the options' checks, the
benchmarks and the training code read them from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "block_view"]

#: Weight/input dtypes every op of this folder takes (fp32 accumulation for all of them; torch's
#: CUDA 2:4 kernels take fewer, see ``semi_structured.CUDA_DTYPES``).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def block_view(matrix: Tensor, blocksize: int) -> Tensor:
    """``matrix`` ``[N, K]`` zero-padded to whole ``b x b`` blocks, as ``[ceil(N/b), b, ceil(K/b), b]``:
    block ``(i, j)`` is ``[i, :, j, :]`` (``.transpose(1, 2)`` gives ``[nb, kb, b, b]``).

    A view of ``matrix`` when ``b`` divides both dims and the strides allow it (writing to the
    view then writes the matrix); otherwise a view of a zero-padded copy.
    """
    n, k = matrix.shape
    b = blocksize
    nb, kb = -(-n // b), -(-k // b)
    if (nb * b, kb * b) != (n, k):
        matrix = torch.nn.functional.pad(matrix, (0, kb * b - k, 0, nb * b - n))
    return matrix.reshape(nb, b, kb, b)
