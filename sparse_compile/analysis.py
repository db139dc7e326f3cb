"""Weight analysis: is this linear weight sparse enough, in blocks, to run as BSR?

This layer knows nothing about graphs: it takes a dense weight ``[out_features, in_features]``
(whatever produced it: a pruned checkpoint, a parametrized mask folded by freezing,
``torch.ao.pruning``) and returns a :class:`LayerDecision` with the numbers behind it.
"""

from __future__ import annotations

import dataclasses

import torch

from sparse_compile.kernels import block_mask
from sparse_compile.options import SparseOptions

#: Dtypes the BSR kernel takes (fp32 accumulation for all of them).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Estimated cost of a stored block relative to the same work in a dense matmul, per block size.
#: Small blocks keep the tensor cores less busy and read the activation more often. Used only
#: to rank block sizes under ``blocksize="auto"``: the chosen size minimises
#: ``density * overhead``. The numbers follow the shape of torch's BSR kernel tables
#: (torch/sparse/_triton_ops_meta.py: larger blocks reach a larger fraction of dense throughput);
#: GPU timings will replace them.
BLOCK_OVERHEAD = {16: 2.0, 32: 1.4, 64: 1.15, 128: 1.1}


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the pass does with one linear weight, and why.

    Attributes:
        format: ``"bsr"`` or ``"dense"``.
        blocksize: the block size measured (and used, for BSR); ``None`` when none was measured.
        density: stored blocks / all blocks at ``blocksize`` (``None`` when not measured).
        reason: for dense layers, why; empty for BSR layers.
    """

    format: str
    blocksize: int | None
    density: float | None
    reason: str = ""

    @property
    def is_sparse(self) -> bool:
        return self.format == "bsr"


def block_density(weight: torch.Tensor, blocksize: int) -> float:
    """Fraction of the ``blocksize x blocksize`` blocks of ``weight`` that hold a nonzero.

    Ragged edges count as whole (zero-padded) blocks, as the kernel stores them.
    """
    mask = block_mask(weight, blocksize)
    return float(mask.float().mean()) if mask.numel() else 0.0


def decide(weight: torch.Tensor, options: SparseOptions) -> LayerDecision:
    """Chooses BSR or dense for a linear weight ``[out_features, in_features]``."""
    if weight.dim() != 2:
        return LayerDecision("dense", None, None, f"weight is {weight.dim()}-D, not a 2-D linear weight")
    if weight.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        return LayerDecision(
            "dense", None, None,
            f"dtype {str(weight.dtype).removeprefix('torch.')} has no sparse kernel ({supported} only)",
        )
    smallest_dim = min(weight.shape)
    candidates = [b for b in options.blocksizes if b <= smallest_dim]
    if not candidates:
        return LayerDecision(
            "dense", None, None,
            f"weight {tuple(weight.shape)} is smaller than one {options.blocksizes[0]}x"
            f"{options.blocksizes[0]} block",
        )
    densities = {b: block_density(weight, b) for b in candidates}
    blocksize = min(candidates, key=lambda b: (densities[b] * BLOCK_OVERHEAD[b], -b))
    density = densities[blocksize]
    if density > options.density_threshold:
        return LayerDecision(
            "dense", blocksize, density,
            f"block density {density:.2f} > threshold {options.density_threshold:.2f}",
        )
    return LayerDecision("bsr", blocksize, density)
