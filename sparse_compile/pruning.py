"""Block magnitude pruning: make a model's linear (and 1x1 convolution) weights block-sparse, in place.

For users who have a dense model and want to try the backend, and for the benchmarks and tests.
It keeps, per weight, the ``b x b`` blocks with the largest L2 norm and zeroes the rest — the
simplest pruning that produces the block structure BSR needs (no retraining: accuracy drops).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from sparse_compile.kernels.common import block_view


def prune_blocks_(weight: torch.Tensor, sparsity: float, blocksize: int) -> torch.Tensor:
    """Zeroes the ``round(sparsity * num_blocks)`` blocks of smallest L2 norm of a 2-D weight.

    Ragged edges form smaller blocks, ranked like the others. Works in place and returns ``weight``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1]")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    norms = block_view(weight.detach().float(), blocksize).pow(2).sum(dim=(1, 3))
    block_rows, block_cols = norms.shape
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
    """Block-prunes the weights of every layer the ``sparse`` backend runs as a linear.

    Those are ``nn.Linear`` (and subclasses), the input projections of ``nn.MultiheadAttention``
    (packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``; its ``out_proj`` is an
    ``nn.Linear``), and Hugging Face transformers' ``Conv1D`` (GPT-2: a linear whose weight is
    stored ``[in, out]``; blocks of a transposed weight are the transposed blocks, so it is
    pruned as stored).

    Other modules with a 2-D ``weight`` (custom layers calling ``F.linear``; embeddings excepted) are
    not pruned: a ``UserWarning`` names them, and says so when nothing at all was pruned.

    Args:
        filter_fn: ``(qualified name, module) -> bool``; modules for which it is false are skipped.

    Returns:
        the names of the pruned weights.
    """
    pruned, skipped = [], []
    for name, module in model.named_modules():
        if filter_fn is not None and not filter_fn(name, module):
            continue
        weights = _linear_weights(module)
        if weights is None:
            if _has_2d_weight(module):
                skipped.append(f"{name or '<root>'} ({type(module).__name__})")
            continue
        for attribute in weights:
            prune_blocks_(getattr(module, attribute).data, sparsity, blocksize)
            pruned.append(f"{name}.{attribute}" if name else attribute)
    if skipped or not pruned:
        message = f"prune_linear_blocks_ pruned {len(pruned)} weights" if pruned else "prune_linear_blocks_ pruned no layer"
        known = "nn.Linear, nn.MultiheadAttention and transformers' Conv1D"
        detail = f"; not pruned, 2-D weights of other modules: {', '.join(skipped)}" if skipped else ""
        warnings.warn(f"{message} (it prunes {known}){detail}", UserWarning, stacklevel=2)
    return pruned


def prune_conv1x1_blocks_(
    model: nn.Module,
    sparsity: float,
    blocksize: int,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Block-prunes the weights of every convolution the ``sparse`` backend can run sparse.

    Those are the 1x1 convolutions with ``groups=1``, no padding and not transposed
    (``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``, any stride): a matmul over channels, which the
    backend runs in its sparse format (``passes/sparse_conv.py``). Their ``[out, in]`` view is
    pruned in ``blocksize x blocksize`` blocks, exactly the blocks BSR skips. Other convolutions
    (kxk, depthwise/grouped, padded 1x1) run dense whatever their zeros, so they are left as they
    are. A ``UserWarning`` names the 1x1 ones left (grouped, padded, transposed: a 1x1 the name
    promises but the backend cannot take), and says so when nothing at all was pruned.

    Args:
        filter_fn: ``(qualified name, module) -> bool``; modules for which it is false are skipped.

    Returns:
        the names of the pruned weights.
    """
    pruned, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        label = f"{name}.weight" if name else "weight"
        why = conv_not_matmul_reason(module)
        if why:
            if all(k == 1 for k in module.kernel_size):
                skipped.append(f"{name or '<root>'} ({why})")
            continue
        weight = module.weight.data
        prune_blocks_(weight.view(weight.shape[0], weight.shape[1]), sparsity, blocksize)
        pruned.append(label)
    if skipped or not pruned:
        message = f"prune_conv1x1_blocks_ pruned {len(pruned)} weights" if pruned else "prune_conv1x1_blocks_ pruned no layer"
        detail = f"; not pruned, {len(skipped)} 1x1 convolutions the backend runs dense: {', '.join(skipped[:5])}" if skipped else ""
        detail += ", ..." if len(skipped) > 5 else ""
        warnings.warn(f"{message} (it prunes 1x1 convolutions, groups=1, no padding){detail}", UserWarning, stacklevel=2)
    return pruned


def conv_not_matmul_reason(module: nn.Module) -> str:
    """Why the backend runs ``module`` (a convolution) dense whatever its zeros, or ``""`` when it is
    a 1x1 convolution it can run sparse (the rule of ``passes/sparse_conv.py``, for modules)."""
    kernel = tuple(module.kernel_size)
    if any(k != 1 for k in kernel):
        return "x".join(map(str, kernel))
    if module.transposed:
        return "transposed"
    if module.groups != 1:
        return f"groups={module.groups}"
    padding = module.padding
    if isinstance(padding, str):
        return "" if padding in ("valid", "same") else f"padding={padding!r}"
    if any(p != 0 for p in padding):
        return f"padding={tuple(padding)}"
    return ""


def _linear_weights(module: nn.Module) -> list[str] | None:
    """Names of ``module``'s own parameters that the backend runs as linear weights, or None."""
    if isinstance(module, nn.Linear):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if _is_transformers_conv1d(module):
        return ["weight"]
    return None


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # Recognised by shape rather than imported: transformers is not a dependency of ours.
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def _has_2d_weight(module: nn.Module) -> bool:
    """A module of a kind we do not know with a 2-D ``weight``: probably a linear of its own."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2
