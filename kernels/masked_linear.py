"""Masked linear: ``y = x @ (W ⊙ expand(M))^T + b`` with a per-tile mask ``M`` computed each step.

The training-time counterpart of ``bsr_linear``: the weight stays dense (it changes every
optimizer step), the small tile mask says which ``tile x tile`` tiles are kept, and the matmuls
that can skip dropped tiles do.

Ops (importing this module registers them):

* ``torch.ops.sparse_compile.tile_masked_weight(weight, tile_mask, tile_size)``:
  ``weight * expand(tile_mask).to(weight.dtype)``, the exact aten ops Supermask always ran
  (``CompositeImplicitAutograd``: eager autograd and every compiler see those ops). Supermask
  builds its weight through it so that the ``sparse`` backend can find, in the graph Dynamo
  captured, which linear layers have a tile-masked weight (``passes/masked_linear.py``).
* ``torch.ops.sparse_compile.masked_linear(x, weight, tile_mask, bias, tile_size)``: what the
  pass puts in place of ``linear(x, tile_masked_weight(weight, tile_mask, tile_size), bias)``.
  Opaque to Inductor (its kept-tile lists depend on the mask's values). Under autocast the
  activations come in the autocast dtype and ``weight``/``bias`` may stay the fp32 master
  weights: the kept tiles (and the bias) are rounded to ``x``'s dtype where eager autocast
  rounds the whole weight, products accumulate in fp32, and the result is in ``x``'s dtype.
  Autograd:

  - ``dx = dy @ (W ⊙ M)``: ``masked_linear_input_grad``, skips dropped tiles;
  - ``G = dy^T x`` dense (a plain ``mm`` in the backward graph, compiled by Inductor):
    Supermask's straight-through estimator needs it on every tile;
  - ``dW = G ⊙ expand(M)``, ``dM = tile sums of G ⊙ W``, ``db = sum(dy)``: the gradients
    eager autograd gives through ``W * expand(M)`` (``dM`` is in ``tile_mask``'s dtype, as
    eager's ``.to()`` backward gives it).

Devices: on CUDA the Triton kernel of ``masked_linear_kernels.py`` (autotuned per arch, the BSR
kernel's configs); on CPU the compiled tile kernel of ``cpu_tile_mm.cpp`` (see ``_masked_mm_cpu``
for the measurements), dense when too many tiles are kept to pay or when no C++ compiler could
build the kernel (with a warning).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.utils import counters

from . import cpu_tile_mm

# The autotune bucket and the fp32 precision rule are the BSR launcher's: one rule for both kernels.
from .bsr_linear import _input_precision, _next_pow2

try:
    import triton

    from .autotune_configs import INTERPRET_CONFIG, all_configs, prune_masked_configs
    from .masked_linear_kernels import masked_linear_kernel
except ImportError:  # torch without triton: the CPU path, and CUDA's dense fallback, need none of it
    triton = None

__all__ = [
    "SUPPORTED_DTYPES",
    "masked_linear",
    "masked_linear_input_grad",
    "masked_mm_triton",
    "tile_masked_weight",
    "tile_sums",
    "triton_tile_size_ok",
]

from .common import SUPPORTED_DTYPES, block_view  # noqa: E402  (the one list and block view, kernels/common.py)
_HALF_DTYPES = (torch.float16, torch.bfloat16)

_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)

if triton is None:
    _masked_linear_autotuned = None
elif _INTERPRET:
    _masked_linear_autotuned = triton.autotune(configs=[INTERPRET_CONFIG], key=[])(masked_linear_kernel)
else:
    # The mask changes every step, so the kept-tile count is not part of the key: configs are
    # picked for the shape (the BSR kernel's sets: same tiles, same shared memory per stage).
    _masked_linear_autotuned = triton.autotune(
        configs=all_configs(),
        key=["m_bucket", "N", "K", "BLOCKSIZE", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": prune_masked_configs},
    )(masked_linear_kernel)


# --------------------------------------------------------------------------------------------
# Tile helpers


def expand_tiles(tile_mask: Tensor, shape, tile_size: int) -> Tensor:
    """Each entry of ``tile_mask`` repeated ``tile_size`` times along each dim, cut to ``shape``.

    Supermask and the masked op share this function: ``tile_masked_weight`` must run exactly
    what Supermask ran before it existed.
    """
    if tile_size == 1:
        return tile_mask
    out = tile_mask
    for dim, size in enumerate(shape):
        out = out.repeat_interleave(tile_size, dim=dim).narrow(dim, 0, size)
    return out


def tile_sums(values: Tensor, tile_size: int) -> Tensor:
    """``[N, K]`` -> ``[ceil(N/t), ceil(K/t)]``: the sum over each tile (edge tiles are cut: the
    block view pads them with zeros)."""
    return block_view(values, tile_size).sum(dim=(1, 3))


def _masked_weight(w_nk: Tensor, tile_mask_nk: Tensor, tile_size: int) -> Tensor:
    """``w_nk ⊙ expand(tile_mask_nk)`` for the op's dense paths, in one pass: a broadcast over the
    ``[N/t, t, K/t, t]`` block view (a view when the tiles divide the weight, transposed views
    too), rather than ``expand_tiles``' two ``repeat_interleave`` copies and a multiply."""
    n, k = w_nk.shape
    tiles = block_view(w_nk, tile_size) * tile_mask_nk.to(w_nk.dtype)[:, None, :, None]
    return tiles.flatten(2).flatten(0, 1)[:n, :k]


def triton_tile_size_ok(tile_size: int) -> bool:
    """The Triton kernel's tile is its N tile and its K step: ``tl.dot`` wants a power of two >= 16."""
    return tile_size >= 16 and tile_size & (tile_size - 1) == 0


# --------------------------------------------------------------------------------------------
# tile_masked_weight: what Supermask's forward calls


_lib = torch.library.Library("sparse_compile", "FRAGMENT")
_lib.define("tile_masked_weight(Tensor weight, Tensor tile_mask, int tile_size) -> Tensor")


def _tile_masked_weight(weight: Tensor, tile_mask: Tensor, tile_size: int) -> Tensor:
    return weight * expand_tiles(tile_mask, weight.shape, tile_size).to(weight.dtype)


_lib.impl("tile_masked_weight", _tile_masked_weight, "CompositeImplicitAutograd")


def tile_masked_weight(weight: Tensor, tile_mask: Tensor, tile_size: int) -> Tensor:
    """``weight * expand(tile_mask)``; ``tile_mask`` has ``ceil(d / tile_size)`` entries per dim of ``weight``."""
    expected = tuple(max(1, -(-d // tile_size)) for d in weight.shape)
    if tuple(tile_mask.shape) != expected:
        raise ValueError(
            f"tile_masked_weight: a weight of shape {tuple(weight.shape)} with tile {tile_size} needs a "
            f"tile mask of shape {expected}, got {tuple(tile_mask.shape)}"
        )
    return torch.ops.sparse_compile.tile_masked_weight(weight, tile_mask, tile_size)


# --------------------------------------------------------------------------------------------
# Checks


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def _weight_dtype_ok(weight_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """The weight (or bias) has the activations' dtype, or is an fp32 master weight of half activations."""
    return weight_dtype == x_dtype or (weight_dtype == torch.float32 and x_dtype in _HALF_DTYPES)


def _check_inputs(x: Tensor, weight: Tensor, tile_mask: Tensor, bias: Optional[Tensor], tile_size: int) -> None:
    """Shape/dtype checks that need no data (they also run in the fake implementations)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"masked_linear: x must be one of {_dtype_names()}, got {x.dtype}")
    if not _weight_dtype_ok(weight.dtype, x.dtype) or (bias is not None and not _weight_dtype_ok(bias.dtype, x.dtype)):
        got = f"x {x.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(
            "masked_linear: weight and bias must have x's dtype, or float32 when x is float16/bfloat16 "
            f"(autocast's fp32 master weights); got {got}"
        )
    if not tile_mask.dtype.is_floating_point:
        raise TypeError(f"masked_linear: tile_mask must be a float tensor (0/1 per tile), got {tile_mask.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"masked_linear: expected x [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if tile_size < 1:
        raise ValueError(f"masked_linear: tile_size must be >= 1, got {tile_size}")
    n, k = weight.shape
    expected = (max(1, -(-n // tile_size)), max(1, -(-k // tile_size)))
    if tuple(tile_mask.shape) != expected:
        raise ValueError(
            f"masked_linear: weight {tuple(weight.shape)} with tile {tile_size} needs a tile mask of shape "
            f"{expected}, got {tuple(tile_mask.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"masked_linear: bias must be [{n}], got {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight, tile_mask) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"masked_linear: all tensors must be on one device, got {sorted(map(str, devices))}")


# --------------------------------------------------------------------------------------------
# CUDA (and the interpreter): the Triton kernel


def _kept_tiles(tile_mask_nk: Tensor) -> tuple[Tensor, Tensor]:
    """Per block row: kept block columns first (increasing), and how many. No host sync."""
    dropped = (tile_mask_nk == 0).to(torch.uint8)
    kept = torch.argsort(dropped, dim=1, stable=True).to(torch.int32)
    count = (1 - dropped).sum(dim=1, dtype=torch.int32)
    return kept.contiguous(), count.contiguous()


def _launch(a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int) -> Tensor:
    """``a [M, K] @ (w_nk ⊙ expand(tile_mask_nk))^T (+ bias)`` -> ``[M, N]``; views welcome."""
    m, k = a.shape
    n = w_nk.shape[0]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    kept, count = _kept_tiles(tile_mask_nk)
    bias_arg = bias.contiguous() if bias is not None else out  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * kept.shape[0],)

    _masked_linear_autotuned[grid](
        a, w_nk, tile_mask_nk, kept, count, bias_arg, out,
        m, n, k,
        a.stride(0), a.stride(1),
        w_nk.stride(0), w_nk.stride(1),
        tile_mask_nk.stride(0), tile_mask_nk.stride(1),
        kept.stride(0),
        out.stride(0), out.stride(1),
        _next_pow2(m),
        HAS_BIAS=bias is not None,
        BLOCKSIZE=tile_size,
        INPUT_PRECISION=_input_precision(a.dtype),
        INTERPRET=_INTERPRET,
    )  # fmt: skip
    return out


def masked_mm_triton(
    a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int
) -> Tensor:
    """Launch the Triton kernel directly: ``a [M, K] @ (w_nk ⊙ expand(M))^T + bias`` -> ``[M, N]``.

    ``w_nk`` / ``tile_mask_nk`` may be transposed views (that is how the input gradient calls it).
    Works on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests use that).
    """
    _check_inputs(a, w_nk, tile_mask_nk, bias, tile_size)
    if a.dim() != 2:
        raise ValueError(f"masked_mm_triton: a must be [M, K], got {tuple(a.shape)}")
    if not triton_tile_size_ok(tile_size):
        raise ValueError(f"masked_mm_triton: tile_size must be a power of two >= 16, got {tile_size}")
    if triton is None:
        raise RuntimeError("masked_mm_triton needs triton, which cannot be imported in this process; install triton")
    if a.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("masked_mm_triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return _launch(a, w_nk, tile_mask_nk, bias, tile_size)


# --------------------------------------------------------------------------------------------
# CPU


# The CPU path is the compiled tile kernel of cpu_tile_mm.cpp (rows on torch's OpenMP threads,
# see cpu_tile_mm.py). Measured with `python -m benchmarks.cpu_op --op masked --m 2080 --k 384
# --n 1536 --sparsity 0.9,0.5,0.3,0.2` (fp32, 2 threads, quiet 2-core AMD EPYC, median of 15
# round-robin calls, packing the kept tiles included), ms for one forward matmul of a ViT MLP:
#   tile | density | W ⊙ M + addmm | tile kernel | same, W column-major (the input gradient's view)
#    32  |  0.11   |     16.1      |     3.2     |   3.5
#    32  |  0.53   |     15.5      |     9.1     |  10.1
#    32  |  0.69   |     14.6      |    10.7     |  11.4
#    32  |  0.83   |     14.4      |    12.4     |  13.8
#    64  |  0.76   |     14.1      |    11.7     |  11.8
# (384x1536, tile 32: 2.0 / 7.7 / 10.6 ms against 13.7 dense at densities 0.11 / 0.49 / 0.72.)
# Before this kernel, one addmm_ per kept tile took 5.6 ms at 0.11 and lost to dense beyond ~0.4.
# Above _CPU_MAX_DENSITY the op computes densely instead (same result, within rounding): the
# kernel's lead shrinks to a few percent near 0.85.
_CPU_MAX_DENSITY = 0.75


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The kernel is fp32 (as the GPU kernel accumulates): half inputs are converted and back.
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def cpu_kernel_name() -> str:
    """What runs a masked layer on CPU, as the compile report names it."""
    return "tile kernel (cpu)" if cpu_tile_mm.unavailable_reason() is None else "dense (cpu, no C++ compiler)"


_warned_no_kernel = False


def _masked_mm_cpu(a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int) -> Tensor:
    """``a [M, K] @ (w_nk ⊙ expand(M))^T + bias`` on CPU: the tile kernel, or dense when too dense.

    An fp32 ``w_nk``/``bias`` with half ``a`` (autocast's master weights) is rounded to ``a``'s
    dtype first, as eager autocast's linear rounds ``W ⊙ M`` and the bias; the products are
    accumulated in fp32 either way and the result is in ``a``'s dtype.
    """
    global _warned_no_kernel
    compute = _compute_dtype(a.dtype)
    kept = int(tile_mask_nk.count_nonzero())
    no_kernel = cpu_tile_mm.unavailable_reason()
    if no_kernel is not None and not _warned_no_kernel:
        _warned_no_kernel = True
        warnings.warn(f"sparse_compile: masked linear layers compute densely on CPU: {no_kernel}", stacklevel=2)
    bias_c = bias.detach().to(a.dtype).to(compute) if bias is not None else None
    if kept > _CPU_MAX_DENSITY * tile_mask_nk.numel() or no_kernel is not None:
        counters["sparse_compile"]["masked_mm_cpu_dense"] += 1
        if a.dtype == torch.bfloat16:
            # What eager autocast runs: a bf16 matmul (oneDNN accumulates in fp32).
            w_masked = _masked_weight(w_nk, tile_mask_nk, tile_size).to(a.dtype)
            return F.linear(a, w_masked, bias.detach().to(a.dtype) if bias is not None else None)
        w_masked = _masked_weight(w_nk, tile_mask_nk, tile_size).to(a.dtype).to(compute)
        a_c = a.to(compute)
        out = a_c @ w_masked.t() if bias_c is None else torch.addmm(bias_c, a_c, w_masked.t())
        return out.to(a.dtype)
    counters["sparse_compile"]["masked_mm_cpu_tiles"] += 1
    w_c = w_nk.detach()
    if a.dtype == torch.bfloat16:
        # bf16 in and out, no fp32 copies: the kernel rounds the kept tiles of an fp32 master
        # weight to bf16 as it packs them (where eager autocast rounds the whole weight) and
        # multiplies with the CPU's bf16 dot products where it has them.
        return cpu_tile_mm.tile_mm(a.detach(), w_c, tile_mask_nk, bias_c, tile_size, kept)
    # fp16 on CPU is rare: the weight rounded to fp16 first, computed in fp32.
    if a.dtype == torch.float16 and w_c.dtype == torch.float32:
        w_c = w_c.to(torch.float16)
    out = cpu_tile_mm.tile_mm(a.detach().to(compute), w_c.to(compute), tile_mask_nk, bias_c, tile_size, kept)
    return out.to(a.dtype)


def _masked_mm(a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int) -> Tensor:
    if a.device.type == "cuda":
        if triton_tile_size_ok(tile_size) and triton is not None:
            counters["sparse_compile"]["masked_mm_triton"] += 1
            return _launch(a, w_nk, tile_mask_nk, bias, tile_size)
        # Documented fallback (the pass does not choose such layers; a direct call, or a process
        # without triton, may).
        counters["sparse_compile"]["masked_mm_dense_fallback"] += 1
        w_masked = _masked_weight(w_nk, tile_mask_nk, tile_size).to(a.dtype)
        return F.linear(a, w_masked, bias.to(a.dtype) if bias is not None else None)
    return _masked_mm_cpu(a, w_nk, tile_mask_nk, bias, tile_size)


# --------------------------------------------------------------------------------------------
# The ops


@torch.library.custom_op("sparse_compile::masked_linear", mutates_args=())
def masked_linear(x: Tensor, weight: Tensor, tile_mask: Tensor, bias: Optional[Tensor], tile_size: int) -> Tensor:
    """``x @ (weight ⊙ expand(tile_mask))^T + bias``; ``x`` is ``[..., K]``, ``weight`` ``[N, K]``,
    ``tile_mask`` ``[ceil(N/tile_size), ceil(K/tile_size)]`` (float; zero tiles are skipped)."""
    _check_inputs(x, weight, tile_mask, bias, tile_size)
    x2d = x.reshape(-1, x.shape[-1])
    out = _masked_mm(x2d, weight, tile_mask, bias, tile_size)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@masked_linear.register_fake
def _masked_linear_fake(x, weight, tile_mask, bias, tile_size):
    _check_inputs(x, weight, tile_mask, bias, tile_size)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("sparse_compile::masked_linear_input_grad", mutates_args=())
def masked_linear_input_grad(grad_out: Tensor, weight: Tensor, tile_mask: Tensor, tile_size: int) -> Tensor:
    """``grad_out @ (weight ⊙ expand(tile_mask))``: ``[..., N]`` -> ``[..., K]``, dropped tiles skipped."""
    _check_inputs(grad_out, weight.t(), tile_mask.t(), None, tile_size)
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    out = _masked_mm(g2d, weight.t(), tile_mask.t(), None, tile_size)
    return out.reshape(*grad_out.shape[:-1], weight.shape[1])


@masked_linear_input_grad.register_fake
def _masked_linear_input_grad_fake(grad_out, weight, tile_mask, tile_size):
    _check_inputs(grad_out, weight.t(), tile_mask.t(), None, tile_size)
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, tile_mask, bias, tile_size = inputs
    ctx.save_for_backward(x, weight, tile_mask)
    ctx.tile_size = tile_size
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out: Tensor):
    x, weight, tile_mask = ctx.saved_tensors
    t = ctx.tile_size
    need_x, need_w, need_mask, need_bias, _ = ctx.needs_input_grad
    grad_x = grad_w = grad_mask = grad_bias = None
    if need_x:
        grad_x = torch.ops.sparse_compile.masked_linear_input_grad(grad_out, weight, tile_mask, t)
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    if need_w or need_mask:
        # Dense on purpose: the straight-through estimator sends G ⊙ W of dropped tiles to the scores.
        # G is computed in x's dtype and then taken to the weight's, as eager autocast's weight
        # gradient goes through the cast of the fp32 master weight.
        grad_effective = (g2d.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if need_w:
            grad_w = _masked_weight(grad_effective, tile_mask, t)  # G ⊙ expand(M), in weight's dtype
        if need_mask:
            grad_mask = tile_sums((grad_effective * weight).to(tile_mask.dtype), t)
    if need_bias:
        grad_bias = g2d.sum(dim=0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_mask, grad_bias, None


masked_linear.register_autograd(_backward, setup_context=_setup_context)

