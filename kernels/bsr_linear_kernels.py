"""Pure Triton code for ``y = x @ W^T + bias`` with ``W`` stored as BSR (see ``bsr_format``).

The launcher, autotune configs and the ``torch.library`` op live in ``bsr_linear.py``.

Interpreter notes (triton 3.6 ``TRITON_INTERPRET=1`` with NumPy 2.4, found while writing this):

* Every scalar in the interpreter is a 1-element NumPy array (``np.array([v])``), and
  ``range(start, end)`` calls ``__index__`` -> ``int(array)``, which NumPy 2.4 rejects
  ("only 0-dimensional arrays can be converted to Python scalars"). So a ``for`` loop whose
  bounds come from a scalar load (the row pointers) fails, and so does ``tl.range``.
  A ``while`` loop works (the interpreter's ``__bool__`` accepts size-1 arrays), so under the
  interpreter the row walk is a ``while`` loop. On the GPU it stays a ``for`` loop, because
  only ``scf.for`` loops get software-pipelined (``num_stages``). Both loops call the same
  ``_accumulate_block`` body.
* bfloat16 is stored as ``uint16`` in the interpreter and ``tl.dot`` becomes
  ``np.matmul(uint16, uint16)``: it multiplies the raw bit patterns. Casting to fp32 is
  emulated correctly, so under the interpreter both tiles are cast to fp32 before ``tl.dot``
  (exact for fp16/bf16 operands: their products fit fp32; the accumulator is fp32 anyway).
"""

import triton
import triton.language as tl


@triton.jit
def _accumulate_block(
    acc,
    p,
    x_rows_ptr,
    mask_m,
    values_ptr,
    col_ptr,
    K,
    stride_xk,
    stride_vb,
    stride_vn,
    stride_vk,
    BLOCKSIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``acc += x[m_tile, col*b : col*b + b] @ values[p]^T`` for stored block ``p``."""
    offs_b = tl.arange(0, BLOCKSIZE)
    col = tl.load(col_ptr + p).to(tl.int64)
    offs_k = col * BLOCKSIZE + offs_b
    # x is not padded: mask columns past K (the ragged last block column) and rows past M.
    x_tile = tl.load(
        x_rows_ptr + offs_k[None, :] * stride_xk,
        mask=mask_m[:, None] & (offs_k[None, :] < K),
        other=0.0,
    )
    # The stored block is [n, k] and already zero-padded; load it as [k, n] (W^T) directly.
    w_tile = tl.load(
        values_ptr
        + p.to(tl.int64) * stride_vb
        + offs_b[:, None] * stride_vk
        + offs_b[None, :] * stride_vn
    )
    if INTERPRET:
        x_tile = x_tile.to(tl.float32)
        w_tile = w_tile.to(tl.float32)
    return tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)


@triton.jit
def bsr_linear_kernel(
    x_ptr,
    values_ptr,
    crow_ptr,
    col_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_vb,
    stride_vn,
    stride_vk,
    stride_om,
    stride_on,
    m_bucket,
    nnz_bucket,
    HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program computes ``out[m_tile, n_block]`` for a BLOCK_M x BLOCKSIZE tile.

    Args:
        x_ptr: input, ``[M, K]``; strides ``stride_xm``, ``stride_xk``.
        values_ptr: stored blocks, ``[nnz_blocks, BLOCKSIZE, BLOCKSIZE]`` indexed
            ``[block, n, k]``; strides ``stride_vb``, ``stride_vn``, ``stride_vk``.
        crow_ptr: int32 row pointers, ``[ceil(N / BLOCKSIZE) + 1]``, contiguous.
        col_ptr: int32 block column of each stored block, ``[nnz_blocks]``, contiguous.
        bias_ptr: ``[N]``, contiguous; not read unless HAS_BIAS.
        out_ptr: output, ``[M, N]``; strides ``stride_om``, ``stride_on``.
        M, N, K: unpadded sizes (K = in features, N = out features).
        m_bucket, nnz_bucket: not read; autotune key only (next power of two of M / nnz).
        HAS_BIAS: add ``bias`` in the epilogue.
        BLOCKSIZE: BSR block size b (power of two >= 16).
        INPUT_PRECISION: ``tl.dot`` precision, "ieee" or "tf32" (fp32 inputs only).
        INTERPRET: running under TRITON_INTERPRET=1 (see module docstring).
        BLOCK_M: rows of x per program.
        GROUP_M: M tiles per group in the grouped ordering.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCKSIZE)
    # Grouped ordering (Triton tutorial 03): consecutive programs cover GROUP_M tiles of x
    # against one block row, then move to the next block row, so a group's x tiles and
    # weight blocks stay in L2 while they are reused.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_b = tl.arange(0, BLOCKSIZE)
    # int64 rows: M * stride_xm can pass 2**31 for large batches of tokens.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows_ptr = x_ptr + offs_m[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCKSIZE), dtype=tl.float32)
    start = tl.load(crow_ptr + pid_n)
    end = tl.load(crow_ptr + pid_n + 1)
    if INTERPRET:
        p = start
        while p < end:
            acc = _accumulate_block(
                acc, p, x_rows_ptr, mask_m, values_ptr, col_ptr, K,
                stride_xk, stride_vb, stride_vn, stride_vk,
                BLOCKSIZE, INPUT_PRECISION, INTERPRET,
            )  # fmt: skip
            p += 1
    else:
        for p in range(start, end):
            acc = _accumulate_block(
                acc, p, x_rows_ptr, mask_m, values_ptr, col_ptr, K,
                stride_xk, stride_vb, stride_vn, stride_vk,
                BLOCKSIZE, INPUT_PRECISION, INTERPRET,
            )  # fmt: skip

    # Empty block rows skip the loop and write bias (or zeros).
    offs_n = pid_n * BLOCKSIZE + offs_b
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
