"""BSR (block-sparse rows): the analysis rule for block-pruned and Supermask-tiled weights.

A weight qualifies when some of its ``b x b`` blocks are all zero: those blocks are not stored
and not multiplied. Candidates are the block sizes of ``kernels/bsr_linear.py: BLOCKSIZES`` that
have a block to skip; the op is ``torch.ops.sparse_compile.bsr_linear`` (Triton) on CUDA and the
CPU tile kernel's ``torch.ops.sparse_compile.tile_linear`` on CPU (see :meth:`BsrFormat.convert`);
its dtypes are the kernel file's ``SUPPORTED_DTYPES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch

from sparse_compile.formats.base import (
    Candidate,
    ConvertedWeight,
    Reason,
    ReasonCode,
    SparseFormat,
    ThresholdChoice,
    next_power_of_2,
)
from sparse_compile.kernels import BsrWeight, block_mask, cpu_tile_mm
from sparse_compile.kernels.bsr_linear import (
    SUPPORTED_DTYPES,
    fixed_rule_cpu_variant,
    kernel_unavailable_reason,
    sparse_cpu_variant,
)

if TYPE_CHECKING:
    from sparse_compile.options import SparseOptions

#: Estimated cost of a stored block relative to the same work in a dense matmul, per block size.
#: Small blocks keep the tensor cores less busy and read the activation more often. Used only
#: with a numeric ``density_threshold``, to rank block sizes under ``blocksize="auto"``: the
#: chosen size minimises
#: ``density * overhead``. The numbers follow the shape of torch's BSR kernel tables
#: (torch/sparse/_triton_ops_meta.py: larger blocks reach a larger fraction of dense throughput);
#: GPU timings will replace them.
BLOCK_OVERHEAD = {16: 2.0, 32: 1.4, 64: 1.15, 128: 1.1}


def block_density(weight: torch.Tensor, blocksize: int) -> float:
    """Fraction of the ``blocksize x blocksize`` blocks of ``weight`` that hold a nonzero.

    Ragged edges count as whole (zero-padded) blocks, as the kernel stores them.
    """
    mask = block_mask(weight, blocksize)
    return float(mask.float().mean()) if mask.numel() else 0.0


def candidate_blocksizes(shape: tuple[int, int], options: "SparseOptions") -> list[int]:
    """Block sizes worth trying for a weight of ``shape``.

    A fixed ``blocksize`` is always tried: the BSR copy zero-pads a dim smaller than one block,
    and the op computes such a layer exactly (timm Mixer's 16x384 token mixing at block 32:
    12 padded blocks). Under ``"auto"``, sizes beyond the smallest dim rounded up to a power
    of two are left out: they only add padding to the blocks the smaller size stores.
    """
    sizes = options.blocksizes
    if len(sizes) == 1:
        return list(sizes)
    smallest = min(shape)
    fits = [b for b in sizes if b <= max(sizes[0], next_power_of_2(smallest))]
    return fits or [sizes[0]]


class BsrFormat(SparseFormat):
    name = "bsr"
    display_name = "BSR"
    counter = "bsr"
    dtypes = SUPPORTED_DTYPES

    def unavailable_reason(self, device_type: str) -> str:
        return kernel_unavailable_reason(device_type)

    def candidates(self, weight: torch.Tensor, options: "SparseOptions") -> Union[list[Candidate], Reason]:
        """Every candidate block size with its block density (density 1: nothing to skip, still
        returned: the threshold rule and the report show its numbers)."""
        return [Candidate(self.name, b, block_density(weight, b)) for b in candidate_blocksizes(weight.shape, options)]

    def pick_by_threshold(
        self, weight: torch.Tensor, candidates: Sequence[Candidate], options: "SparseOptions"
    ) -> ThresholdChoice:
        # As before measuring existed: sizes up to the smallest dim (a narrow weight: the smallest size).
        ranked = [c for c in candidates if c.blocksize <= min(weight.shape)] or list(candidates[:1])
        best = min(ranked, key=lambda c: (c.density * BLOCK_OVERHEAD[c.blocksize], -c.blocksize))
        if best.density > options.density_threshold:
            why = f"block density {best.density:.2f} > threshold {options.density_threshold:.2f}"
            return ThresholdChoice(None, best, Reason(ReasonCode.ABOVE_THRESHOLD, why))
        return ThresholdChoice(best, best)

    def timed_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Candidates worth timing: those with a block to skip."""
        return [c for c in candidates if c.density < 1.0]

    def nothing_to_time_reason(self, candidates: Sequence[Candidate]) -> Reason:
        sizes = "/".join(str(c.blocksize) for c in candidates)
        return Reason(ReasonCode.NO_BLOCK_TO_SKIP, f"every block holds a nonzero at block size {sizes}: no block to skip")

    def describe(self, candidate: Candidate) -> str:
        return f"BSR at block {candidate.blocksize} (density {candidate.density:.2f})"

    def kernel(self, device_type: str, dtype: torch.dtype) -> str:
        if device_type == "cuda":
            return "triton bsr"
        # The op's CPU path for a converted layer: the tile kernel, or gathered block matmuls
        # where no C++ compiler could build it.
        return "tile kernel (cpu)" if sparse_cpu_variant() == "tiles" else "torch ops (cpu)"

    def convert(self, weight: torch.Tensor, candidate: Candidate) -> ConvertedWeight:
        """The op call of a converted layer, its kernel fixed in the call (never process state):

        - CPU with the tile kernel: ``sparse_compile::tile_linear`` (C++) on the stored blocks
          packed now, once, into the layout the kernel reads (bf16 pairs for a bf16 weight where
          the CPU has bf16 dot products), with the BSR row pointers and block columns;
        - CPU without it (no C++ compiler): ``sparse_compile::bsr_linear`` with its gathered
          block matmuls where they can win (``variant="gather"``), else its dense rebuild (which
          never beats dense: a timed decision leaves such a layer dense);
        - CUDA: ``sparse_compile::bsr_linear`` (its Triton kernel).

        The backend times what this returns (``SparseFormat.timing_run``): what is timed is what runs.
        """
        bsr = BsrWeight.from_dense(weight.detach(), candidate.blocksize)
        if weight.device.type == "cpu" and sparse_cpu_variant() == "tiles":
            packed, packed_format = cpu_tile_mm.pack_bsr_values(bsr.values, weight.dtype)
            col_idx = bsr.col_indices if bsr.nnz_blocks else torch.zeros(1, dtype=torch.int32)
            return ConvertedWeight(
                op=torch.ops.sparse_compile.tile_linear.default,
                constants=(
                    ("_sparse_tiles_packed", packed),
                    ("_sparse_tiles_row_ptr", bsr.crow_indices.contiguous()),
                    ("_sparse_tiles_col", col_idx.contiguous()),
                ),
                static_args=(bsr.out_features, bsr.in_features, bsr.blocksize, packed_format),
                out_features=bsr.out_features,
                # The kernel adds the bias in fp32: a bf16 one converted per call cost ~5 us a layer.
                bias_dtype=torch.float32,
            )
        static_args = (bsr.out_features, bsr.in_features)
        if weight.device.type == "cpu":
            static_args += (fixed_rule_cpu_variant(candidate.density, candidate.blocksize),)
        return ConvertedWeight(
            op=torch.ops.sparse_compile.bsr_linear.default,
            constants=(
                ("_sparse_bsr_values", bsr.values.contiguous()),
                ("_sparse_bsr_crow", bsr.crow_indices),
                ("_sparse_bsr_col", bsr.col_indices),
            ),
            static_args=static_args,
            out_features=bsr.out_features,
        )


BSR = BsrFormat()
