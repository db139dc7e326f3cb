"""A sparse AOTInductor package against backend="sparse" and a dense package, and its load time.

    python -m benchmarks.export                 # CPU: the main job's model (ViT-B widths, 2 blocks), 90% / block 32
    python -m benchmarks.export --help

Rows (all on the same block-pruned model, the same input, checked against dense eager):

- ``sparse package (loaded)``: ``sparse_compile.aoti_compile_and_package`` (the backend's
  options, layers timed while packaging), loaded with ``sparse_compile.aoti_load_package``;
- ``torch.compile backend="sparse"``: the in-process compile it should match;
- ``dense package (freezing)``: ``torch._inductor.aoti_compile_and_package`` with freezing under
  ``no_grad`` (Inductor's oneDNN weight packing on), the dense way to ship the same model.

Timing as in ``benchmarks.vit``: every row built and checked first, then timed round-robin
(``--warmup`` untimed calls each, ``--reps`` rounds of one call each); medians, and each ratio the
median of its per-round ratios with their interquartile range as the spread. Then the package is
loaded and called once in ``--load-runs`` fresh Python processes: import, load + first call
(median), and whether anything was compiled there. Targets (issue 22, CPU): the package within
10% of backend="sparse", at least 2x the dense package, load + first call <= 2 s without compiling.
Exit status 1 when a row of ours (the package, or its load) failed, gave a wrong answer or compiled
at load; targets not met are reported in the verdict, not in the exit status (timings depend on
the machine's load).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Sequence

import torch
from tabulate import tabulate

import sparse_compile
from benchmarks import common, vit

PACKAGE = "sparse package (loaded)"
BACKEND = 'torch.compile backend="sparse"'
DENSE_PACKAGE = "dense package (freezing)"
HEADERS = ["variant", "sparse layers", "median ms", "vs dense package", f"vs {BACKEND}", "spread", "build s",
           "rel err", "check"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=common.positive_int, default=4)
    parser.add_argument("--image-size", type=common.positive_int, default=vit.CPU_TINY["image_size"])
    for flag in vit.TINY_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=common.positive_int, default=vit.CPU_TINY[flag])
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of each encoder weight's blocks pruned")
    parser.add_argument("--blocksize", type=int, choices=[16, 32, 64, 128], default=32)
    parser.add_argument("--warmup", type=common.non_negative_int, default=3)
    parser.add_argument("--reps", type=common.positive_int, default=20, help="timed rounds")
    parser.add_argument("--load-runs", type=common.positive_int, default=3,
                        help="fresh processes that load the package and call it once")
    parser.add_argument("--threads", type=common.positive_int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--work-dir", help="where the packages go (default: a temporary folder)")
    parser.add_argument("--output", metavar="FILE", help="also write the table as markdown")
    common.add_timing_cache_arg(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    args.model = "tiny"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_matmul_precision(False)
    # A new, empty timing cache unless one is named (as benchmarks.vit and zoo): the package and the
    # compiled model decide their layers on timings taken now, not ones cached under other load.
    with common.timing_cache(args.timing_cache):
        if args.work_dir:
            pathlib.Path(args.work_dir).mkdir(parents=True, exist_ok=True)
            return run(args, pathlib.Path(args.work_dir))
        with tempfile.TemporaryDirectory(prefix="sparse-export-") as work_dir:
            return run(args, pathlib.Path(work_dir))


def run(args: argparse.Namespace, work_dir: pathlib.Path) -> int:
    started = time.monotonic()
    device = torch.device(args.device)
    model, _ = vit.pruned_copy(vit.build_model(args), args.sparsity, args.blocksize)
    model = model.to(device)
    torch.manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        reference = model(x)

    builds = {PACKAGE: build_sparse_package, BACKEND: build_backend, DENSE_PACKAGE: build_dense_package}
    calls, facts, errors = {}, {}, {}
    for label, build in builds.items():
        progress(f"building {label}")
        start = time.monotonic()
        try:
            call, sparse_layers = build(model, x, args, work_dir)
            with torch.no_grad():
                error = common.relative_error(call(), reference)
        except Exception as failure:  # noqa: BLE001 - the row says what failed
            errors[label] = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"[:200]
            continue
        calls[label] = call
        facts[label] = dict(build_s=time.monotonic() - start, sparse_layers=sparse_layers, rel_err=error)

    progress(f"timing {len(calls)} rows round-robin: {args.warmup} warm-up calls, {args.reps} rounds")
    with torch.no_grad():
        timings, timing_errors = common.time_round_robin(calls, device, args.warmup, args.reps)
    errors.update({label: f"{type(e).__name__}: {e}"[:200] for label, e in timing_errors.items()})

    load = None
    if PACKAGE in calls:
        progress(f"loading the package in {args.load_runs} fresh process(es)")
        try:
            load = fresh_process_loads(work_dir / "sparse.pt2", x, args)
        except Exception as failure:  # noqa: BLE001
            errors["load"] = f"{type(failure).__name__}: {failure}"[:300]

    table, failed = table_rows(builds, facts, timings, errors, args)
    text = tabulate(table, headers=HEADERS, disable_numparse=True)
    load_text = load_line(load, errors.get("load"))
    failed = failed or load is None or load["compiled"] or errors.get("load") is not None
    verdict = verdict_line(timings, load, failed, time.monotonic() - started)
    facts_text = (
        f"device: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"model: {vit.model_config(args, model)}; encoder linears {args.sparsity:.0%} of blocks pruned at block {args.blocksize}"
    )
    print(facts_text, text, load_text, verdict, sep="\n\n")
    if args.output:
        command = "python -m benchmarks.export " + " ".join(sys.argv[1:])
        pathlib.Path(args.output).write_text(
            f"`{command}`\n\n{facts_text}\n\n{text}\n\n{load_text}\n\n{verdict}\n\n"
            f"Raw per-call times (ms):\n\n```\n{json.dumps({k: list(t.times_ms) for k, t in timings.items()})}\n```\n"
        )
    return 1 if failed else 0


def progress(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


def build_sparse_package(model, x, args, work_dir):
    path = work_dir / "sparse.pt2"
    report = sparse_compile.aoti_compile_and_package(
        torch.export.export(model, (x,)), package_path=path, options={"blocksize": args.blocksize}
    )
    runner = sparse_compile.aoti_load_package(path)
    return (lambda: runner(x)), f"{len(report.sparse_layers)}/{len(report.convertible_layers)}"


def build_backend(model, x, args, work_dir):
    compiled = torch.compile(copy.deepcopy(model), backend="sparse", options={"blocksize": args.blocksize})
    with torch.no_grad():
        compiled(x)
    report = sparse_compile.report(compiled)

    def call():
        with torch.no_grad():
            return compiled(x)

    return call, f"{len(report.sparse_layers)}/{len(report.convertible_layers)}"


def build_dense_package(model, x, args, work_dir):
    path = work_dir / "dense.pt2"
    exported = torch.export.export(model, (x,))
    with torch.no_grad():  # freezing applies only without grad
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs={"freezing": True})
    runner = sparse_compile.aoti_load_package(path)
    return (lambda: runner(x)), "-"


def table_rows(builds, facts, timings, errors, args) -> tuple[list[list[str]], bool]:
    rows, failed = [], False
    tolerance = common.tolerance(torch.float32, False)
    for label in builds:
        fact = facts.get(label)
        error = errors.get(label)
        wrong = fact is not None and fact["rel_err"] > tolerance
        check = error or ("WRONG" if wrong else "ok")
        if label == PACKAGE and (error or wrong):
            failed = True
        timing = timings.get(label)
        rows.append([
            label,
            fact["sparse_layers"] if fact else "-",
            f"{timing.median_ms:.3g}" if timing else "-",
            _ratio(timings, DENSE_PACKAGE, label),
            _ratio(timings, BACKEND, label),
            _spread(timings, DENSE_PACKAGE, label),
            f"{fact['build_s']:.1f}" if fact else "-",
            f"{fact['rel_err']:.1e}" if fact else "-",
            check,
        ])
    return rows, failed


def _ratio(timings, baseline: str, label: str) -> str:
    if baseline not in timings or label not in timings:
        return "-"
    return f"{common.paired_speedup(timings[baseline], timings[label]).median:.2f}x"


def _spread(timings, baseline: str, label: str) -> str:
    if baseline not in timings or label not in timings:
        return "-"
    return common.paired_speedup(timings[baseline], timings[label]).spread


def fresh_process_loads(path: pathlib.Path, x: torch.Tensor, args) -> dict:
    """Loads the package and calls it once in ``--load-runs`` new Python processes."""
    x_file = path.with_suffix(".x.pt")
    torch.save(x.cpu(), x_file)
    script = textwrap.dedent(f"""
        import json, time, torch
        start = time.perf_counter()
        import sparse_compile
        from torch._dynamo.utils import counters
        imported = time.perf_counter()
        x = torch.load({str(x_file)!r}).to({args.device!r})
        loading = time.perf_counter()
        runner = sparse_compile.aoti_load_package({str(path)!r})
        runner(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        done = time.perf_counter()
        print(json.dumps(dict(import_s=imported - start, load_s=done - loading, compiled=bool(counters["inductor"]))))
    """)
    runs = []
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for _ in range(args.load_runs):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return dict(
        import_s=statistics.median(r["import_s"] for r in runs),
        load_s=statistics.median(r["load_s"] for r in runs),
        compiled=any(r["compiled"] for r in runs),
        runs=len(runs),
    )


def load_line(load: dict | None, error: str | None) -> str:
    if load is None:
        return f"fresh process: {error or 'not run (the package failed)'}"
    compiled = "COMPILED at load" if load["compiled"] else "nothing compiled"
    return (f"fresh process ({load['runs']} runs, medians): import torch + sparse_compile {load['import_s']:.2f} s, "
            f"load + first call {load['load_s']:.2f} s (target <= 2 s), {compiled}")


def verdict_line(timings, load, failed: bool, seconds: float) -> str:
    parts = []
    if PACKAGE in timings and BACKEND in timings:
        ratio = common.paired_speedup(timings[BACKEND], timings[PACKAGE]).median
        parts.append(f"package {ratio:.2f}x backend=\"sparse\" (target >= 0.91x: {'met' if ratio >= 1 / 1.1 else 'NOT met'})")
    if PACKAGE in timings and DENSE_PACKAGE in timings:
        ratio = common.paired_speedup(timings[DENSE_PACKAGE], timings[PACKAGE]).median
        parts.append(f"{ratio:.2f}x the dense package (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    if load is not None:
        met = load["load_s"] <= 2.0 and not load["compiled"]
        parts.append(f"load + first call {load['load_s']:.2f} s ({'met' if met else 'NOT met'})")
    status = "FAILED (a row of ours failed)" if failed else "ok"
    return f"verdict: {status}; " + "; ".join(parts) + f"; total {common.fmt_seconds(seconds)}"


if __name__ == "__main__":
    sys.exit(main())
