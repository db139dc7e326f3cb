"""CUDA package round trip: package a block-sparse MLP on the GPU, load it in a fresh process.

    python -m benchmarks.export_cuda              # a GPU machine; step `export-cuda` of benchmarks/gpu_session.sh

Checks, each a row of the table (exit status 1 when one fails):

- packaging: ``sparse_compile.aoti_compile_and_package`` converts both linears to BSR with the
  Triton kernel (the report's rows);
- the package: what its generated code calls for the converted layers: our Triton kernel
  (``bsr_linear_kernel``) compiled into it (issue 22: the pass traces each op call into its
  kernel call for packages, ``passes/triton_kernels.py``), the report's "Triton kernels" line,
  and, for information, calls of our op left for AOTInductor's proxy executor
  (``sparse_compile::bsr_linear`` in ``*.wrapper.json``: 0 expected);
- the fresh process: ``import sparse_compile``, ``aoti_load_package``, one call: output against
  float64 eager, no Inductor compile, load + first call time, and the CUDA kernels that ran
  (profiler): our Triton kernel's name among them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from typing import Sequence

import torch
from tabulate import tabulate
from torch import nn

import sparse_compile
from benchmarks import common

KERNEL_NAME = "bsr_linear_kernel"
OP_NAME = "sparse_compile::bsr_linear"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_cuda", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", type=lambda text: common.DTYPES[common.DTYPE_ALIASES.get(text, text)],
                        default=torch.float16, help="float16, bfloat16 or float32")
    parser.add_argument("--blocksize", type=int, choices=[16, 32, 64, 128], default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--output", metavar="FILE", help="also write the table as markdown")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.export_cuda needs a CUDA GPU (run it on the GPU machine: bash benchmarks/gpu_session.sh export-cuda)")
        return 2
    with tempfile.TemporaryDirectory(prefix="sparse-export-cuda-") as work_dir:
        rows = round_trip(args, pathlib.Path(work_dir))
    text = tabulate(rows, headers=["check", "found", "result"], disable_numparse=True)
    failed = [row[0] for row in rows if row[2] != "ok"]
    verdict = f"verdict: {'FAILED: ' + ', '.join(failed) if failed else 'ok'}"
    print(text, verdict, sep="\n\n")
    if args.output:
        pathlib.Path(args.output).write_text(
            f"`python -m benchmarks.export_cuda {' '.join(sys.argv[1:])}`\n\n"
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {common.dtype_name(args.dtype)}\n\n"
            f"```\n{text}\n```\n\n{verdict}\n"
        )
    return 1 if failed else 0


def round_trip(args: argparse.Namespace, work_dir: pathlib.Path) -> list[list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).eval()
    sparse_compile.prune_linear_blocks_(model, sparsity=args.sparsity, blocksize=args.blocksize)
    model = model.to("cuda", args.dtype)
    x = torch.randn(256, 512, device="cuda", dtype=args.dtype)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    path = work_dir / "mlp.pt2"
    rows = []
    # A numeric threshold: which layers convert does not hang on timings; the package's kernels do not either.
    report = sparse_compile.aoti_compile_and_package(
        torch.export.export(model, (x,)), package_path=path,
        options={"density_threshold": 0.3, "blocksize": args.blocksize},
    )
    print(report)
    kernels = sorted({layer.kernel for layer in report.sparse_layers})
    rows.append(["layers converted (report)", f"{len(report.sparse_layers)}/{len(report.layers)}, kernel {kernels}",
                 _ok(len(report.sparse_layers) == 2 and kernels == ["triton bsr"])])

    rows.append(["Triton kernels (report)", report.triton_kernels or "-",
                 _ok(report.triton_kernels.startswith("2 op call(s) compiled into the package"))])
    op_calls, kernel_files = package_contents(path)
    rows.append([f"{OP_NAME} calls in the package (proxy executor)", str(op_calls), "info"])
    rows.append([f"{KERNEL_NAME} compiled into the package", ", ".join(kernel_files) or "nowhere",
                 _ok(bool(kernel_files))])

    torch.save(x.cpu(), work_dir / "x.pt")
    loaded = load_in_fresh_process(path, work_dir / "x.pt")
    y = loaded["y"].to("cuda").double()
    error = common.relative_error(y, reference)
    rows.append(["fresh process: output vs float64 eager", f"rel err {error:.1e}",
                 _ok(error <= common.tolerance(args.dtype, False))])
    rows.append(["fresh process: Inductor compiles at load", str(loaded["inductor"] or "none"), _ok(not loaded["inductor"])])
    rows.append(["fresh process: load + first call", f"{loaded['load_s']:.2f} s (import {loaded['import_s']:.2f} s)",
                 _ok(loaded["load_s"] <= 2.0)])
    ran = [name for name in loaded["kernels"] if KERNEL_NAME in name]
    rows.append([f"fresh process: {KERNEL_NAME} ran (profiler)", ", ".join(sorted(set(ran))) or "no", _ok(bool(ran))])
    return rows


def _ok(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def package_contents(path: pathlib.Path) -> tuple[int, list[str]]:
    """Calls of our op in the package's custom-op list, and the package files that name our kernel."""
    op_calls = 0
    kernel_files = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            data = archive.read(name)
            if name.endswith(".wrapper.json"):
                op_calls += sum(node["node"]["target"] == OP_NAME for node in json.loads(data)["nodes"])
            if KERNEL_NAME in name or KERNEL_NAME.encode() in data:
                kernel_files.append(pathlib.PurePosixPath(name).name)
    return op_calls, kernel_files


def load_in_fresh_process(path: pathlib.Path, x_file: pathlib.Path) -> dict:
    out_file = path.with_suffix(".out.pt")
    script = textwrap.dedent(f"""
        import time, torch
        start = time.perf_counter()
        import sparse_compile
        from torch._dynamo.utils import counters
        imported = time.perf_counter()
        x = torch.load({str(x_file)!r}).cuda()
        torch.cuda.synchronize()
        loading = time.perf_counter()
        runner = sparse_compile.aoti_load_package({str(path)!r})
        y = runner(x)
        torch.cuda.synchronize()
        done = time.perf_counter()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            runner(x)
            torch.cuda.synchronize()
        torch.save(dict(y=y.cpu(), kernels=[event.name for event in profile.events()],
                        inductor=dict(counters["inductor"]), import_s=imported - start, load_s=done - loading),
                   {str(out_file)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"the loading process failed:\n{done.stderr[-3000:]}")
    return torch.load(out_file)


if __name__ == "__main__":
    sys.exit(main())
