"""``y = x @ W^T + bias`` with a 2:4 semi-structured weight: torch's kernels, and the op around them.

A weight is 2:4 when every group of 4 consecutive input features of every row holds at most 2
nonzeros (so 1:4, 2:8 and 1:8 masks are 2:4 too). Ampere (sm80) and Hopper (sm90) tensor cores
multiply such a weight stored as its kept half plus 2-bit indices: half the math, ~56% of the
weight bytes (fp16). torch ships the kernels; this file calls them, it does not rebuild them:

- **cuSPARSELt** (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``, bias fused), when
  ``torch.backends.cusparselt.is_available()``, on sm80 and sm90;
- **CUTLASS** (``sparse_semi_structured_from_dense_cutlass`` / ``torch._sparse_semi_structured_addmm``,
  bias fused), the fallback, on sm80 only (torch's own tests run it on sm8x only).
  ``torch._sparse_semi_structured_linear`` is deprecated in torch 2.11 (it says so when called),
  so the op calls ``_sparse_semi_structured_mm``/``_addmm`` as ``SparseSemiStructuredTensorCUTLASS``
  does.
- **CPU**: an exact reference, no speed claim. It stores the CUTLASS layout, built by torch's
  pure-PyTorch compressor (which runs on CPU), and decompresses it with torch's
  ``sparse_semi_structured_to_dense_cutlass`` at each call, then one fp32 ``addmm``: the CPU
  tests check the very constants the CUDA CUTLASS kernel reads. On CPU this is slower than dense
  ``F.linear`` (it is dense work plus a decompression), so with ``density_threshold="auto"`` the
  measured choice keeps CPU layers dense; a numeric threshold converts them.

float32: torch's CUDA kernels have no 2:4 float32 (cuSPARSELt takes fp16/bf16/int8/fp8; CUTLASS
float32 is 1:2 sparsity, run as TF32), so float32 is 2:4 on CPU only (the reference; its
constants use the fp16 metadata layout with float32 values, see :func:`compress_cutlass`).

``torch.ops.sparse_compile.semi_structured_linear(x, values, meta, bias, out_features,
in_features, kernel)``: ``kernel`` is ``"cusparselt"`` (``values`` is cuSPARSELt's packed
tensor, ``meta`` None) or ``"cutlass"`` (``values`` ``[out, in/2]``, ``meta`` int16
``[out, in/16]``, CUTLASS's reordered layout). Importing this module registers the op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from .common import SUPPORTED_DTYPES

__all__ = [
    "CUDA_DTYPES",
    "GROUP",
    "KERNELS",
    "SUPPORTED_DTYPES",
    "compress",
    "compress_cutlass",
    "cuda_kernel",
    "cuda_kernels",
    "decompress_cutlass",
    "semi_structured_linear",
    "shape_reason",
    "unavailable_reason",
]

#: Inputs per group; at most ``KEEP`` nonzeros in each.
GROUP = 4
KEEP = 2

#: Dtypes the op takes on some device: ``common.SUPPORTED_DTYPES`` (the CPU reference takes all of
#: them); torch's CUDA 2:4 kernels take these of them:
CUDA_DTYPES = (torch.float16, torch.bfloat16)

#: Values of the op's ``kernel`` argument.
KERNELS = ("cusparselt", "cutlass")


def _constraint(backend: str, dtype: torch.dtype):
    """torch's ``_DTYPE_SHAPE_CONSTRAINTS`` for a backend: (sparse_min_rows, sparse_min_cols,
    dense_min_rows, dense_min_cols). float32 on CPU uses fp16's: its constants use fp16's layout."""
    table = (SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS)
    return table._DTYPE_SHAPE_CONSTRAINTS[torch.float16 if dtype == torch.float32 else dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cuda_kernels(device: torch.device | str | None = None) -> list[str]:
    """torch's 2:4 kernels on this CUDA device, preferred first: cuSPARSELt on sm80/sm90 when
    torch has it, CUTLASS on sm80 (as torch's test_sparse_semi_structured.py selects them)."""
    if not torch.cuda.is_available():
        return []
    major, _ = torch.cuda.get_device_capability(device)
    found = []
    if major in (8, 9) and torch.backends.cusparselt.is_available():
        found.append("cusparselt")
    if major == 8:
        found.append("cutlass")
    return found


def cuda_kernel(device: torch.device | str | None = None) -> str:
    """The kernel the op runs on this CUDA device: ``"cusparselt"``, ``"cutlass"``, or ``""``
    when torch has no 2:4 kernel for it (see :func:`unavailable_reason`)."""
    return next(iter(cuda_kernels(device)), "")


def unavailable_reason(device_type: str) -> str:
    """Why the op cannot run 2:4 on ``device_type``, or ``""``. CPU: always the reference."""
    if device_type == "cpu":
        return ""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device in this process"
        if cuda_kernel():
            return ""
        major, minor = torch.cuda.get_device_capability()
        return (
            f"no 2:4 kernel for sm{major}{minor}: torch's cuSPARSELt kernels need sm80/sm90 "
            f"(cuSPARSELt available: {torch.backends.cusparselt.is_available()}), CUTLASS sm80"
        )
    return f"no 2:4 kernel for device {device_type!r} (cpu and cuda only)"


def shape_reason(out_features: int, in_features: int, dtype: torch.dtype, device_type: str) -> str:
    """Why a weight ``[out_features, in_features]`` cannot be compressed for the kernel that
    would run it, or ``""``. Such layers stay dense (no padding: a padded weight would add
    zero work to every call, and the shapes of the models this project trains fit)."""
    backend = cuda_kernel() if device_type == "cuda" else "cutlass"
    rows, cols = _constraint(backend or "cutlass", dtype)[:2]
    if out_features % rows or in_features % cols:
        where = f"torch's {backend} kernel" if device_type == "cuda" else "the CUTLASS layout the CPU reference stores"
        return (
            f"not 2:4: {out_features}x{in_features} is not a multiple of {rows}x{cols} "
            f"(out x in features), which {where} needs for {_dtype_name(dtype)}"
        )
    return ""


def compress_cutlass(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(values [out, in/2], meta int16 [out, in/16])`` of a 2:4 weight, in CUTLASS's layout.

    fp16/bf16: torch's ``sparse_semi_structured_from_dense_cutlass``, as
    ``SparseSemiStructuredTensorCUTLASS.from_dense`` calls it (it runs on CPU too). float32:
    torch's compressor reads float32 as 1:2 (the TF32 kernel), so the metadata is taken from the
    fp16 compression of the weight's nonzero pattern, and the float32 values are placed where
    torch's decompressor puts each kept slot (found by decompressing the slot numbers).
    Groups with fewer than 2 nonzeros store zeros in the free slots.
    """
    if weight.dtype != torch.float32:
        return sparse_semi_structured_from_dense_cutlass(weight.contiguous())
    _, meta = sparse_semi_structured_from_dense_cutlass(weight.ne(0).to(torch.float16))
    out_features, in_features = weight.shape
    slots = torch.arange(1, out_features * in_features // 2 + 1, dtype=torch.int32, device=weight.device)
    where = sparse_semi_structured_to_dense_cutlass(slots.view(out_features, in_features // 2), meta)
    kept = where > 0
    values = torch.zeros(out_features * in_features // 2, dtype=weight.dtype, device=weight.device)
    values[where[kept].long() - 1] = weight[kept]
    return values.view(out_features, in_features // 2), meta


def decompress_cutlass(values: Tensor, meta: Tensor) -> Tensor:
    """The dense weight ``[out, in]`` back from :func:`compress_cutlass`'s tensors (torch's
    ``sparse_semi_structured_to_dense_cutlass``; float32 values travel as their int32 bits, which
    torch's decompressor moves as it moves fp16 values)."""
    if values.dtype == torch.float32:
        return sparse_semi_structured_to_dense_cutlass(values.view(torch.int32), meta).view(torch.float32)
    return sparse_semi_structured_to_dense_cutlass(values, meta)


def compress(weight: Tensor, kernel: str) -> tuple[Tensor, Optional[Tensor]]:
    """``(values, meta)`` for the op's ``kernel``, compressed once (the pass stores them as constants)."""
    if kernel == "cusparselt":
        return torch._cslt_compress(weight.contiguous()), None
    if kernel == "cutlass":
        return compress_cutlass(weight)
    raise ValueError(f"semi_structured_linear: kernel must be one of {KERNELS}, got {kernel!r}")


def _check_inputs(x, values, meta, bias, out_features: int, in_features: int, kernel: str) -> None:
    """Checks that need no data (they also run in the fake implementation)."""
    if kernel not in KERNELS:
        raise ValueError(f"semi_structured_linear: kernel must be one of {KERNELS}, got {kernel!r}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"semi_structured_linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        got = f"x {x.dtype}, values {values.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"semi_structured_linear: x, values and bias must share one dtype; got {got}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"semi_structured_linear: x must be [..., {in_features}], got {tuple(x.shape)}"
        )
    if kernel == "cutlass":
        if meta is None or meta.dtype != torch.int16:
            raise TypeError("semi_structured_linear: the cutlass layout needs an int16 meta tensor")
        if tuple(values.shape) != (out_features, in_features // 2):
            raise ValueError(
                f"semi_structured_linear: values must be [{out_features}, {in_features // 2}], got {tuple(values.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"semi_structured_linear: bias must be [{out_features}], got {tuple(bias.shape)}")


def _pad_rows(x2d: Tensor, multiple: int) -> Tensor:
    """Rows up to a multiple of the kernels' dense_min_rows (torch pads the dense operand the same way)."""
    pad = -x2d.shape[0] % multiple
    return torch.nn.functional.pad(x2d, (0, 0, 0, pad)) if pad else x2d


def _linear_cuda(x2d, values, meta, bias, kernel: str) -> Tensor:
    """CUDA: the weight is the sparse left operand, ``out^T = W @ x^T (+ bias per row)``, as
    ``SparseSemiStructuredTensor``'s ``_mm`` computes ``F.linear``."""
    m = x2d.shape[0]
    x_pad = _pad_rows(x2d, _constraint(kernel, x2d.dtype).dense_min_rows)
    if kernel == "cusparselt":
        out_t = torch._cslt_sparse_mm(values, x_pad.t(), bias=bias)
    elif bias is None:
        out_t = torch._sparse_semi_structured_mm(values, meta, x_pad.t())
    else:
        out_t = torch._sparse_semi_structured_addmm(bias, values, meta, x_pad.t())
    return out_t.t()[:m]


def _linear_reference(x2d, values, meta, bias, kernel: str) -> Tensor:
    """Any device but CUDA: decompress the CUTLASS layout, one fp32 addmm (fp32 accumulation,
    as the tensor cores), result in x's dtype."""
    if kernel != "cutlass":
        raise RuntimeError(
            f"semi_structured_linear: the {kernel} layout is opaque outside CUDA; the CPU reference reads the cutlass one"
        )
    weight = decompress_cutlass(values, meta).float()
    xc = x2d.float()
    out = xc @ weight.t() if bias is None else torch.addmm(bias.float(), xc, weight.t())
    return out.to(x2d.dtype)


@torch.library.custom_op("sparse_compile::semi_structured_linear", mutates_args=())
def _semi_structured_linear_op(
    x: Tensor,
    values: Tensor,
    meta: Optional[Tensor],
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
    kernel: str,
) -> Tensor:
    _check_inputs(x, values, meta, bias, out_features, in_features, kernel)
    x2d = x.reshape(-1, in_features)
    if x.device.type == "cuda":
        out = _linear_cuda(x2d, values, meta, bias, kernel)
    else:
        out = _linear_reference(x2d, values, meta, bias, kernel)
    return out.reshape(*x.shape[:-1], out_features)


@_semi_structured_linear_op.register_fake
def _semi_structured_linear_fake(x, values, meta, bias, out_features, in_features, kernel):
    _check_inputs(x, values, meta, bias, out_features, in_features, kernel)
    return x.new_empty((*x.shape[:-1], out_features))


def semi_structured_linear(
    x: Tensor, values: Tensor, meta: Optional[Tensor], bias: Optional[Tensor], out_features: int, kernel: str
) -> Tensor:
    """``x @ W^T + bias`` for a weight compressed by :func:`compress` (``x`` ``[..., in_features]``)."""
    return torch.ops.sparse_compile.semi_structured_linear(
        x, values, meta, bias, out_features, x.shape[-1], kernel
    )
