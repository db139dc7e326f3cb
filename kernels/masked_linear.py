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
  Opaque to Inductor (its kept-tile lists depend on the mask's values). Autograd:

  - ``dx = dy @ (W ⊙ M)``: ``masked_linear_input_grad``, skips dropped tiles;
  - ``G = dy^T x`` dense (a plain ``mm`` in the backward graph, compiled by Inductor):
    Supermask's straight-through estimator needs it on every tile;
  - ``dW = G ⊙ expand(M)``, ``dM = tile sums of G ⊙ W``, ``db = sum(dy)``: the gradients
    eager autograd gives through ``W * expand(M)`` (``dM`` is in ``tile_mask``'s dtype, as
    eager's ``.to()`` backward gives it).

Devices: on CUDA the Triton kernel of ``masked_linear_kernels.py`` (autotuned per arch, the BSR
kernel's configs); on CPU one ``addmm_`` per kept tile into the output (see ``_masked_mm_cpu``
for the measurements), dense when too many tiles are kept to pay; with several threads, whichever
of two ways to thread that loop is measured faster as it runs (``_TileLoopChooser``).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.utils import counters

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

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
    """``[N, K]`` -> ``[ceil(N/t), ceil(K/t)]``: the sum over each tile (edge tiles are cut)."""
    n, k = values.shape
    nb, kb = -(-n // tile_size), -(-k // tile_size)
    if n % tile_size or k % tile_size:
        values = F.pad(values, (0, kb * tile_size - k, 0, nb * tile_size - n))
    return values.reshape(nb, tile_size, kb, tile_size).sum(dim=(1, 3))


def _masked_weight(w_nk: Tensor, tile_mask_nk: Tensor, tile_size: int) -> Tensor:
    """``w_nk ⊙ expand(tile_mask_nk)`` for the op's dense paths, in one pass when the tiles divide
    the weight (a broadcast over a ``[N/t, t, K/t, t]`` view, transposed views too) rather than
    ``expand_tiles``' two ``repeat_interleave`` copies and a multiply."""
    n, k = w_nk.shape
    mask = tile_mask_nk.to(w_nk.dtype)
    if n % tile_size or k % tile_size:
        return w_nk * expand_tiles(mask, w_nk.shape, tile_size)
    tiles = w_nk.unflatten(0, (n // tile_size, tile_size)).unflatten(2, (k // tile_size, tile_size))
    return (tiles * mask[:, None, :, None]).flatten(2).flatten(0, 1)


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


def _check_inputs(x: Tensor, weight: Tensor, tile_mask: Tensor, bias: Optional[Tensor], tile_size: int) -> None:
    """Shape/dtype checks that need no data (they also run in the fake implementations)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"masked_linear: x must be one of {_dtype_names()}, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        got = f"x {x.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"masked_linear: x, weight and bias must share one dtype; got {got}")
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


# Per kept tile, one addmm_ of x[:, k-tile] (a strided view, no gather) into out[:, n-tile].
# Measured (fp32, M = 2080 tokens, 1 thread, median of 11 round-robin runs, shared 2-core box;
# script in the f-masked report), ms for one forward matmul at 90% tile sparsity:
#   N x K      tile | dense (mask, mm) | per-tile addmm_ | gather+bmm+index_add | padded-row bmm
#   1536x384    32  |      40.4        |      11.2       |        20.1          |     35.2
#   384x1536    32  |      54.8        |      14.3       |        18.1          |     26.5
#   1536x384    64  |      43.8        |       8.1       |        11.9          |     28.9
# A kept tile costs ~0.18 ms (tile 32) against ~0.07 ms per tile for the dense matmul, so the
# tile loop pays up to ~40% kept tiles (tile 64: ~50%). Above _CPU_MAX_DENSITY the op computes
# densely instead (same result), so a layer never runs much slower than dense.
_CPU_MAX_DENSITY = 0.3


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # CPU half matmuls do not all promise fp32 accumulation; the GPU kernel does, so do we.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _masked_mm_cpu(a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int) -> Tensor:
    """``a [M, K] @ (w_nk ⊙ expand(M))^T + bias`` on CPU: per kept tile, or dense when too dense."""
    m = a.shape[0]
    n, k = w_nk.shape
    compute = _compute_dtype(a.dtype)
    a_c = a.to(compute)
    # Counted before any Python list is built: the dense path needs none (~0.3 ms per call saved).
    if int(tile_mask_nk.count_nonzero()) > _CPU_MAX_DENSITY * tile_mask_nk.numel():
        counters["sparse_compile"]["masked_mm_cpu_dense"] += 1
        w_masked = _masked_weight(w_nk.to(compute), tile_mask_nk, tile_size)
        out = a_c @ w_masked.t() if bias is None else torch.addmm(bias.to(compute), a_c, w_masked.t())
        return out.to(a.dtype)
    counters["sparse_compile"]["masked_mm_cpu_tiles"] += 1
    kept_by_row = [[(j, v) for j, v in enumerate(row) if v != 0] for row in tile_mask_nk.tolist()]
    # Detached: the tile loop may run on worker threads, where autograd must not see these.
    a_c, w_nk = a_c.detach(), w_nk.detach()
    out = a_c.new_empty((m, n))
    t = tile_size
    bias_c = bias.to(compute).detach() if bias is not None else None

    # Views made once per call (split is one call for all pieces): the loop below is Python,
    # run once per kept tile, and each indexing op costs microseconds (~25 us per tile with
    # per-tile slicing: ~1.5 ms of a 60-tile call).
    a_cols = a_c.split(t, dim=1)
    out_cols = out.split(t, dim=1)
    w_rows = w_nk.split(t, dim=0)
    bias_parts = bias_c.split(t) if bias_c is not None else None
    convert = w_nk.dtype != compute

    def one_block_row(i: int) -> None:
        # Block row i owns output columns [i*t, (i+1)*t): no two block rows write the same memory.
        out_i = out_cols[i]
        if bias_parts is None:
            out_i.zero_()
        else:
            out_i.copy_(bias_parts[i].expand_as(out_i))
        if not kept_by_row[i]:
            return
        w_tiles_t = w_rows[i].t().split(t, dim=0)  # [t_k, t_n] views of W^T, one per block column
        for j, value in kept_by_row[i]:
            w_tile_t = w_tiles_t[j].to(compute) if convert else w_tiles_t[j]
            if value == 1.0:  # Supermask's masks are 0/1: no scaling to pass
                out_i.addmm_(a_cols[j], w_tile_t)
            else:
                out_i.addmm_(a_cols[j], w_tile_t, alpha=value)

    kept_per_row = [len(row) for row in kept_by_row]
    threads = torch.get_num_threads()
    if threads <= 1:
        for i in range(len(kept_per_row)):
            one_block_row(i)
        return out.to(a.dtype)
    key = (m, n, k, t, sum(kept_per_row), threads)
    loop = _tile_loops.pick(key)
    counters["sparse_compile"][f"masked_mm_cpu_tiles_{loop}"] += 1
    start = _clock()
    if loop == "workers":
        _run_block_rows(one_block_row, kept_per_row, threads)
    else:
        for i in range(len(kept_per_row)):
            one_block_row(i)
    _tile_loops.record(key, loop, _clock() - start)
    return out.to(a.dtype)


class _TileLoopChooser:
    """Per problem (shape, tile, kept tiles, threads): the faster of the two tile loops, by measurement.

    ``"openmp"``: block rows one after another, each matmul split over torch's threads (OpenMP).
    ``"workers"``: block rows spread over single-threaded worker threads (:func:`_run_block_rows`).
    On a quiet machine the first is faster (2-core machine, 2 threads, ViT MLP 1536x384 at 90%,
    2080 rows: 4.5 vs 5.8 ms; its 384x384 out-projection: 0.87 vs 1.45 ms); on an oversubscribed
    one it collapses (a load of ~2.5: 50.7 ms vs 8.5 ms, dense 42.7 ms), because every small
    OpenMP matmul ends in a barrier that waits for a descheduled thread. Load changes while
    training runs, so the choice is not fixed at compile time: each call is timed (a clock read
    around it), a moving average kept per loop, the faster one runs, and every
    ``PROBE_EVERY``-th call of a problem runs the other one to notice when that changed (a
    probe's time replaces that loop's old average, which is stale by then).
    Both loops add the same tiles in the same order; only the matmuls' threading differs.
    """

    PROBE_EVERY = 32
    SMOOTHING = 0.5  # weight of the newest time in a loop's moving average
    # "workers" runs only when its average beats "openmp"'s by this factor: on a quiet machine
    # the two are within ~10% on some shapes, where noise would flip a plain comparison back and
    # forth at a cost (a quiet training step: 782 ms always openmp, 821 ms choosing without it);
    # under load the gap is 5x and more.
    WORKERS_MARGIN = 0.85

    def __init__(self) -> None:
        self._ms: dict[tuple, dict[str, float]] = {}
        self._calls: dict[tuple, int] = {}
        self._probing: set[tuple] = set()

    def pick(self, key: tuple) -> str:
        times = self._ms.setdefault(key, {})
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        for loop in _TILE_LOOPS:  # each loop runs once before any choice
            if loop not in times:
                return loop
        workers_faster = times["workers"] < self.WORKERS_MARGIN * times["openmp"]
        fast, slow = ("workers", "openmp") if workers_faster else ("openmp", "workers")
        if calls % self.PROBE_EVERY == 0:
            self._probing.add(key)
            return slow
        return fast

    def record(self, key: tuple, loop: str, seconds: float) -> None:
        times = self._ms.setdefault(key, {})
        ms = 1e3 * seconds
        if loop not in times or key in self._probing:
            times[loop] = ms
        else:
            times[loop] = self.SMOOTHING * ms + (1 - self.SMOOTHING) * times[loop]
        self._probing.discard(key)

    def clear(self) -> None:
        self._ms.clear()
        self._calls.clear()
        self._probing.clear()


_TILE_LOOPS = ("openmp", "workers")  # the order they first run in
_tile_loops = _TileLoopChooser()
#: The clock around each tile loop (tests replace it: no test depends on a real timing).
_clock = time.perf_counter


# The "workers" tile loop: block rows on torch.get_num_threads() Python threads, each running
# single-threaded matmuls (the matmuls release the GIL, so the workers compute in parallel).
# Robust where the "openmp" loop collapses, on an oversubscribed machine; see _TileLoopChooser.
_pool: "concurrent.futures.ThreadPoolExecutor | None" = None
_pool_threads = 0


def _run_block_rows(run_row, kept_per_row: list[int], threads: int) -> None:
    """Calls ``run_row(i)`` for every block row, spread over ``threads`` worker threads by kept tiles."""
    rows = sorted(range(len(kept_per_row)), key=lambda i: -kept_per_row[i])
    groups: list[list[int]] = [[] for _ in range(threads)]
    work = [0] * threads
    for i in rows:  # largest first, each to the least loaded thread
        least = work.index(min(work))
        groups[least].append(i)
        work[least] += kept_per_row[i] + 1  # + 1: an empty row still writes its zeros
    pool = _worker_pool(threads)
    # Grad mode and inference mode are per thread: the workers run as the caller does.
    inference = torch.is_inference_mode_enabled()
    for future in [pool.submit(_run_rows, run_row, group, inference) for group in groups if group]:
        future.result()


def _run_rows(run_row, group: list[int], inference: bool) -> None:
    with torch.inference_mode(inference), torch.no_grad():
        for i in group:
            run_row(i)


def _worker_pool(threads: int) -> "concurrent.futures.ThreadPoolExecutor":
    """``threads`` worker threads whose torch ops run single-threaded; made once per thread count."""
    global _pool, _pool_threads
    if _pool is not None and _pool_threads == threads:
        return _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
    ready = threading.Barrier(threads)

    def single_threaded() -> None:
        # Per thread: torch.set_num_threads sets this thread's OpenMP and MKL thread count. It
        # also stores the count new threads start with; the caller restores that below.
        torch.set_num_threads(1)

    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sparse_compile_tiles", initializer=single_threaded)
    for future in [pool.submit(ready.wait) for _ in range(threads)]:  # start every worker now
        future.result()
    torch.set_num_threads(threads)  # this thread's count, and again the default for new threads
    _pool, _pool_threads = pool, threads
    return pool


def _forget_pool_after_fork() -> None:
    # A forked child (a DataLoader worker) has the executor object but none of its threads.
    global _pool, _pool_threads
    _pool, _pool_threads = None, 0


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _masked_mm(a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int) -> Tensor:
    if a.device.type == "cuda":
        if triton_tile_size_ok(tile_size) and triton is not None:
            counters["sparse_compile"]["masked_mm_triton"] += 1
            return _launch(a, w_nk, tile_mask_nk, bias, tile_size)
        # Documented fallback (the pass does not choose such layers; a direct call, or a process
        # without triton, may).
        counters["sparse_compile"]["masked_mm_dense_fallback"] += 1
        w_masked = _masked_weight(w_nk, tile_mask_nk, tile_size)
        return F.linear(a, w_masked, bias)
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
        grad_effective = g2d.t() @ x.reshape(-1, x.shape[-1])
        if need_w:
            grad_w = _masked_weight(grad_effective, tile_mask, t)  # G ⊙ expand(M), in weight's dtype
        if need_mask:
            grad_mask = tile_sums((grad_effective * weight).to(tile_mask.dtype), t)
    if need_bias:
        grad_bias = g2d.sum(dim=0)
    return grad_x, grad_w, grad_mask, grad_bias, None


masked_linear.register_autograd(_backward, setup_context=_setup_context)

