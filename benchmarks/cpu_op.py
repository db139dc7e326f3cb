"""The ways of computing ``sparse_compile::bsr_linear`` or ``masked_linear`` on CPU, timed side by side.

    python -m benchmarks.cpu_op                    # the numbers behind bsr_linear's _TILES_MAX_DENSITY
    python -m benchmarks.cpu_op --op masked --m 2080 --k 384 --n 1536 --sparsity 0.9,0.5,0.3,0.2
                                                   # the numbers behind masked_linear's _CPU_MAX_DENSITY
    python -m benchmarks.cpu_op --op overhead      # per-call cost of an op call with (almost) no work

What the op's CPU kernel chooses between (``kernels/bsr_linear.py``: dense rebuild + addmm, the
compiled tile kernel, or, without a compiler, gather + bmm + index_add) and two references (torch.sparse BSR, a dense weight kept in memory),
for fp32 at a few block sizes and sparsities. ``--op masked``: what the masked op's CPU path
chooses between (``kernels/masked_linear.py``: W ⊙ M rebuilt + addmm, or the compiled tile
kernel of ``kernels/cpu_tile_mm.cpp``), the kernel on a transposed weight view as the input
gradient calls it too. Every candidate is checked against float64 first,
then timed round-robin (``common.time_round_robin``: one call of each in turn, ``--reps`` rounds)
so that load from other processes on a shared machine hits every candidate alike.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks import common
from sparse_compile.kernels.bsr_format import BsrWeight
from sparse_compile.kernels import cpu_tile_mm
from sparse_compile.kernels.bsr_linear import _bsr_linear_gather_bmm, _bsr_linear_torch, _dense_weight
from sparse_compile.kernels.masked_linear import _masked_weight


def candidates(x2d, values, crow_indices, col_indices, bias, out_features) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways of computing the op on CPU that were measured (see ``_bsr_linear_torch``)."""
    m, k = x2d.shape
    b = values.shape[1]
    nb = crow_indices.shape[0] - 1
    kb = -(-k // b)

    def gather_bmm():
        return _bsr_linear_gather_bmm(x2d, values, crow_indices, col_indices, bias, out_features)

    def torch_sparse():
        w = torch.sparse_bsr_tensor(crow_indices, col_indices, values, size=(nb * b, kb * b))
        x_pad = F.pad(x2d, (0, kb * b - k))
        out = (w @ x_pad.t()).t()[:, :out_features]
        return out + bias if bias is not None else out

    dense_w = _dense_weight(values, crow_indices, col_indices, out_features, k).contiguous()

    return {
        "dense+addmm": lambda: _bsr_linear_torch(x2d, values, crow_indices, col_indices, bias, out_features),
        "gather+bmm+index_add": gather_bmm,
        "tile kernel": lambda: cpu_tile_mm.bsr_mm(x2d, values, crow_indices, col_indices, bias, out_features),
        "torch.sparse BSR": torch_sparse,
        "F.linear, dense W kept": lambda: F.linear(x2d, dense_w, bias),
    }


def masked_candidates(x2d, w, tile_mask, bias, tile_size) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways the masked op can run on CPU (see ``_masked_mm_cpu``), all computing ``x @ (W ⊙ M)^T + b``."""
    kept = int(tile_mask.count_nonzero())
    w_t_storage = w.t().contiguous().t()  # same values, column-major: the strides the input gradient reads

    return {
        "W ⊙ M + addmm": lambda: torch.addmm(bias, x2d, _masked_weight(w, tile_mask, tile_size).t()),
        "tile kernel": lambda: cpu_tile_mm.tile_mm(x2d, w, tile_mask, bias, tile_size, kept),
        "tile kernel, W column-major": lambda: cpu_tile_mm.tile_mm(x2d, w_t_storage, tile_mask, bias, tile_size, kept),
    }


def overhead_candidates(x2d, w, bias, tile_size) -> dict[str, Callable[[], torch.Tensor]]:
    """One op call each, with the same (tiny) work: what a call costs beyond its arithmetic.

    ``tile_linear`` is what a converted layer's compiled graph calls (C++, tiles packed once, through
    torch.ops); ``bsr_linear`` is the Python-implemented op (eager calls: checks, the per-tensor
    packing cache, then ``tile_linear``); ``aten.addmm`` is what a dense layer's call costs."""
    bw = BsrWeight.from_dense(w, tile_size)
    packed, packed_format = cpu_tile_mm.pack_bsr_values(bw.values, x2d.dtype)
    n, k = w.shape
    tile_linear, bsr_linear = torch.ops.sparse_compile.tile_linear.default, torch.ops.sparse_compile.bsr_linear.default
    addmm, w_t = torch.ops.aten.addmm.default, w.t()
    return {
        "aten.addmm": lambda: addmm(bias, x2d, w_t),
        "tile_linear (C++ op)": lambda: tile_linear(x2d, packed, bw.crow_indices, bw.col_indices, bias, n, k, tile_size, packed_format),
        "bsr_linear (Python op), tiles": lambda: bsr_linear(x2d, bw.values, bw.crow_indices, bw.col_indices, bias, n, k, "tiles"),
    }


def _per_call_ms(fn: Callable[[], object], device: torch.device, calls: int = 200) -> float:
    """The mean of ``calls`` back-to-back calls, ms: one call is a few microseconds, below a
    timer's own resolution and overhead."""
    import time

    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def run_overhead(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    t = args.blocksize[0]
    x, w, bias = torch.randn(1, t), torch.randn(t, t), torch.randn(t)
    fns = overhead_candidates(x, w, bias, t)
    ref = x.double() @ w.double().t() + bias.double()
    for name, fn in fns.items():
        torch.testing.assert_close(fn().double(), ref, atol=1e-4, rtol=1e-4, msg=lambda s, name=name: f"{name}: {s}")
    timings, errors = common.time_round_robin(fns, torch.device("cpu"), args.warmup, args.reps, call_ms=_per_call_ms)
    if errors:
        raise next(iter(errors.values()))
    base = timings["aten.addmm"].median_ms
    rows = [[name, f"{timings[name].median_ms * 1e3:.1f}", f"{timings[name].median_ms / base:.2f}x"] for name in fns]
    print(f"1 row, {t}x{t} weight (one tile), fp32, threads={torch.get_num_threads()}; median over {args.reps} "
          f"round-robin rounds of the mean of 200 back-to-back calls, after {args.warmup} warm-up calls")
    print(common.Table("CPU per-call overhead", ["call", "us per call", "vs aten.addmm"], rows).text())
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_op", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--op", choices=["bsr", "masked", "overhead"], default="bsr", help="which op's candidates")
    parser.add_argument("--m", type=common.positive_int, default=2 * 197, help="rows of x")
    parser.add_argument("--k", type=common.positive_int, default=768, help="in features")
    parser.add_argument("--n", type=common.positive_int, default=3072, help="out features")
    parser.add_argument("--blocksize", type=common.comma_list(int), default=[32, 64])
    parser.add_argument("--sparsity", type=common.comma_list(float), default=[0.9, 0.5])
    parser.add_argument("--warmup", type=common.non_negative_int, default=3)
    parser.add_argument("--reps", type=common.positive_int, default=15)
    parser.add_argument("--threads", type=common.positive_int, help="torch.set_num_threads (1: stable numbers)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.op == "overhead":
        return run_overhead(args)
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    torch.manual_seed(0)
    m, k, n = args.m, args.k, args.n
    print(f"M={m} K={k} N={n} fp32 threads={torch.get_num_threads()}; median ms of {args.reps} round-robin "
          f"calls after {args.warmup} warm-up calls each (each timed call after Timer's 2 untimed ones)")
    rows, names = [], []
    for b in args.blocksize:
        for sparsity in args.sparsity:
            keep = torch.rand(-(-n // b), -(-k // b)) >= sparsity
            unmasked = torch.randn(n, k)
            w = unmasked * keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
            x, bias = torch.randn(m, k), torch.randn(n)
            ref = x.double() @ w.double().t() + bias.double()
            density = keep.float().mean().item()
            if args.op == "masked":
                fns = masked_candidates(x, unmasked, keep.float(), bias, b)
            else:
                bw = BsrWeight.from_dense(w, b)
                fns = candidates(x, bw.values, bw.crow_indices, bw.col_indices, bias, n)
            for name, fn in fns.items():
                torch.testing.assert_close(fn().double(), ref, atol=1e-3, rtol=1e-3, msg=lambda s, name=name: f"{name}: {s}")
            timings, errors = common.time_round_robin(fns, torch.device("cpu"), args.warmup, args.reps)
            if errors:  # every candidate was checked above: an error here is a bug, not a row
                raise next(iter(errors.values()))
            names = list(fns)
            rows.append([f"b={b}, {sparsity:.0%} sparse", f"{density:.2f}"]
                        + [f"{timings[name].median_ms:.1f}" for name in names])
    print(common.Table(f"CPU {args.op} op candidates", ["ms", "density", *names], rows).text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
