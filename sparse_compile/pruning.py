"""Block magnitude pruning: make a model's linear weights block-sparse, in place.

For users who have a dense model and want to try the backend, and for the benchmarks and tests.
It keeps, per weight, the ``b x b`` blocks with the largest L2 norm and zeroes the rest — the
simplest pruning that produces the block structure BSR needs (no retraining: accuracy drops).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def prune_blocks_(weight: torch.Tensor, sparsity: float, blocksize: int) -> torch.Tensor:
    """Zeroes the ``round(sparsity * num_blocks)`` blocks of smallest L2 norm of a 2-D weight.

    Ragged edges form smaller blocks, ranked like the others. Works in place and returns ``weight``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1]")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    block_rows, block_cols = -(-rows // blocksize), -(-cols // blocksize)
    padded = weight.new_zeros(block_rows * blocksize, block_cols * blocksize, dtype=torch.float32)
    padded[:rows, :cols] = weight.detach().float()
    norms = padded.view(block_rows, blocksize, block_cols, blocksize).pow(2).sum(dim=(1, 3))
    num_pruned = round(sparsity * norms.numel())
    keep = torch.ones(norms.numel(), dtype=torch.bool, device=weight.device)
    keep[norms.flatten().argsort()[:num_pruned]] = False
    mask = keep.view(block_rows, 1, block_cols, 1).expand(-1, blocksize, -1, blocksize)
    mask = mask.reshape(block_rows * blocksize, block_cols * blocksize)[:rows, :cols]
    with torch.no_grad():
        weight.mul_(mask.to(weight.dtype))
    return weight


def prune_linear_blocks_(
    model: nn.Module,
    sparsity: float,
    blocksize: int,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Block-prunes every ``nn.Linear`` weight and every ``nn.MultiheadAttention`` input projection.

    Args:
        filter_fn: ``(qualified name, module) -> bool``; modules for which it is false are skipped.

    Returns:
        the names of the pruned weights.
    """
    pruned = []
    for name, module in model.named_modules():
        if filter_fn is not None and not filter_fn(name, module):
            continue
        if isinstance(module, nn.Linear):
            prune_blocks_(module.weight.data, sparsity, blocksize)
            pruned.append(f"{name}.weight")
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            prune_blocks_(module.in_proj_weight.data, sparsity, blocksize)
            pruned.append(f"{name}.in_proj_weight")
    return pruned
