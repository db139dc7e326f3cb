"""Pure Triton code for ``out = x @ (w ⊙ expand(tile_mask))^T (+ bias)``: a dense weight whose
zero tiles are skipped.

The launcher, the ``torch.library`` ops and their autograd live in ``masked_linear.py``. One
kernel serves both matmuls of a masked linear layer that skip tiles:

* forward ``y = x @ (W ⊙ M)^T``: ``x_ptr`` = x ``[M, K]``, ``w_ptr`` = W ``[N, K]``, mask M;
* input gradient ``dx = dy @ (W ⊙ M)``: ``x_ptr`` = dy, ``w_ptr`` = W read through its
  transpose (strides swapped), mask M transposed. Nothing is copied.

Unlike BSR the weight is the dense training weight, which changes every step: nothing is packed.
The launcher only turns the small tile mask into a per-block-row list of kept block columns
(``kept`` / ``count``, a few hundred int32) so that the inner loop visits kept tiles only and can
be software-pipelined on the GPU.

Interpreter notes: as in ``bsr_linear_kernels.py`` (triton 3.6 ``TRITON_INTERPRET=1``): a loop
bounded by a loaded scalar must be a ``while`` loop there, and bf16 operands are cast to fp32
before ``tl.dot``; fp32 -> bf16 conversions are rounded on the bits (``_rounded``).
"""

import triton
import triton.language as tl


@triton.jit
def _rounded(values, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``values`` rounded to ``DTYPE`` and back to fp32.

    Under the triton 3.6 interpreter an fp32 -> bf16 conversion (a cast, or a store to a bf16
    pointer) does not round to nearest even (seen: off by up to an ulp); there the rounding is
    done on the bits, after which the conversion is exact. Compiled, it is the hardware's cast.
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return values.to(DTYPE).to(tl.float32)


@triton.jit
def _accumulate_tile(
    acc,
    p,
    x_rows_ptr,
    mask_m,
    w_ptr,
    offs_n,
    mask_n,
    tile_mask_row_ptr,
    kept_row_ptr,
    K,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_tk,
    BLOCKSIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    X_DTYPE: tl.constexpr,
):
    """``acc += x[m_tile, k_block] @ (m * w[n_block, k_block])^T`` for the ``p``-th kept tile of the row."""
    col = tl.load(kept_row_ptr + p).to(tl.int64)
    offs_k = col * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask_k = offs_k < K
    x_tile = tl.load(x_rows_ptr + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    # Loaded as [k, n] (W^T) directly; ragged edges of a weight not divisible by the tile read 0.
    w_tile = tl.load(
        w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
        mask=mask_k[:, None] & mask_n[None, :],
        other=0.0,
    )
    # The mask value multiplies the tile, so the op is exactly W ⊙ expand(M) for any M
    # (Supermask's masks are 0/1: a multiply by 1 is exact in every dtype).
    if INTERPRET:
        # Before the scaling too: the interpreter's bf16 multiply also works on raw bits.
        x_tile = x_tile.to(tl.float32)
        w_tile = w_tile.to(tl.float32)
    scale = tl.load(tile_mask_row_ptr + col * stride_tk)
    w_tile = w_tile * scale.to(w_tile.dtype)
    # An fp32 master weight with half x (autocast): the scaled tile is rounded to x's dtype, as
    # eager autocast rounds W ⊙ M before its half matmul (a no-op when the dtypes match).
    if INTERPRET:
        w_tile = _rounded(w_tile, X_DTYPE, INTERPRET)
    else:
        w_tile = w_tile.to(X_DTYPE)
    return tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)


@triton.jit
def masked_linear_kernel(
    x_ptr,
    w_ptr,
    tile_mask_ptr,
    kept_ptr,
    count_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_tn,
    stride_tk,
    stride_kept,
    stride_om,
    stride_on,
    m_bucket,
    HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program computes ``out[m_tile, n_block]``, a BLOCK_M x BLOCKSIZE tile.

    Args:
        x_ptr: left operand, ``[M, K]``; strides ``stride_xm``, ``stride_xk``.
        w_ptr: dense weight as ``[N, K]`` (indexed ``[n, k]``); strides ``stride_wn``,
            ``stride_wk`` (a transposed view for the input gradient). x's dtype, or fp32 with
            half x (autocast's master weight: each kept tile is rounded to x's dtype).
        tile_mask_ptr: tile mask ``[ceil(N / BLOCKSIZE), ceil(K / BLOCKSIZE)]``, any float
            dtype; strides ``stride_tn``, ``stride_tk``. Tile ``(i, j)`` of ``w`` is multiplied
            by ``tile_mask[i, j]``; zero tiles are never read.
        kept_ptr: int32 ``[ceil(N / BLOCKSIZE), ceil(K / BLOCKSIZE)]``, row stride
            ``stride_kept``, unit column stride: for block row ``i``, the block columns of its
            nonzero tiles first (``count[i]`` of them), then anything.
        count_ptr: int32 ``[ceil(N / BLOCKSIZE)]``, contiguous: nonzero tiles per block row.
        bias_ptr: ``[N]``, contiguous, x's dtype or fp32 (rounded to out's); not read unless HAS_BIAS.
        out_ptr: output, ``[M, N]``; strides ``stride_om``, ``stride_on``.
        M, N, K: sizes (need not be multiples of BLOCKSIZE: edges are masked).
        m_bucket: not read; autotune key only (next power of two of M).
        HAS_BIAS: add ``bias`` in the epilogue.
        BLOCKSIZE: the tile side (power of two >= 16); also the N width of a program's tile.
        INPUT_PRECISION: ``tl.dot`` precision, "ieee" or "tf32" (fp32 inputs only).
        INTERPRET: running under TRITON_INTERPRET=1 (see module docstring).
        BLOCK_M: rows of x per program.
        GROUP_M: M tiles per group in the grouped ordering.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCKSIZE)
    # Grouped ordering (Triton tutorial 03): GROUP_M tiles of x against one block row, for L2 reuse.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # int64 rows: M * stride_xm can pass 2**31 for large batches of tokens.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n.to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask_n = offs_n < N
    x_rows_ptr = x_ptr + offs_m[:, None] * stride_xm
    tile_mask_row_ptr = tile_mask_ptr + pid_n * stride_tn
    kept_row_ptr = kept_ptr + pid_n * stride_kept

    acc = tl.zeros((BLOCK_M, BLOCKSIZE), dtype=tl.float32)
    count = tl.load(count_ptr + pid_n)
    if INTERPRET:
        p = 0
        while p < count:
            acc = _accumulate_tile(
                acc, p, x_rows_ptr, mask_m, w_ptr, offs_n, mask_n, tile_mask_row_ptr, kept_row_ptr, K,
                stride_xk, stride_wn, stride_wk, stride_tk, BLOCKSIZE, INPUT_PRECISION, INTERPRET,
                x_ptr.dtype.element_ty,
            )  # fmt: skip
            p += 1
    else:
        for p in range(0, count):
            acc = _accumulate_tile(
                acc, p, x_rows_ptr, mask_m, w_ptr, offs_n, mask_n, tile_mask_row_ptr, kept_row_ptr, K,
                stride_xk, stride_wn, stride_wk, stride_tk, BLOCKSIZE, INPUT_PRECISION, INTERPRET,
                x_ptr.dtype.element_ty,
            )  # fmt: skip

    # A block row without kept tiles skips the loop and writes bias (or zeros).
    if HAS_BIAS:
        # Rounded to the output's dtype first: an fp32 bias of half x is autocast's master bias.
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += _rounded(bias, out_ptr.dtype.element_ty, INTERPRET)[None, :]
    if INTERPRET:
        acc = _rounded(acc, out_ptr.dtype.element_ty, INTERPRET)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
