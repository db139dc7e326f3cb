"""Compile every Triton kernel of the project for sm80 and sm90 without a GPU, and read ptxas.

    python -m benchmarks.inspect_kernels                 # every kernel, arch, dtype, block, config
    python -m benchmarks.inspect_kernels --include-pruned --arch sm80 --dtype fp32-ieee

For each arch (sm80: A100, sm90: H100), each kernel, dtype, block size and each config the
autotuner may try there (``autotune_set`` of the kernel's configs), the kernel is compiled as a
launch would compile it, and the table shows what ``ptxas -v`` and the PTX say: registers per
thread, spill bytes, shared memory per block, the tensor-core instruction, and how the main
loop loads (async copies or not). The exit status is 1 if any config fails to compile.

Launch-equivalent specialisation: the arguments go through Triton's own launch binder
(``create_function_from_signature``, as ``JITFunction.run`` does), so pointers count as
16-byte aligned, integers divisible by 16 get ``tt.divisibility = 16`` and integers equal to
1 (unit strides) become constants, exactly as on a GPU. Without that nothing pipelines and
the table would describe a kernel no launch ever runs.

Adding a kernel: write a function returning a :class:`KernelSpec` and append it to
``KERNEL_SPECS`` (see ``bsr_linear_spec``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Sequence

import torch
from tabulate import tabulate


#: The archs inspected: name -> compute capability. sm80 is the A100, sm90 the H100.
ARCHS = {"sm80": (8, 0), "sm90": (9, 0)}


@dataclasses.dataclass(frozen=True)
class DtypeCase:
    """One input dtype as a launch sees it; fp32 comes twice, with and without TF32."""

    name: str
    dtype: torch.dtype
    input_precision: str  # tl.dot input_precision: "tf32" or "ieee" (ignored by fp16/bf16)
    # The weight's dtype where it differs from the input's: the masked kernel under autocast
    # (half activations, fp32 master weight rounded in registers). Only kernels that take it.
    weight_dtype: torch.dtype | None = None

    @property
    def half(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    @property
    def weight(self) -> torch.dtype:
        return self.weight_dtype or self.dtype


DTYPES = [
    DtypeCase("fp16", torch.float16, "ieee"),
    DtypeCase("bf16", torch.bfloat16, "ieee"),
    DtypeCase("fp32-tf32", torch.float32, "tf32"),
    DtypeCase("fp32-ieee", torch.float32, "ieee"),
    DtypeCase("bf16-w32", torch.bfloat16, "ieee", weight_dtype=torch.float32),
    DtypeCase("fp16-w32", torch.float16, "ieee", weight_dtype=torch.float32),
]
#: Kernels whose launches take a weight of another dtype than the input (the masked op's).
MIXED_DTYPE_KERNELS = ("masked_linear", "masked_linear_dx")
DTYPES_BY_NAME = {d.name: d for d in DTYPES}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What the inspection needs to know of one kernel.

    Attributes:
        name: the name in the table.
        kernel: the ``@triton.jit`` function (not the autotuned wrapper).
        blocksizes: block sizes to compile for.
        launch_args: ``(dtype_case, blocksize) -> (positional args, keyword args)`` as the launcher
            passes them for a representative shape (ints and ``triton.runtime.jit.MockTensor``
            for tensors), without the config's meta-parameters.
        configs: ``(capability, smem_bytes, dtype_case, blocksize) -> [(triton.Config, reason)]``:
            every config of the arch's set, ``reason`` being why the autotuner must not try it
            (``None`` if it may). Where every one is pruned, the inspection adds the hook's
            fallback (``autotune_configs.fallback_config``), as the autotuner would run it.
    """

    name: str
    kernel: Any
    blocksizes: tuple[int, ...]
    launch_args: Callable[[DtypeCase, int], tuple[list, dict]]
    configs: Callable[[tuple[int, int], int, DtypeCase, int], list[tuple[Any, str | None]]]


# --------------------------------------------------------------------------------------------
# The kernels


def bsr_linear_spec() -> KernelSpec:
    from triton.runtime.jit import MockTensor

    from sparse_compile.kernels import autotune_configs as ac
    from sparse_compile.kernels.bsr_linear import BLOCKSIZES
    from sparse_compile.kernels.bsr_linear_kernels import bsr_linear_kernel

    # ViT-B/16 MLP up-projection at batch 256: M = 256 * 197 tokens, K = 768, N = 3072; every
    # size divisible by 16, as the benchmark's launches are.
    m, k, n = 256 * 197, 768, 3072

    def launch_args(case: DtypeCase, b: int) -> tuple[list, dict]:
        t = lambda dtype: MockTensor(dtype)  # noqa: E731 - data_ptr() 0: 16-byte aligned
        nnz = (n // b) * (k // b) // 10  # 90% sparse
        args = [
            t(case.dtype), t(case.dtype), t(torch.int32), t(torch.int32), t(case.dtype), t(case.dtype),
            m, n, k,
            k, 1,  # x strides (row-major)
            b * b, b, 1,  # values strides [nnz, b, b]
            n, 1,  # out strides
            1 << (m - 1).bit_length(), 1 << (nnz - 1).bit_length(),  # autotune buckets
        ]
        meta = dict(HAS_BIAS=True, BLOCKSIZE=b, INPUT_PRECISION=case.input_precision, INTERPRET=False)
        return args, meta

    def configs(capability, smem, case, b):
        return [
            (c, ac.pruned_reason(c, capability, smem, case.dtype.itemsize, b, case.input_precision, "bsr_linear"))
            for c in ac.arch_configs(capability[0])
        ]

    return KernelSpec("bsr_linear", bsr_linear_kernel, BLOCKSIZES, launch_args, configs)


def masked_linear_spec() -> KernelSpec:
    """The masked kernel's forward launch: ``y = x @ (W ⊙ M)^T + b``."""
    return _masked_spec(input_grad=False)


def masked_linear_input_grad_spec() -> KernelSpec:
    """The same kernel's input-gradient launch, ``dx = dy @ (W ⊙ M)``: the weight and the tile
    mask are read through their transposes (unit stride on N instead of K), which ptxas
    allocates differently. The autotuner prunes both launches with the same hook."""
    return _masked_spec(input_grad=True)


def _masked_spec(input_grad: bool) -> KernelSpec:
    from triton.runtime.jit import MockTensor

    from sparse_compile.kernels import autotune_configs as ac
    # The masked kernel's tiles are the BSR kernel's block sizes (tl.dot: powers of two >= 16).
    from sparse_compile.kernels.bsr_linear import BLOCKSIZES
    from sparse_compile.kernels.masked_linear_kernels import masked_linear_kernel

    # ViT-B/16's MLP up-projection in a training step at batch 64: 64 * 197 tokens, a contiguous
    # weight W [3072, 768] and an fp32 tile mask (Supermask's scores are fp32), 90% of its tiles
    # zero. The forward is [M, 768] @ W^T; the input gradient [M, 3072] @ W, i.e. the kernel's
    # N = 768, K = 3072 with W^T as w_nk (strides (1, 768)) and no bias.
    m = 64 * 197
    n, k = (768, 3072) if input_grad else (3072, 768)

    def launch_args(case: DtypeCase, b: int) -> tuple[list, dict]:
        t = lambda dtype: MockTensor(dtype)  # noqa: E731 - data_ptr() 0: 16-byte aligned
        w_strides = (1, n) if input_grad else (k, 1)  # w_nk = W.t() or W
        tile_strides = (1, n // b) if input_grad else (k // b, 1)  # tile_mask_nk likewise
        # As kernels/masked_linear.py::_launch passes them: a, w_nk, tile_mask_nk, kept, count,
        # bias (out when there is none: never read), out, then sizes, strides and the autotune
        # bucket. kept is [N / b, K / b], contiguous.
        args = [
            t(case.dtype), t(case.weight), t(torch.float32), t(torch.int32), t(torch.int32), t(case.weight),
            t(case.dtype),
            m, n, k,
            k, 1,  # a strides (row-major)
            *w_strides,
            *tile_strides,
            k // b,  # kept row stride
            n, 1,  # out strides
            1 << (m - 1).bit_length(),  # autotune bucket
        ]
        meta = dict(HAS_BIAS=not input_grad, BLOCKSIZE=b, INPUT_PRECISION=case.input_precision, INTERPRET=False)
        return args, meta

    def configs(capability, smem, case, b):
        return [
            (c, ac.pruned_reason(c, capability, smem, case.dtype.itemsize, b, case.input_precision, "masked_linear",
                                 case.weight.itemsize))
            for c in ac.arch_configs(capability[0])
        ]

    name = "masked_linear_dx" if input_grad else "masked_linear"
    return KernelSpec(name, masked_linear_kernel, BLOCKSIZES, launch_args, configs)


#: Every kernel the inspection compiles. A new kernel adds its spec function here.
KERNEL_SPECS: list[Callable[[], KernelSpec]] = [bsr_linear_spec, masked_linear_spec, masked_linear_input_grad_spec]


# --------------------------------------------------------------------------------------------
# Compiling one case


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    kernel: str
    dtype: str
    block: int
    config: str  # label, see config_label
    pruned: str | None  # why the autotuner skips it; such cases compile only with --include-pruned
    fallback: bool = False  # the hook's fallback, run because every config of the set is pruned


@dataclasses.dataclass
class Result:
    case: Case
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    tensor_cores: str | None = None  # "wgmma", "mma" or "none"
    async_loads: str | None = None  # "TMA", "cp.async" or "none"
    seconds: float = 0.0
    error: str | None = None
    # What the launch binder specialised: arguments made constants (unit strides) and those
    # marked divisible by 16 (aligned pointers, sizes); shows the compile matches a launch.
    specialised_constants: list[str] = dataclasses.field(default_factory=list)
    divisible_by_16: list[str] = dataclasses.field(default_factory=list)

    @property
    def spill_bytes(self) -> int | None:
        return None if self.spill_stores is None else self.spill_stores + self.spill_loads


def config_label(cfg) -> str:
    """``BLOCK_M=128 GROUP_M=8 w8 s3``: meta-parameters, warps, stages."""
    meta = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{meta} w{cfg.num_warps} s{cfg.num_stages}"


def smem_limit(arch: str) -> int:
    from sparse_compile.kernels.autotune_configs import SMEM_PER_BLOCK_FALLBACK

    return SMEM_PER_BLOCK_FALLBACK[ARCHS[arch]]


def _specs() -> dict[str, KernelSpec]:
    return {spec.name: spec for spec in (make() for make in KERNEL_SPECS)}


def _find_config(spec: KernelSpec, case: Case):
    if case.fallback:
        from sparse_compile.kernels.autotune_configs import fallback_config

        return fallback_config()
    capability = ARCHS[case.arch]
    for cfg, _ in spec.configs(capability, smem_limit(case.arch), DTYPES_BY_NAME[case.dtype], case.block):
        if config_label(cfg) == case.config:
            return cfg
    raise KeyError(f"{case.kernel}: no config {case.config} for {case.arch}")


def _ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_report(ptx: str, capability: tuple[int, int]) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` on the PTX Triton generated."""
    arch = f"sm_{capability[0]}{capability[1]}" + ("a" if capability[0] >= 9 else "")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [_ptxas_path(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            check=True, capture_output=True, text=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return dict(registers=int(registers[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]))


def tensor_core_instruction(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "none"


def async_load_kind(ptx: str) -> str:
    # Triton emits these only for loads its pipeliner made asynchronous (num_stages > 1 loops).
    if "cp.async.bulk.tensor" in ptx:
        return "TMA"
    if re.search(r"\bcp\.async\.c[ag]\.", ptx):
        return "cp.async"
    return "none"


def inspect_case(case: Case) -> Result:
    """Compiles one case as a launch would and reads what ptxas and the PTX say."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    start = time.perf_counter()
    result = Result(case)
    try:
        spec = _specs()[case.kernel]
        cfg = _find_config(spec, case)
        capability = ARCHS[case.arch]
        target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
        backend = make_backend(target)
        args, meta = spec.launch_args(DTYPES_BY_NAME[case.dtype], case.block)
        kwargs = {**meta, **cfg.all_kwargs()}
        # What JITFunction.run does with a launch's arguments, minus the GPU.
        binder = create_function_from_signature(spec.kernel.signature, spec.kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = spec.kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
        names = list(signature)
        result.specialised_constants = [n for n in names if signature[n] == "constexpr" and n not in kwargs]
        result.divisible_by_16 = [names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr]
        compiled = triton.compile(
            ASTSource(spec.kernel, signature, constexprs, attrs), target=target, options=options.__dict__
        )
        ptx = compiled.asm["ptx"]
        for key, value in _ptxas_report(ptx, capability).items():
            setattr(result, key, value)
        result.shared_bytes = compiled.metadata.shared
        result.tensor_cores = tensor_core_instruction(ptx)
        result.async_loads = async_load_kind(ptx)
    except Exception as error:  # noqa: BLE001 - a failed config is a row of the table
        lines = str(error).strip().splitlines()
        result.error = f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# All cases


def all_cases(
    archs: Sequence[str], kernels: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
    blocks: Sequence[int] | None = None,
) -> list[Case]:
    """Every (arch, kernel, dtype, block, config), pruned configs included (marked), and the
    hook's fallback config where all of them are pruned."""
    from sparse_compile.kernels.autotune_configs import fallback_config

    cases = []
    for arch in archs:
        for spec in _specs().values():
            if kernels and spec.name not in kernels:
                continue
            for case in DTYPES:
                if dtypes and case.name not in dtypes:
                    continue
                if case.weight_dtype is not None and spec.name not in MIXED_DTYPE_KERNELS:
                    continue
                for b in spec.blocksizes:
                    if blocks and b not in blocks:
                        continue
                    configs = spec.configs(ARCHS[arch], smem_limit(arch), case, b)
                    for cfg, reason in configs:
                        cases.append(Case(arch, spec.name, case.name, b, config_label(cfg), reason))
                    if all(reason for _, reason in configs):
                        cases.append(Case(arch, spec.name, case.name, b, config_label(fallback_config()), None, True))
    return cases


def run_cases(cases: Sequence[Case], jobs: int) -> list[Result]:
    """Compiles the cases on ``jobs`` processes (compiling is CPU-bound, one core each)."""
    if jobs <= 1:
        return [inspect_case(c) for c in cases]
    # Longest first (big tiles, fp32, deep pipelines), so no slow case starts last.
    order = sorted(range(len(cases)), key=lambda i: -_cost_guess(cases[i]))
    results: list[Result | None] = [None] * len(cases)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        futures = {pool.submit(inspect_case, cases[i]): i for i in order}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
    return results


def _cost_guess(case: Case) -> int:
    block_m = int(re.search(r"BLOCK_M=(\d+)", case.config)[1]) if "BLOCK_M=" in case.config else 64
    return block_m * case.block * (4 if case.dtype.startswith("fp32") else 1)


def failures(result: Result) -> list[str]:
    """What is wrong with a config the autotuner may try (empty: nothing)."""
    if result.error:
        return [f"does not compile: {result.error}"]
    problems = []
    if result.spill_bytes:
        problems.append(f"spills {result.spill_stores} B stores / {result.spill_loads} B loads")
    if result.shared_bytes > smem_limit(result.case.arch):
        problems.append(f"shared memory {result.shared_bytes} B > {smem_limit(result.case.arch)} B")
    if DTYPES_BY_NAME[result.case.dtype].half and result.tensor_cores == "none":
        problems.append("no tensor-core instruction for a half dtype")
    if result.async_loads == "none" and not result.case.fallback:  # the fallback has one stage
        problems.append("main loop loads synchronously")
    return problems


HEADERS = ["arch", "kernel", "dtype", "block", "config", "regs", "spill B", "smem KiB", "tensor cores",
           "async loads", "s", "note"]


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        c = r.case
        cells = [c.arch, c.kernel, c.dtype, str(c.block), c.config]
        if r.error:
            rows.append(cells + ["-"] * 5 + [f"{r.seconds:.1f}", f"FAILED: {r.error}"[:100]])
            continue
        if c.pruned:
            note = f"pruned: {c.pruned}"
        else:
            note = "; ".join(failures(r)) or "ok"
            if c.fallback:
                note = f"fallback (every config pruned; 1 stage: loads not pipelined): {note}"
        rows.append(cells + [
            str(r.registers), str(r.spill_bytes), f"{r.shared_bytes / 1024:.1f}", r.tensor_cores,
            r.async_loads, f"{r.seconds:.1f}", note,
        ])
    return rows


def summary(results: Sequence[Result], pruned: Sequence[Case]) -> list[str]:
    lines = []
    everything = [r.case for r in results] + list(pruned)
    for arch, kernel in dict.fromkeys((c.arch, c.kernel) for c in everything):
        mine = [r for r in results if (r.case.arch, r.case.kernel) == (arch, kernel) and not r.case.pruned]
        tried = [r for r in mine if not r.case.fallback]
        fallbacks = [r for r in mine if r.case.fallback]
        bad = [r for r in mine if failures(r)]
        reasons = Counter(c.pruned.split(":")[0] for c in pruned if (c.arch, c.kernel) == (arch, kernel))
        why = ", ".join(f"{n} for {reason}" for reason, n in reasons.items()) or "none"
        fallback = f" + {len(fallbacks)} fallback (every config pruned)" if fallbacks else ""
        lines.append(
            f"{arch} {kernel}: {len(tried)} configs the autotuner may try{fallback}, {len(bad)} with a problem; "
            f"pruned: {why} (shared memory limit {smem_limit(arch) // 1024} KiB per block)"
        )
    return lines


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inspect_kernels", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    listed = lambda choices: lambda text: [_choice(x.strip(), choices) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--arch", type=listed(list(ARCHS)), default=list(ARCHS), help="sm80,sm90")
    parser.add_argument("--kernel", type=listed([s.name for s in _specs().values()]), help="default: all")
    parser.add_argument("--dtype", type=listed(list(DTYPES_BY_NAME)), help=f"{','.join(DTYPES_BY_NAME)} (default: all)")
    parser.add_argument("--blocksize", type=lambda t: [int(x) for x in t.split(",")], help="default: each kernel's")
    parser.add_argument(
        "--include-pruned", action="store_true",
        help="also compile the configs the autotuner skips (to see why; spilling fp32 ones take ~30 s each)",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--json", metavar="FILE", help="also write every result as JSON (the CI test reads it)")
    parser.add_argument("--output", metavar="FILE", help="also write the table as markdown")
    return parser.parse_args(argv)


def _choice(value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def _check_not_interpreted() -> None:
    import triton

    if triton.knobs.runtime.interpret:
        sys.exit("inspect_kernels: TRITON_INTERPRET=1 makes kernels interpreted functions; unset it")


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the table; returns 1 if a config failed to compile, else 0."""
    args = parse_args(argv)
    _check_not_interpreted()
    cases = all_cases(args.arch, args.kernel, args.dtype, args.blocksize)
    to_compile = [c for c in cases if args.include_pruned or not c.pruned]
    pruned_only = [c for c in cases if c.pruned and c not in to_compile]
    start = time.perf_counter()
    results = run_cases(to_compile, args.jobs)
    elapsed = time.perf_counter() - start

    rows = table_rows(results) + [
        [c.arch, c.kernel, c.dtype, str(c.block), c.config] + ["-"] * 6 + [f"pruned: {c.pruned}"]
        for c in pruned_only
    ]
    rows.sort(key=lambda row: row[:4])
    text = tabulate(rows, headers=HEADERS, tablefmt="simple", disable_numparse=True)
    print(text)
    lines = summary(results, [c for c in cases if c.pruned])
    lines.append(f"{len(results)} compiled in {elapsed:.0f} s on {args.jobs} processes")
    print("\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write("# Kernel inspection\n\n```\npython -m benchmarks.inspect_kernels " + " ".join(argv or sys.argv[1:])
                    + "\n```\n\n" + tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
                    + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    failed = [r for r in results if r.error]
    if failed:
        print(f"ERROR: {len(failed)} config(s) failed to compile", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
