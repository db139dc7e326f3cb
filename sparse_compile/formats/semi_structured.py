"""2:4 semi-structured: the analysis rule for N:M-trained weights (2:4, 1:4, 2:8, 1:8, Bi-Mask).

N:M masks are fine-grained: every block keeps nonzeros, so BSR finds nothing to skip. A weight
qualifies for 2:4 when every group of 4 consecutive input features of every row holds at most 2
nonzeros: a 2:4 or 1:4 mask by construction, a 2:8 or 1:8 mask too (each half of a group of 8
holds at most 2), a 4:8 mask only when no half holds 3 or 4. The op is
``torch.ops.sparse_compile.semi_structured_linear`` (``kernels/semi_structured.py``: torch's
cuSPARSELt or CUTLASS kernels on CUDA, an exact reference on CPU); dtypes and shape constraints
come from that file (and, through it, from torch's ``_DTYPE_SHAPE_CONSTRAINTS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch

from sparse_compile.formats.base import Candidate, ConvertedWeight, Reason, ReasonCode, SparseFormat, ThresholdChoice
from sparse_compile.kernels import semi_structured as kernels

if TYPE_CHECKING:
    from sparse_compile.options import SparseOptions


def incompatibility(weight: torch.Tensor) -> str:
    """Why ``weight`` ``[out, in]`` is not 2:4 (a group of 4 inputs with more than 2 nonzeros,
    named), or ``""`` when it is."""
    out_features, in_features = weight.shape
    group, keep = kernels.GROUP, kernels.KEEP
    if in_features % group:
        return f"not 2:4: in_features {in_features} is not a multiple of {group} (the group of inputs)"
    counts = weight.ne(0).view(out_features, in_features // group, group).sum(-1)
    over = counts > keep
    if not bool(over.any()):
        return ""
    row, index = (int(i) for i in over.nonzero()[0])
    return (
        f"not 2:4: inputs {index * group}-{index * group + group - 1} of row {row} hold "
        f"{int(counts[row, index])} nonzeros (at most {keep} in every {group})"
    )


class SemiStructuredFormat(SparseFormat):
    name = "2:4"
    display_name = "2:4"
    counter = "semi_structured"
    dtypes = kernels.SUPPORTED_DTYPES

    def unavailable_reason(self, device_type: str) -> str:
        return kernels.unavailable_reason(device_type)

    def candidates(self, weight: torch.Tensor, options: "SparseOptions") -> Union[list[Candidate], Reason]:
        device_type = weight.device.type
        if device_type == "cuda" and weight.dtype not in kernels.CUDA_DTYPES:
            return Reason(
                ReasonCode.NOT_2_4,
                f"not 2:4: torch's CUDA 2:4 kernels take float16/bfloat16, not {str(weight.dtype).removeprefix('torch.')} "
                "(cuSPARSELt has no float32; CUTLASS float32 is 1:2 sparsity, as TF32)",
            )
        why = incompatibility(weight) or kernels.shape_reason(*weight.shape, weight.dtype, device_type)
        return Reason(ReasonCode.NOT_2_4, why) if why else [Candidate(self.name)]

    def pick_by_threshold(
        self, weight: torch.Tensor, candidates: Sequence[Candidate], options: "SparseOptions"
    ) -> ThresholdChoice:
        # The density threshold is about blocks; a 2:4 weight always skips half the math.
        return ThresholdChoice(candidates[0], candidates[0])

    def describe(self, candidate: Candidate) -> str:
        return "2:4"

    def kernel(self, device_type: str, dtype: torch.dtype) -> str:
        if device_type == "cuda":
            return kernels.cuda_kernel() or "none"
        return "reference (cpu)"

    def convert(self, weight: torch.Tensor, candidate: Candidate) -> ConvertedWeight:
        kernel = kernels.cuda_kernel(weight.device) if weight.device.type == "cuda" else "cutlass"
        values, meta = kernels.compress(weight.detach(), kernel)
        out_features, in_features = weight.shape
        return ConvertedWeight(
            op=torch.ops.sparse_compile.semi_structured_linear.default,
            constants=(("_sparse_24_values", values), ("_sparse_24_meta", meta)),
            static_args=(out_features, in_features, kernel),
            out_features=out_features,
        )


SEMI_STRUCTURED = SemiStructuredFormat()
