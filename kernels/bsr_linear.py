"""``y = x @ W^T + bias`` with a BSR weight: launcher, autotuned kernel, ``torch.library`` op.

``torch.ops.sparse_compile.bsr_linear(x, values, crow_indices, col_indices, bias, out_features,
in_features, variant="auto")`` is a ``torch.library.triton_op``: on CUDA its body launches the
Triton kernel through ``wrap_triton``; on CPU it runs the path its ``variant`` names, the compiled
tile kernel, gathered block matmuls or a dense rebuild (``_bsr_linear_cpu``; ``"auto"``: a fixed
rule). A layer the ``sparse`` backend converts on CPU calls the tile kernel's C++ op
``tile_linear`` instead (``sparse_compile/formats/bsr.py``). The ``sparse`` backend inserts the op after AOTAutograd,
where a ``triton_op`` is no longer decomposed: in a ``torch.compile`` graph it is an external call
that Inductor does not fuse around. AOTInductor packages trace each call into its ``wrap_triton``
kernel call instead (``passes/triton_kernels.py``), so the kernel is compiled into the package.
Importing this module registers the op.

Triton is optional: where torch comes without it (CPU-only wheels, some platforms), the op is a
plain ``torch.library.custom_op`` with the same schema, the CPU path works as before, and CUDA
inputs get an error that says to install triton (the ``sparse`` backend leaves such layers dense
and says why, see :func:`kernel_unavailable_reason`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton  # called by bare name: triton_op's kernel discovery (AST) looks for it

from . import cpu_tile_mm
from .bsr_format import BsrWeight
from .common import SUPPORTED_DTYPES, block_view

try:
    import triton

    from .autotune_configs import INTERPRET_CONFIG, all_configs, prune_configs
    from .bsr_linear_kernels import bsr_linear_kernel
except ImportError as error:  # torch without triton: the CPU path needs none of it
    triton = None
    _TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _TRITON_IMPORT_ERROR = ""

__all__ = ["bsr_linear", "bsr_linear_triton", "kernel_unavailable_reason", "HAS_TRITON", "SUPPORTED_DTYPES", "BLOCKSIZES"]

#: Block sizes the kernel is written and autotuned for (``options.CANDIDATE_BLOCKSIZES``,
#: ``benchmarks.common.BLOCKSIZES``). Smaller blocks waste the tensor cores, larger ones rarely
#: find empty blocks in a learned mask.
BLOCKSIZES = (16, 32, 64, 128)

#: Whether the Triton kernel can be used at all in this process.
HAS_TRITON = triton is not None

# triton.jit decides at decoration time whether kernels are interpreted; follow the same knob.
_INTERPRET = HAS_TRITON and bool(triton.knobs.runtime.interpret)

if not HAS_TRITON:
    _bsr_linear_autotuned = None
elif _INTERPRET:
    _bsr_linear_autotuned = triton.autotune(configs=[INTERPRET_CONFIG], key=[])(bsr_linear_kernel)
else:
    _bsr_linear_autotuned = triton.autotune(
        configs=all_configs(),
        key=["m_bucket", "N", "K", "nnz_bucket", "BLOCKSIZE", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": prune_configs},
    )(bsr_linear_kernel)


def kernel_unavailable_reason(device_type: str) -> str:
    """Why the op cannot run on ``device_type`` in this process, or ``""`` when it can.

    CPU always works (torch ops); CUDA needs triton; other devices have no implementation.
    """
    if device_type == "cpu":
        return ""
    if device_type == "cuda":
        if HAS_TRITON:
            return ""
        return f"no Triton kernel: triton cannot be imported ({_TRITON_IMPORT_ERROR}); install triton"
    return f"no BSR kernel for device {device_type!r} (cpu and cuda only)"


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def _check_inputs(
    x: Tensor,
    values: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
) -> None:
    """Shape/dtype checks that need no data (they also run in the fake implementation)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bsr_linear: x must be one of {_dtype_names()}, got {x.dtype}")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        got = f"x {x.dtype}, values {values.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"bsr_linear: x, values and bias must share one dtype ({_dtype_names()}); got {got}")
    if x.dim() < 1:
        raise ValueError("bsr_linear: x must have at least one dim [..., in_features]")
    if x.shape[-1] != in_features:
        # Without this check the kernel would read the zero padding of the last block column
        # (x too narrow) or ignore x's extra features (x too wide): a wrong answer, silently.
        raise ValueError(
            f"bsr_linear: x has {x.shape[-1]} features in its last dim, the weight expects "
            f"in_features={in_features}"
        )
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"bsr_linear: values must be [nnz_blocks, b, b], got {tuple(values.shape)}")
    b = values.shape[1]
    if b < 16 or b & (b - 1):
        raise ValueError(f"bsr_linear: block size must be a power of two >= 16, got {b}")
    if crow_indices.dtype != torch.int32 or col_indices.dtype != torch.int32:
        raise TypeError(
            "bsr_linear: crow_indices and col_indices must be int32, "
            f"got {crow_indices.dtype} and {col_indices.dtype}"
        )
    if crow_indices.dim() != 1 or col_indices.dim() != 1 or col_indices.shape[0] != values.shape[0]:
        raise ValueError(
            "bsr_linear: expected crow_indices [N/b + 1], col_indices [nnz_blocks] matching values; got "
            f"{tuple(crow_indices.shape)}, {tuple(col_indices.shape)}, values {tuple(values.shape)}"
        )
    if out_features < 0 or crow_indices.shape[0] != -(-out_features // b) + 1:
        raise ValueError(
            f"bsr_linear: out_features={out_features} needs ceil(out_features/{b}) + 1 = "
            f"{-(-out_features // b) + 1} row pointers, got {crow_indices.shape[0]}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bsr_linear: bias must be [{out_features}], got {tuple(bias.shape)}")
    devices = {t.device for t in (x, values, crow_indices, col_indices) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"bsr_linear: all tensors must be on one device, got {sorted(map(str, devices))}")


def _next_pow2(n):
    """Autotune bucket. A SymInt (dynamic shapes under torch.compile) is passed through
    unchanged: bucketing it would guard on its value, and Inductor autotunes on its own."""
    if not isinstance(n, int):
        return n
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _input_precision(dtype: torch.dtype) -> str:
    # Match what dense fp32 matmul does on this process; fp16/bf16 ignore the setting.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(x2d, values, crow_indices, col_indices, bias, out_features: int) -> Tensor:
    """Run the kernel on ``x2d`` ``[M, K]``; returns ``[M, out_features]`` in ``x2d.dtype``."""
    m, k = x2d.shape
    b = values.shape[1]
    out = torch.empty((m, out_features), dtype=x2d.dtype, device=x2d.device)
    if m == 0 or out_features == 0:
        return out
    crow_indices = crow_indices.contiguous()
    col_indices = col_indices.contiguous()
    bias_arg = bias.contiguous() if bias is not None else out  # never read when HAS_BIAS is False
    n_block_rows = crow_indices.shape[0] - 1

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * n_block_rows,)

    # wrap_triton cannot take interpreted kernels (it unwraps `.fn` until it finds a
    # JITFunction, and an InterpretedFunction's `.fn` is a plain function); under the
    # interpreter there is no compiler to show the kernel to anyway.
    kernel = _bsr_linear_autotuned if _INTERPRET else wrap_triton(_bsr_linear_autotuned)
    kernel[grid](
        x2d,
        values,
        crow_indices,
        col_indices,
        bias_arg,
        out,
        m,
        out_features,
        k,
        x2d.stride(0),
        x2d.stride(1),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        out.stride(0),
        out.stride(1),
        _next_pow2(m),
        _next_pow2(values.shape[0]),
        HAS_BIAS=bias is not None,
        BLOCKSIZE=b,
        INPUT_PRECISION=_input_precision(x2d.dtype),
        INTERPRET=_INTERPRET,
    )
    return out


def bsr_linear_triton(
    x2d: Tensor,
    values: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
) -> Tensor:
    """Launch the Triton kernel directly (no op dispatch): ``x2d`` ``[M, in_features]`` -> ``[M, out_features]``.

    Works on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests use that).
    """
    _check_inputs(x2d, values, crow_indices, col_indices, bias, out_features, in_features)
    if x2d.dim() != 2:
        raise ValueError(f"bsr_linear_triton: x2d must be [M, K], got {tuple(x2d.shape)}")
    if not HAS_TRITON:
        raise RuntimeError(f"bsr_linear_triton: {kernel_unavailable_reason('cuda')}")
    if x2d.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("bsr_linear_triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return _launch(x2d, values, crow_indices, col_indices, bias, out_features)


def _bsr_linear_torch(x2d, values, crow_indices, col_indices, bias, out_features: int) -> Tensor:
    """Non-CUDA op body: rebuild the dense weight from the blocks, then one addmm.

    Traceable (plain aten ops, no data-dependent shapes), so it is also what torch.compile on
    CPU sees when a user's own model calls the op (AOTAutograd decomposes a triton_op); with
    frozen weights Inductor then folds the rebuild into a constant. The ``sparse`` backend
    inserts the op after AOTAutograd instead, so there it stays an op call. Eager CPU calls
    pick between this, the tile kernel and ``_bsr_linear_gather_bmm`` (``_bsr_linear_cpu``).
    fp16/bf16: computed in fp32 (fp32 accumulation, as on the GPU), returned in x.dtype.
    """
    xc, values, bias = _to_compute_dtype(x2d, values, bias)
    w = _dense_weight(values, crow_indices, col_indices, out_features, x2d.shape[1])
    out = xc @ w.t() if bias is None else torch.addmm(bias, xc, w.t())
    return out.to(x2d.dtype)


def _to_compute_dtype(x2d, values, bias):
    """fp16/bf16 -> fp32: CPU half matmuls do not all promise fp32 accumulation; the GPU kernel does."""
    if x2d.dtype == torch.float32:
        return x2d, values, bias
    return x2d.float(), values.float(), None if bias is None else bias.float()


def _dense_weight(values, crow_indices, col_indices, out_features: int, k: int) -> Tensor:
    """``[out_features, k]`` dense weight from BSR tensors, with traceable aten ops only."""
    b = values.shape[1]
    nb = crow_indices.shape[0] - 1
    kb = -(-k // b)
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(nb, device=values.device), counts, output_size=values.shape[0])
    w = values.new_zeros((nb * b, kb * b))
    # Scatter the blocks straight into the [nb, b, kb, b] view: one pass, no extra copy.
    block_view(w, b).transpose(1, 2).index_put_((rows, col_indices.long()), values)
    return w[:out_features, :k]


def _bsr_linear_gather_bmm(x2d, values, crow_indices, col_indices, bias, out_features: int) -> Tensor:
    """Sparse CPU path: per stored block, ``x[:, cols] @ block^T`` in one bmm, then sum per block row.

    The [nnz, rows, b] product is computed over chunks of rows so memory stays bounded.
    """
    xc, values, bias = _to_compute_dtype(x2d, values, bias)
    m, k = xc.shape
    b = values.shape[1]
    nb = crow_indices.shape[0] - 1
    kb = -(-k // b)
    nnz = values.shape[0]
    rows = torch.repeat_interleave(torch.arange(nb), (crow_indices[1:] - crow_indices[:-1]).long(), output_size=nnz)
    cols = col_indices.long()
    x_blocks = torch.nn.functional.pad(xc, (0, kb * b - k)).view(m, kb, b)
    w_t = values.transpose(1, 2)  # [nnz, k, n]
    out = xc.new_empty((m, out_features))
    chunk = max(1, _GATHER_CHUNK_ELEMS // max(1, nnz * b))
    for m0 in range(0, m, chunk):
        xs = x_blocks[m0 : m0 + chunk].index_select(1, cols).transpose(0, 1)  # [nnz, chunk, b]
        acc = xc.new_zeros((nb, xs.shape[1], b)).index_add_(0, rows, torch.bmm(xs, w_t))
        out[m0 : m0 + chunk] = acc.transpose(0, 1).reshape(-1, nb * b)[:, :out_features]
    if bias is not None:
        out += bias
    return out.to(x2d.dtype)


def _bsr_linear_tiles(x2d, values, crow_indices, col_indices, bias, out_features: int) -> Tensor:
    """Sparse CPU path: the compiled tile kernel of ``cpu_tile_mm.cpp`` (the masked op's), which
    takes the BSR tensors as they are: stored blocks are its kept tiles, crow/col its tile lists.

    Values go to the kernel as they are: it packs them once per values tensor (a converted layer's
    values are the same graph constant at every call), fp16 converted to fp32 there. bf16
    activations with bf16 values run in bf16 (the CPU's bf16 dot products where it has them, fp32
    accumulation) without converting the activations; fp16 activations are converted to fp32.
    """
    bf16 = x2d.dtype == torch.bfloat16 and values.dtype == torch.bfloat16
    xc = x2d if x2d.dtype == torch.float32 or bf16 else x2d.float()
    bias = None if bias is None else bias.float()
    return cpu_tile_mm.bsr_mm(xc, values, crow_indices, col_indices, bias, out_features).to(x2d.dtype)


# Gather path: at most this many elements in the [nnz, chunk, b] intermediate (64 MiB fp32).
_GATHER_CHUNK_ELEMS = 1 << 24
# CPU, the op's "auto" variant (direct calls; see CPU_VARIANTS below): the tile
# kernel up to _TILES_MAX_DENSITY; where it cannot be built, gather+bmm up to _GATHER_MAX_DENSITY
# with b >= 32; dense rebuild + addmm otherwise.
# Measured (fp32, M = 2 * 197, K = 768, N = 3072, median of 15 round-robin runs after 3
# warm-ups, torch 2.11, quiet 2-core AMD EPYC, 2 threads): `python -m benchmarks.cpu_op`
#   ms                 | dense+addmm | gather+bmm+index_add | tile kernel | torch.sparse BSR | dense W kept
#   b=32, 90% sparse   |    12.1     |         5.9          |     2.2     |       7.9        |    11.1
#   b=32, 50% sparse   |    12.6     |        74.3          |     9.3     |      31.3        |    11.2
#   b=64, 90% sparse   |    11.8     |         3.5          |     2.4     |       8.7        |    11.0
#   b=64, 50% sparse   |    12.5     |        13.2          |     9.9     |      32.3        |    11.3
# (M = 200: at 50% the tile kernel and a dense weight kept in memory are even, 6.3 vs 6.0 ms.)
# Earlier, one thread (`--threads 1`), without the tile kernel:
#   b=32, 90% sparse   |    42.4     |        16.9          |             |      24.0        |    42.2
#   b=32, 50% sparse   |    43.6     |       146.8          |             |      88.7        |    40.2
# Rebuilding W costs only 1-8 ms over a kept dense weight; torch.sparse BSR never wins; gather+bmm
# wins 2-3x at 90% sparsity but loses badly at 50% with b = 32 (1152 tiny GEMMs); the tile kernel
# wins 5x at 90% and still beats the rebuild at 50%.
_TILES_MAX_DENSITY = 0.5
_GATHER_MAX_DENSITY = 0.25
_GATHER_MIN_BLOCKSIZE = 32


# triton_op: where the op is traced before AOTAutograd (a user's model calling it under
# torch.compile) Inductor can see the Triton kernel inside it; the sparse backend inserts it after,
# where it is an external call, except in AOTInductor packages (see the module docstring). Without triton the same schema is a
# plain custom op (CPU and fake implementations only).
_define_op = torch.library.triton_op if HAS_TRITON else torch.library.custom_op


@_define_op("sparse_compile::bsr_linear", mutates_args=())
def _bsr_linear_op(
    x: Tensor,
    values: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
    variant: str = "auto",
) -> Tensor:
    _check_inputs(x, values, crow_indices, col_indices, bias, out_features, in_features)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        if not HAS_TRITON:
            raise RuntimeError(f"sparse_compile::bsr_linear on CUDA: {kernel_unavailable_reason('cuda')}")
        out = _launch(x2d, values, crow_indices, col_indices, bias, out_features)
    else:
        # Reached for CPU under torch.compile (the op is decomposed into its body); eager CPU
        # calls go to the registered "cpu" kernel below, which is the same code.
        out = _bsr_linear_torch(x2d, values, crow_indices, col_indices, bias, out_features)
    return out.reshape(*lead, out_features)


#: The CPU paths of the op, chosen by its ``variant`` argument: ``"tiles"`` (the compiled tile
#: kernel, packing the values once per tensor), ``"gather"`` (gathered block matmuls), ``"rebuild"``
#: (dense weight rebuilt, one addmm), or ``"auto"``: the fixed rule above. The choice travels with
#: the call (a graph, a saved package), never in process state. The sparse backend's converted
#: layers on CPU call the tile kernel's own op, ``sparse_compile::tile_linear``, on tiles packed at
#: conversion (``sparse_compile/formats/bsr.py``); this op's variants serve direct calls and hosts
#: where the tile kernel cannot be built.
CPU_VARIANTS = ("auto", "tiles", "gather", "rebuild")


def sparse_cpu_variant() -> str:
    """The CPU path that skips the dropped blocks: the compiled tile kernel, or, where no compiler
    could build it, the gathered block matmuls."""
    return "tiles" if cpu_tile_mm.unavailable_reason() is None else "gather"


def fixed_rule_cpu_variant(density: float, blocksize: int) -> str:
    """The ``"auto"`` variant for a weight of this block density and size (the table above): the tile
    kernel up to ``_TILES_MAX_DENSITY``; without it gathered matmuls up to ``_GATHER_MAX_DENSITY``
    with blocks of at least ``_GATHER_MIN_BLOCKSIZE``; the dense rebuild otherwise."""
    if sparse_cpu_variant() == "tiles":
        return "tiles" if density <= _TILES_MAX_DENSITY else "rebuild"
    return "gather" if density <= _GATHER_MAX_DENSITY and blocksize >= _GATHER_MIN_BLOCKSIZE else "rebuild"


def _check_variant(variant: str) -> None:
    if variant not in CPU_VARIANTS:
        raise ValueError(f"bsr_linear: variant must be one of {CPU_VARIANTS}, got {variant!r}")
    if variant == "tiles" and cpu_tile_mm.unavailable_reason() is not None:
        raise RuntimeError(f"bsr_linear: variant 'tiles' needs the CPU tile kernel: {cpu_tile_mm.unavailable_reason()}")


def _cpu_variant(x2d: Tensor, values: Tensor, crow_indices: Tensor, variant: str) -> str:
    if x2d.shape[0] == 0:
        return "rebuild"
    if variant != "auto":
        return variant
    b = values.shape[1]
    density = values.shape[0] / ((crow_indices.shape[0] - 1) * -(-x2d.shape[1] // b))
    return fixed_rule_cpu_variant(density, b)


@_bsr_linear_op.register_kernel("cpu")
def _bsr_linear_cpu(x, values, crow_indices, col_indices, bias, out_features, in_features, variant="auto"):
    _check_inputs(x, values, crow_indices, col_indices, bias, out_features, in_features)
    _check_variant(variant)
    x2d = x.reshape(-1, x.shape[-1])
    args = (x2d, values, crow_indices, col_indices, bias, out_features)
    path = _cpu_variant(x2d, values, crow_indices, variant)
    if path == "tiles":
        out = _bsr_linear_tiles(*args)
    elif path == "gather":
        out = _bsr_linear_gather_bmm(*args)
    else:
        out = _bsr_linear_torch(*args)
    return out.reshape(*x.shape[:-1], out_features)


@_bsr_linear_op.register_fake
def _bsr_linear_fake(x, values, crow_indices, col_indices, bias, out_features, in_features, variant="auto"):
    _check_inputs(x, values, crow_indices, col_indices, bias, out_features, in_features)
    if variant not in CPU_VARIANTS:
        raise ValueError(f"bsr_linear: variant must be one of {CPU_VARIANTS}, got {variant!r}")
    return x.new_empty((*x.shape[:-1], out_features))


def bsr_linear(x: Tensor, weight: BsrWeight, bias: Optional[Tensor] = None, variant: str = "auto") -> Tensor:
    """``x @ W^T + bias`` for a :class:`BsrWeight` ``W``; ``x`` is ``[..., in_features]``. On CPU
    ``variant`` picks the path (:data:`CPU_VARIANTS`); CUDA has one, the Triton kernel."""
    return torch.ops.sparse_compile.bsr_linear(
        x, weight.values, weight.crow_indices, weight.col_indices, bias, weight.out_features, weight.in_features, variant
    )

