"""Single linear layers of ViT-B: dense F.linear, torch.sparse BSR, sparse_compile's bsr_linear and 2:4.

    python -m benchmarks.kernels                   # GPU: M = 256 * 197 tokens, four shapes
    python -m benchmarks.kernels --help

Each shape is ``x [M, K] @ W^T [K, N] + bias`` with ``M = batch * tokens``; ``W`` is random and
block-pruned by magnitude. Every row gets the same ``x``, ``W`` and bias, and is checked
against dense ``F.linear`` on that ``W``. The dense row does not depend on sparsity or block
size, so it runs once per shape and dtype.

2:4 rows (once per shape and dtype): ``W`` with a 2:4 magnitude mask, run by
``sparse_compile::semi_structured_linear`` on torch's cuSPARSELt and CUTLASS kernels. They need
a GPU (sm80/sm90) and fp16/bf16; elsewhere the row says why instead of a number (the CPU
reference path is exact but makes no speed claim).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks import common, floors, plot
from sparse_compile.kernels import BsrWeight, bsr_linear
from sparse_compile.kernels import semi_structured
from sparse_compile.pruning import prune_blocks_
from sparse_compile.training.nm_mask import nm_mask

#: (K, N) = (in, out features) of ViT-B/16's linears: MLP up, MLP down, attention in, attention out.
VIT_B_SHAPES = [(768, 3072), (3072, 768), (768, 2304), (768, 768)]
VIT_TOKENS = 197  # 14 x 14 patches + the class token

DEFAULTS = {
    "cuda": dict(
        batch_size=256, shapes=VIT_B_SHAPES, dtype=[torch.float32, torch.bfloat16, torch.float16],
        sparsity=[0.8, 0.9], blocksize=[32, 64], warmup=10, reps=50,
    ),
    # About a minute on 2 shared cores.
    "cpu": dict(
        batch_size=2, shapes=VIT_B_SHAPES[:2], dtype=[torch.float32],
        sparsity=[0.8, 0.9], blocksize=[32, 64], warmup=3, reps=15,
    ),
}

HEADERS = [
    "K x N", "M", "sparsity", "block", "variant", "median ms", "reps",
    "eff TFLOP/s", "vs dense", "FLOP/B", "floor ms", "% of floor", "rel err", "check",
]


# --------------------------------------------------------------------------------------------
# Command line


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {text!r} is not KxN with positive integers, e.g. 768x3072")
    return int(parts[0]), int(parts[1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--shapes", action="append", type=common.comma_list(_shape),
        help="KxN (in x out features), comma list; default: ViT-B's "
        + ",".join(f"{k}x{n}" for k, n in VIT_B_SHAPES) + " (first two on CPU)",
    )
    parser.add_argument("--batch-size", type=common.positive_int, help="M = batch size * --tokens")
    parser.add_argument("--tokens", type=common.positive_int, default=VIT_TOKENS)
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.finish_args(parser, args, DEFAULTS)
    return args


# --------------------------------------------------------------------------------------------
# Cost: FLOPs, bytes and the floor they give


@dataclasses.dataclass(frozen=True)
class Problem:
    m: int
    k: int
    n: int
    dtype: torch.dtype

    @property
    def dense_flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def linear(self, bsr: BsrWeight | None) -> floors.Linear:
        """The work no kernel can avoid (see ``benchmarks.floors``): only stored blocks for BSR."""
        if bsr is None:
            return floors.Linear(self.m, self.k, self.n, self.dtype)
        indices = (bsr.nnz_blocks + bsr.crow_indices.numel()) * 4
        return floors.Linear(self.m, self.k, self.n, self.dtype, stored=bsr.nnz_blocks * bsr.blocksize**2,
                             index_bytes=indices)


def intensity(problem: Problem, bsr: BsrWeight | None) -> float:
    """Unavoidable FLOPs / unavoidable bytes."""
    linear = problem.linear(bsr)
    return linear.flops / linear.bytes


# --------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Row:
    variant: str
    sparsity: float | None = None
    blocksize: int | None = None
    timing: common.Timing | None = None
    rel_err: float | None = None
    tol: float | None = None
    intensity: float | None = None  # unavoidable FLOPs / unavoidable bytes
    floor: float | None = None
    ours: bool = False  # a row of sparse_compile: if it cannot run, the run fails
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.timing is not None and self.rel_err is not None and self.rel_err <= self.tol

    @property
    def median_ms(self) -> float | None:
        # A wrong answer gets no throughput or speedup.
        return self.timing.median_ms if self.ok else None


def run_row(row: Row, make: Callable[[], Callable[[], torch.Tensor]], ref: torch.Tensor,
            args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Row:
    """Builds the variant (weight conversion is not timed), checks its output, then times it."""
    try:
        fn = make()
        row.rel_err, row.tol = common.relative_error(fn(), ref), common.tolerance(dtype, args.tf32)
        row.timing = common.measure(fn, device, args.warmup, args.reps)
    except Exception as error:  # noqa: BLE001 - reported in the table instead
        row.note = f"not run: {common.describe_error(error)}"
    return row


def shape_rows(problem: Problem, args: argparse.Namespace, device: torch.device, gpu: floors.Gpu | None) -> list[Row]:
    """The dense row, then torch.sparse and ours for every (sparsity, block size)."""
    dtype = problem.dtype
    torch.manual_seed(0)
    x = torch.randn(problem.m, problem.k, device=device, dtype=dtype)
    dense_weight = torch.randn(problem.n, problem.k, device=device, dtype=dtype) / problem.k**0.5
    bias = torch.randn(problem.n, device=device, dtype=dtype)

    dense = Row("dense F.linear (" + ("cuBLAS" if device.type == "cuda" else "CPU BLAS") + ")")
    dense.intensity, dense.floor = intensity(problem, None), floors.floor_ms(problem.linear(None), gpu, args.tf32)
    rows = [run_row(dense, lambda: lambda: F.linear(x, dense_weight, bias),
                    F.linear(x, dense_weight, bias), args, device, dtype)]
    for sparsity in args.sparsity:
        for b in args.blocksize:
            w = prune_blocks_(dense_weight.clone(), sparsity, b)
            ref = F.linear(x, w, bias)
            bsr = BsrWeight.from_dense(w, b)
            cost = dict(intensity=intensity(problem, bsr), floor=floors.floor_ms(problem.linear(bsr), gpu, args.tf32))

            def torch_sparse(w=w, b=b):
                w_bsr = w.to_sparse_bsr(b)
                return lambda: F.linear(x, w_bsr, bias)

            rows.append(run_row(Row("torch.sparse BSR", sparsity, b, **cost), torch_sparse,
                                ref, args, device, dtype))
            rows.append(run_row(Row("sparse_compile bsr_linear", sparsity, b, ours=True, **cost),
                                lambda bsr=bsr: lambda: bsr_linear(x, bsr, bias), ref, args, device, dtype))
    return rows + semi_structured_rows(problem, x, dense_weight, bias, args, device, gpu)


#: The 2:4 rows: (the op's kernel argument, row label).
SEMI_STRUCTURED_VARIANTS = (("cusparselt", "sparse_compile 2:4 (cuSPARSELt)"), ("cutlass", "sparse_compile 2:4 (CUTLASS)"))


def semi_structured_unavailable(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why torch's ``kernel`` cannot run this row here, or ``""``."""
    if device.type != "cuda":
        return "needs a GPU: torch's 2:4 kernels are CUDA-only (the CPU reference makes no speed claim)"
    if dtype not in semi_structured.CUDA_DTYPES:
        return f"no 2:4 kernel for {common.dtype_name(dtype)} (torch's: float16, bfloat16)"
    if kernel not in semi_structured.cuda_kernels(device):
        major, minor = torch.cuda.get_device_capability(device)
        return f"torch has no {kernel} 2:4 kernel on sm{major}{minor}"
    return ""


def semi_structured_rows(problem: Problem, x, dense_weight, bias, args, device, gpu) -> list[Row]:
    """A 2:4 magnitude mask on ``dense_weight``, run on each of torch's 2:4 kernels."""
    n, k = dense_weight.shape
    w = dense_weight * nm_mask(dense_weight.float(), 2, 4).to(dense_weight.dtype)
    ref = F.linear(x, w, bias)
    linear = floors.Linear(problem.m, k, n, problem.dtype, stored=n * k // 2, index_bytes=n * k // 8, sparse_24=True)
    cost = dict(intensity=linear.flops / linear.bytes, floor=floors.floor_ms(linear, gpu, args.tf32))
    rows = []
    for kernel, label in SEMI_STRUCTURED_VARIANTS:
        why = semi_structured_unavailable(kernel, device, problem.dtype)
        if why:
            rows.append(Row(label, 0.5, note=why, **cost))
            continue

        def make(kernel=kernel):
            values, meta = semi_structured.compress(w, kernel)
            return lambda: semi_structured.semi_structured_linear(x, values, meta, bias, n, kernel)

        rows.append(run_row(Row(label, 0.5, ours=True, **cost), make, ref, args, device, problem.dtype))
    return rows


def table_rows(problem: Problem, rows: list[Row], device: torch.device) -> list[list[str]]:
    dense_ms = rows[0].median_ms
    out = []
    for row in rows:
        cells = [
            f"{problem.k}x{problem.n}", str(problem.m),
            "-" if row.sparsity is None else f"{row.sparsity:.0%}",
            "-" if row.blocksize is None else str(row.blocksize),
            row.variant,
        ]
        if row.timing is None:
            out.append(cells + ["-"] * 8 + [row.note])
            continue
        tflops = None if row.median_ms is None else problem.dense_flops / (row.median_ms * 1e-3) / 1e12
        check = "ok" if row.ok else f"WRONG: err > {row.tol:.0e}"
        out.append(cells + [
            common.fmt(row.timing.median_ms, 3), str(row.timing.reps), common.fmt(tflops, 3),
            common.fmt_ratio(dense_ms, row.median_ms), common.fmt(row.intensity, 0), common.fmt_sig(row.floor),
            common.fmt(floors.percent_of_floor(row.floor, row.median_ms, device), 0), f"{row.rel_err:.1e}", check,
        ])
    return out


def raw_records(problem: Problem, rows: list[Row]) -> list[dict[str, Any]]:
    return [
        dict(dtype=common.dtype_name(problem.dtype), shape=f"{problem.k}x{problem.n}", m=problem.m,
             variant=row.variant, sparsity=row.sparsity, block=row.blocksize, times_ms=row.timing.times_ms)
        for row in rows if row.timing is not None
    ]


def plot_points(problem: Problem, rows: list[Row]) -> list[plot.Point]:
    dense = rows[0]
    panel = f"{common.dtype_name(problem.dtype)} {problem.k}x{problem.n}"
    return [
        plot.Point(panel, row.blocksize, row.variant, row.sparsity,
                   None if row.median_ms is None or dense.median_ms is None else dense.median_ms / row.median_ms,
                   None if row.floor is None or dense.floor is None else dense.floor / row.floor)
        for row in rows[1:]
        if row.blocksize is not None  # panels are per block size; 2:4 rows are in the table only
    ]


# --------------------------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints the tables; returns 1 if a row gave a wrong answer or one
    of sparse_compile's rows did not run."""
    args = parse_args(argv)
    device = common.set_up_run(args)
    gpu = floors.gpu_for(device, args.floor_gpu)
    m = args.batch_size * args.tokens

    facts = common.environment(device, args.tf32) + [
        ("M", f"{m} = batch {args.batch_size} x {args.tokens} tokens"),
        ("shapes (K x N)", ", ".join(f"{k}x{n}" for k, n in args.shapes)),
        ("dtypes", ", ".join(common.dtype_name(d) for d in args.dtype)),
        ("sparsity", ", ".join(f"{s:.0%}" for s in args.sparsity) + " of the weight blocks"),
        ("block sizes", ", ".join(map(str, args.blocksize))),
        ("timing", common.timing_fact(device, args)),
        ("floor", f"{gpu.name} data-sheet peaks (benchmarks/floors.py)" if gpu else "unknown GPU: no floor"),
    ]
    common.print_key_values(facts)

    tables, raw, points, all_ok, ours_not_run = [], [], [], True, []
    with torch.no_grad():
        for dtype in args.dtype:
            cells = []
            for k, n in args.shapes:
                problem = Problem(m, k, n, dtype)
                rows = shape_rows(problem, args, device, gpu)
                cells += table_rows(problem, rows, device)
                raw += raw_records(problem, rows)
                points += plot_points(problem, rows)
                all_ok &= all(row.ok or row.timing is None for row in rows)
                ours_not_run += [
                    f"{problem.k}x{problem.n} {common.dtype_name(dtype)} {row.variant} "
                    f"sparsity {row.sparsity} block {row.blocksize}: {row.note}"
                    for row in rows if row.ours and row.timing is None
                ]
            table = common.Table(f"linear layers, {common.dtype_name(dtype)}", HEADERS, cells)
            print(f"\n{table.title}\n{table.text()}", flush=True)
            tables.append(table)

    legend = (
        "eff TFLOP/s: 2*M*N*K (dense-equivalent work) / median time. vs dense: dense median / this "
        "row's median. FLOP/B: unavoidable FLOPs / unavoidable bytes (low: memory-bound). floor ms: "
        "max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) on the GPU named under 'floor', only the "
        "stored blocks multiplied and read. % of floor: floor / median (GPU runs only). rel err: "
        "max |out - dense out| / max |dense out|. 2:4 rows: sparsity is of the weights (2 of every 4 "
        "inputs kept), their floor at the 2:4 tensor-core peak."
    )
    if args.plot:
        plot.plot_speedups(args.plot, f"Linear layers, M = {m}, {common.device_name(device)}", "dense F.linear",
                           points, f"floor ratio ({gpu.name})" if gpu else None)
        print(f"wrote {args.plot}")
    return common.finish_run(args, argv, "benchmarks.kernels", "Linear-layer kernels", legend, facts, tables, raw,
                             all_ok, ours_not_run)


if __name__ == "__main__":
    sys.exit(main())
